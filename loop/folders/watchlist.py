"""The folders `sortloop serve` watches and scans, edited in the workspace config without hand-editing TOML.

`schedule.inboxes` holds [inbox, destination] pairs sorted by the `watch` job; `schedule.sorted_trees` holds
sorted trees the `scan` job checks for user moves (every inbox destination is scanned too). Edits keep the
file's comments and layout (tomlkit), are validated as a whole config before they replace the file, and
are written atomically under a lock, so a bad edit or a crash leaves the old file in place.
Caveat: a running `sortloop serve` schedules the watch/scan jobs at start-up; restart it after adding the
first inbox or tree (the folders themselves are re-read at every run).
"""

from __future__ import annotations

import logging
from pathlib import Path

import tomlkit

from loop.errors import ConfigError
from loop.workspace import Workspace, edit_config

logger = logging.getLogger(__name__)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _edit(ws: Workspace, key: str, change) -> list:  # noqa: ANN001  (change: list -> list)
    """Apply `change(current list) -> new list` to `schedule.<key>` in the config file, atomically."""
    new: list = []

    def edit(doc: tomlkit.TOMLDocument) -> None:
        nonlocal new
        if "schedule" not in doc:
            doc["schedule"] = tomlkit.table()
        schedule = doc["schedule"]
        current = [list(v) if isinstance(v, list) else v for v in schedule.get(key, [])]  # type: ignore[union-attr]
        new = change([[str(p) for p in v] if isinstance(v, list) else str(v) for v in current])
        array = tomlkit.array()
        array.multiline(len(new) > 1)
        array.extend(new)
        schedule[key] = array  # type: ignore[index]

    edit_config(ws, edit)
    return new


def add_inbox(ws: Workspace, inbox: Path | str, dest: Path | str) -> bool:
    """Register `inbox` to be sorted into `dest` by the watch job; False if that pair was already there.

    Raises:
        ConfigError: the inbox is missing, already goes elsewhere, or one folder lies inside the other.
    """
    src, out = Path(inbox).expanduser().resolve(), Path(dest).expanduser().resolve()
    if not src.is_dir():
        raise ConfigError(f"inbox {src} is not a folder; create it first")
    if _inside(out, src) or _inside(src, out):
        raise ConfigError(f"{src} and {out} lie inside one another; sorted copies would be sorted again")
    if _inside(out, ws.root) or _inside(src, ws.root):
        raise ConfigError(f"keep photos outside the workspace {ws.root}")
    added = []

    def change(pairs: list) -> list:
        for s, d in pairs:
            if Path(s) == src and Path(d) != out:
                raise ConfigError(f"inbox {src} already sorts into {d}; remove it first: sortloop watch remove {src}")
            if Path(s) == src:
                return pairs
        added.append(True)
        return [*pairs, [str(src), str(out)]]

    _edit(ws, "inboxes", change)
    return bool(added)


def remove_inbox(ws: Workspace, inbox: Path | str) -> bool:
    """Stop watching `inbox` (nothing on disk is touched); False if it was not registered."""
    src = Path(inbox).expanduser().resolve()
    before = len(ws.settings.schedule.inboxes)
    after = _edit(ws, "inboxes", lambda pairs: [p for p in pairs if Path(p[0]) != src])
    return len(after) < before


def add_sorted_tree(ws: Workspace, tree: Path | str) -> bool:
    """Register a sorted tree for the scan job (user moves become corrections); False if already there."""
    path = Path(tree).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; sort into it first (sortloop sort SRC {path})")
    added = []

    def change(trees: list) -> list:
        if any(Path(t) == path for t in trees):
            return trees
        added.append(True)
        return [*trees, str(path)]

    _edit(ws, "sorted_trees", change)
    return bool(added)


def remove_sorted_tree(ws: Workspace, tree: Path | str) -> bool:
    """Stop scanning `tree` (nothing on disk is touched); False if it was not registered."""
    path = Path(tree).expanduser().resolve()
    before = len(ws.settings.schedule.sorted_trees)
    after = _edit(ws, "sorted_trees", lambda trees: [t for t in trees if Path(t) != path])
    return len(after) < before
