"""The `<workspace>/labelstudio/` tree is owner-only: it holds the admin's credentials, and the server's SQLite
database holds the same API token.

Folders are 0700 and files lose their group/other bits; the embedded server runs with umask 077, so what it
creates later is owner-only too; `make_owner_only` repairs trees older versions left readable.
Caveat: a hard link (a served photo made by an older version) shares its inode with the user's original,
so its mode is left as it is: changing it would change the user's file. And Django chmods the files it stores
(export snapshots, uploads) to 0644 whatever the umask (`FILE_UPLOAD_PERMISSIONS`, not settable through
Label Studio's environment). The 0700 folders around both keep them private; `up` repairs the modes.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

SERVER_UMASK = 0o077


def make_owner_only(folder: Path) -> int:
    """Folders 0700 and files without group/other bits under `folder` (itself included), never following a
    symlink; returns how many modes changed. For trees an older version left readable."""
    changed = 0
    if not folder.is_dir() or folder.is_symlink():
        return 0
    paths = [folder]
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        paths += [Path(dirpath, name) for name in dirnames + filenames]
    for path in paths:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue  # removed meanwhile (the server's temp files)
        if stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
            continue  # a hard link to a user's photo (served folder): its mode is the original's
        mode = stat.S_IMODE(st.st_mode)
        wanted = 0o700 if stat.S_ISDIR(st.st_mode) else mode & 0o700
        if mode != wanted:
            os.chmod(path, wanted)
            changed += 1
    if changed:
        logger.info("made %d file(s) and folder(s) under %s owner-only", changed, folder)
    return changed
