"""Class names: the one check every entry point applies before a name becomes a label.

A class name ends up as a folder name under DEST (`DEST/<class>/`), a choice in the Label Studio config and
a key in the model artifact, and `scan` reads it back from the folder. So it must be a single, visible,
portable path component. Labels enter through ingest (class folder names), review pull (incl.
`labelstudio.allow_new_classes`), scan (user moves) and training; each calls `check_class_name` where
the name enters, so one bad name is refused there instead of breaking every later sort.
Caveat: the rules are those of the strictest file system sortloop writes to (Windows: reserved device
names, trailing dots, `<>:"|?*`; `loop.data.filenames.windows_name_problem`); a name that is valid on Linux may
still be refused here. Two names that differ only in case are one folder on Windows: the sort refuses
such a class list (`loop.sorting.pipeline.check_classes`), so a case-only or look-alike twin of an existing
class (`Chair` beside `chair`, Cyrillic `с` for Latin `c`, full-width letters) is refused where it enters
(`twin_problem`), and names are NFC-normalised there (`normal_name`: macOS writes folder names in NFD).
The length limit (`MAX_CHARS`) leaves room under Windows' 260-character paths for DEST, the kept
sub-folders and the file name.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from loop.data.filenames import windows_name_problem
from loop.errors import ClassNameError

MAX_BYTES = 255  # one path component on ext4/NTFS/APFS
MAX_CHARS = 64  # a category folder; DEST, kept sub-folders and the file name share Windows' 260 characters

# Letters of other scripts drawn like Latin ones (Unicode's confusables for the Latin alphabet, the common
# part): two class names equal after this mapping look the same in a folder list.
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "ı": "i", "ℓ": "l", "０": "0", "ǀ": "l",
})
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
    if unicodedata.normalize("NFC", name) != name:
        return "it is not in Unicode NFC form (normalise it with `normal_name`)"
    if len(name) > MAX_CHARS or len(name.encode("utf-8")) > MAX_BYTES:
        return f"it is longer than {MAX_CHARS} characters (a folder path on Windows is at most 260)"
    return windows_name_problem(name)  # <>:"|?*, a trailing dot, CON/NUL/COM1...: not a folder on Windows


def normal_name(name: str) -> str:
    """`name` in Unicode NFC, the one form a class name is stored in (`café` typed or read from a macOS
    folder in NFD is the same class)."""
    return unicodedata.normalize("NFC", name)


def look_alike_key(name: str) -> str:
    """What two names share when they look the same in a folder list: compatibility forms folded
    (full-width letters), case folded, and look-alike letters of other scripts mapped to Latin."""
    return unicodedata.normalize("NFKC", name).casefold().translate(_LOOKALIKES)


def twin_problem(name: str, existing: Iterable[str]) -> str | None:
    """Why `name` may not join the classes `existing` (differs only in case, or looks the same), or None.

    Example:
        >>> twin_problem("Chair", ["chair", "table"])
        "it differs from the class 'chair' only in case or in look-alike letters (one folder on Windows)"
    """
    key = look_alike_key(name)
    for other in existing:
        if other != name and look_alike_key(other) == key:
            return f"it differs from the class {other!r} only in case or in look-alike letters (one folder on Windows)"
    return None
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
