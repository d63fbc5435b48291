"""Class names: the one check every entry point applies before a name becomes a label.

A class name ends up as a folder name under DEST (`DEST/<class>/`), a choice in the Label Studio config and
a key in the model artifact, and `scan` reads it back from the folder. So it must be a single, visible,
portable path component. Labels enter through ingest (class folder names), review pull (incl.
`labelstudio.allow_new_classes`), scan (user moves) and training; each calls `check_class_name` where
the name enters, so one bad name is refused there instead of breaking every later sort.
Caveat: the rules are those of the strictest file system sortloop writes to (Windows: reserved device
names, trailing dots, `<>:"|?*`; `loop.data.filenames.windows_name_problem`); a name that is valid on Linux may
still be refused here. Two names that differ only in case are one folder on Windows: the sort refuses
such a class list (`loop.sorting.pipeline.check_classes`).
"""

from __future__ import annotations

import unicodedata

from loop.data.filenames import windows_name_problem
from loop.errors import ClassNameError

MAX_BYTES = 255  # one path component on ext4/NTFS/APFS
OTHER_LABEL = "_other"  # "none of these": a label, never a class (a class cannot start with "_")


def class_name_problem(name: object) -> str | None:
    """Why `name` cannot be a class (a few words), or None if it can."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if name in (".", ".."):
        return "it is a relative folder reference"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if name.startswith((".", "_")):
        return "it starts with '.' or '_' (hidden or reserved folders under DEST)"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        return "it contains a control character"
    if name != name.strip():
        return "it starts or ends with white space"
    if len(name.encode("utf-8")) > MAX_BYTES:
        return f"it is longer than {MAX_BYTES} bytes"
    return windows_name_problem(name)  # <>:"|?*, a trailing dot, CON/NUL/COM1...: not a folder on Windows


def check_label(name: object) -> str:
    """Return `name` if it can be a label: a class name, or OTHER_LABEL ("none of these"); else raise."""
    return OTHER_LABEL if name == OTHER_LABEL else check_class_name(name)


def check_class_name(name: object) -> str:
    """Return `name` if it can be a class (a category folder under DEST), else raise ClassNameError.

    Example:
        >>> check_class_name("chair")
        'chair'
    """
    problem = class_name_problem(name)
    if problem is not None:
        raise ClassNameError(f"{name!r} cannot be a class name: {problem}; use a plain name such as 'chair'")
    return str(name)
