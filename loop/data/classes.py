"""The categories a user declares (`sortloop init --classes table,console,...`), kept in `sortloop.toml`
(`classes`), so `start`, review and the `labels` filters know them before any photo is labeled.
"""

from __future__ import annotations

from loop.data.classnames import check_class_name
from loop.errors import ClassNameError
from loop.workspace import Workspace, edit_config


def parse_class_list(text: str) -> list[str]:
    """"table, console,cabinet" -> ["table", "console", "cabinet"]: each checked as a folder name, no repeats.

    Raises:
        ClassNameError: a name that cannot be a category folder, or no name at all.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        check_class_name(name)
    names = list(dict.fromkeys(names))
    if not names:
        raise ClassNameError("give your categories, separated by commas, e.g. --classes table,console,cabinet")
    return names


def declare_classes(ws: Workspace, names: list[str]) -> list[str]:
    """Add `names` to the workspace's declared categories (`classes` in sortloop.toml); returns the new list."""
    import tomlkit

    merged: list[str] = []

    def change(doc: tomlkit.TOMLDocument) -> None:
        nonlocal merged
        merged = list(dict.fromkeys([*[str(c) for c in doc.get("classes", [])], *names]))
        array = tomlkit.array()
        array.extend(merged)
        doc["classes"] = array

    edit_config(ws, change)
    return merged
