"""File and folder names every file system sortloop writes to accepts: the Windows rules, applied everywhere.

Why everywhere: sorted trees travel to Windows PCs and shares, so a name valid on Linux but not on Windows
(`CON.jpg`, `a:b`, a trailing dot) must be refused as a class name (`loop.data.classnames`) or made
portable as a file name (`loop.sorting.copies`). Pure string rules: no file system access.
"""

from __future__ import annotations

import unicodedata

WINDOWS_FORBIDDEN = frozenset('<>:"/\\|?*')
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", *(f"COM{i}" for i in range(10)),
                              *(f"LPT{i}" for i in range(10)), "COM¹", "COM²", "COM³", "LPT¹", "LPT²", "LPT³"})
WINDOWS_MAX_PATH = 259  # characters in a full path (MAX_PATH is 260 including the terminating NUL)
MAX_NAME_BYTES = 255  # one path component (ext4, NTFS, APFS)


def windows_name_problem(name: str) -> str | None:
    """Why `name` cannot be a file or folder name on Windows (a few words), or None if it can."""
    if any(ch in WINDOWS_FORBIDDEN or unicodedata.category(ch) == "Cc" for ch in name):
        return 'it contains a character Windows forbids in names (<>:"/\\|?* or a control character)'
    if name != name.rstrip(". "):
        return "it ends with a dot or a space (Windows drops them)"
    if _device_stem(name).upper() in WINDOWS_RESERVED:
        return "Windows reserves it for a device (CON, CONIN$, CONOUT$, PRN, AUX, NUL, COM1-9, LPT1-9, any extension)"
    return None


def portable_name(name: str) -> str:
    """`name` made valid on Windows and Linux alike: forbidden characters -> `_`, trailing dots and spaces
    dropped, a device name gets `_` after its stem (`CON.jpg` -> `CON_.jpg`). Valid names are unchanged."""
    out = "".join("_" if ch in WINDOWS_FORBIDDEN or unicodedata.category(ch) == "Cc" else ch for ch in name)
    out = out.rstrip(". ") or "_"
    stem = _device_stem(out)
    if stem.upper() in WINDOWS_RESERVED:
        out = stem + "_" + out[len(stem):]
    return out


def _device_stem(name: str) -> str:
    return name.split(".")[0].rstrip(" ")
