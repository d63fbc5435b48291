"""The served folder: the only files Label Studio may show, exactly the photos sortloop pushed.

Label Studio's local-files storage serves any file under a storage's folder to a logged-in user, and it
follows symlinks. So photos are never served in place: each pushed photo gets a read-only entry
`<served>/photos/<sha256><.ext>`, a COPY (never a hard link: a photo rewritten in place would change a
linked entry, and a link keeps the original's permission bits), checked to hash to the photo's image_id
before it is published, and the server's document root is `<served>` with ONE storage on
`<served>/photos`. Nothing else is ever put there, so nothing else (credentials, the server's database,
a symlink's target, the rest of a photo folder) can be fetched. The served folder must be empty or
sortloop's own (the marker file `MARKER`): an existing folder with other contents is refused, and its
modes are never changed. Cost of copying: the disk space of the photos in review, and one read + write per
pushed photo (`bench/served_copy.py` measures it against hard links). Entries are not fsynced (they can be
made again; a torn one fails the hash check of the next push).

`<served>` is `labelstudio.served_dir`, by default `<workspace>/labelstudio/served` (owner-only, like the
rest of that tree). A team server must see the same folder at the same path (docker-compose mounts one
volume at `/served` in both containers); with `labelstudio.url` set its entries are world-readable
(0755/0644), because that server runs as another user, and they hold only photos the team reviews.
Caveat: an entry published by an earlier version as a hard link is re-made as a copy at the next push
(`publish` re-checks every entry it is asked for: a hard link or an entry whose size changed is replaced).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import uuid
from pathlib import Path

from labeling import payloads
from loop.errors import ConfigError, SortloopError
from loop.sorting.copies import COPY_CHUNK, same_content
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

STAGING = ".staging"  # beside the storage folder, never under it: half-made entries are never servable
MARKER = ".sortloop-served"  # in the served folder: sortloop made it, so its contents are sortloop's
_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")


class PublishError(SortloopError):
    """A photo that may not or cannot be served; the message starts with the photo's path."""


def served_dir(ws: Workspace) -> Path:
    """The folder Label Studio serves from (its LOCAL_FILES_DOCUMENT_ROOT); checked, see `check_served_dir`."""
    configured = ws.settings.labelstudio.served_dir
    default = ws.labelstudio_dir / "served"
    return check_served_dir(Path(configured).expanduser() if configured else default, ws, default=default)


def check_served_dir(path: Path, ws: Workspace, *, default: Path) -> Path:
    """Refuse a served folder that could expose more than the pushed photos.

    Raises:
        ConfigError: relative, a symlink, containing the workspace, or inside the workspace elsewhere than
            the default (the workspace holds the manifest, credentials and the server's database).
    """
    if not path.is_absolute():
        raise ConfigError(f"labelstudio.served_dir must be an absolute path (got {str(path)!r})")
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(ws.root))
    if real != Path(os.path.abspath(path)):
        raise ConfigError(f"labelstudio.served_dir {path} is or passes through a symlink (to {real}); give the "
                          "real folder")
    if real == root or root.is_relative_to(real):
        raise ConfigError(f"labelstudio.served_dir {path} contains the workspace {ws.root} (its credentials and "
                          "the server's database would be servable); use an empty folder of its own")
    if real.is_relative_to(root) and real != Path(os.path.realpath(default)):
        raise ConfigError(f"labelstudio.served_dir {path} lies inside the workspace; leave it empty (default "
                          f"{default}) or use a folder outside {ws.root}")
    return real


def storage_dir(ws: Workspace) -> Path:
    """The one folder the project's local-files storage covers: `<served>/photos`."""
    return served_dir(ws) / payloads.SERVED_SUBDIR


def shared(ws: Workspace) -> bool:
    """True when a team server (`labelstudio.url`, likely another user) must read the entries."""
    return bool(ws.settings.labelstudio.url)


def served_name(image_id: str, path: str) -> str:
    """`<sha256><.ext>` (the extension lower-cased, kept so the server sends the right content type)."""
    suffix = Path(path).suffix.lower()
    return image_id + (suffix if _SUFFIX.fullmatch(suffix) else ".img")


def _mkdir(folder: Path, mode: int) -> None:
    folder.mkdir(mode=mode, exist_ok=True)
    if folder.is_symlink() or not folder.is_dir():
        raise ConfigError(f"{folder} must be a real folder (it is a symlink or a file); remove it")
    os.chmod(folder, mode)


def prepare(ws: Workspace) -> Path:
    """Create the served folder and its storage folder with their modes; returns the storage folder.

    The workspace's `labelstudio/` folder is made owner-only on the way (it holds credentials).
    """
    ws.labelstudio_dir.parent.mkdir(parents=True, exist_ok=True)
    _mkdir(ws.labelstudio_dir, 0o700)
    mode = 0o755 if shared(ws) else 0o700
    root = served_dir(ws)
    root.parent.mkdir(parents=True, exist_ok=True)
    check_ours(root)
    _mkdir(root, mode)
    marker = root / MARKER
    if not marker.exists():
        marker.write_text("sortloop's served folder: only photos pushed for review; do not put files here\n")
    _mkdir(root / payloads.SERVED_SUBDIR, mode)
    _mkdir(root / STAGING, 0o700)
    return root / payloads.SERVED_SUBDIR


def check_ours(root: Path) -> None:
    """Refuse a served folder that exists, is not empty and has no `MARKER`: its contents (someone's
    photos, documents) would become servable, and its modes would be changed.

    Raises:
        ConfigError: naming the folder and the fix.
    """
    try:
        entries = {p.name for p in root.iterdir()}
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"labelstudio.served_dir {root} cannot be read ({exc.strerror or exc})") from None
    if entries and MARKER not in entries:
        raise ConfigError(f"labelstudio.served_dir {root} is an existing folder with other files in it (e.g. "
                          f"{sorted(entries)[0]!r}); they would be served: give an empty or new folder")


def source_problem(path: Path) -> str | None:
    """Why the photo at `path` may not be published, or None.

    A symlink is followed only while its target stays in the folder the photo was found in: a link
    leaving it (`photo.jpg -> ~/secret.txt`) is refused, whatever it points at.
    """
    try:
        st = path.lstat()
    except OSError as exc:
        return f"missing or unreadable ({exc.strerror or exc})"
    if stat.S_ISLNK(st.st_mode):
        real = Path(os.path.realpath(path))
        folder = Path(os.path.realpath(path.parent))
        if not real.is_relative_to(folder):
            return f"a symlink to {real}, outside its folder {path.parent}; not served"
        try:
            st = real.stat()
        except OSError as exc:
            return f"a broken symlink ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def publish(ws: Workspace, photos: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Make photos servable: `photos` maps image_id -> path where it was found.

    Returns (served names by image_id, reasons by image_id for the photos refused: a symlink leaving its
    folder, not a regular file, missing, changed since it was added...). Idempotent: existing entries
    are kept.

    Raises:
        ConfigError: the served folder itself is unsafe (see `check_served_dir`).
    """
    storage = prepare(ws)
    file_mode = 0o644 if shared(ws) else 0o600
    names, refused = {}, {}
    for image_id, path in photos.items():
        try:
            names[image_id] = _publish_one(storage, image_id, path, file_mode)
        except PublishError as exc:
            refused[image_id] = str(exc)
            logger.warning("not sent for review: %s", exc)
    return names, refused


def _copy_hashed(src: Path, dst: Path, image_id: str, mode: int) -> bool:
    """Copy `src` to a new file `dst` (permission bits `mode`), hashing the bytes as they pass; True if they
    hash to `image_id`. Not fsynced: an entry torn by a power cut fails the check of `_publish_one` at the
    next push and is made again."""
    digest = hashlib.sha256()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        if hasattr(os, "fchmod"):
            os.fchmod(fout.fileno(), mode)  # whatever the umask
        while block := fin.read(COPY_CHUNK):
            digest.update(block)
            fout.write(block)
    return digest.hexdigest() == image_id


def _publish_one(storage: Path, image_id: str, path: str, file_mode: int) -> str:
    """One entry: copied into a staging folder outside the storage, checked to hash to `image_id`, then
    linked into place under its final name; returns that name. An existing entry is kept only if it is a
    copy (one link) that still hashes to `image_id`."""
    name = served_name(image_id, path)
    target = storage / name
    with contextlib.suppress(OSError):
        st = target.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and same_content(target, st.st_size, image_id):
            return name  # our own copy, unchanged
        target.unlink()  # a hard link of an earlier version, or changed: made again below
    src = Path(path)
    problem = source_problem(src)
    if problem is not None:
        raise PublishError(f"{path}: {problem}")
    real = Path(os.path.realpath(src))
    staging = storage.parent / STAGING
    staged = staging / f"{name}.{uuid.uuid4().hex[:8]}"
    try:
        if not _copy_hashed(real, staged, image_id, file_mode):
            raise PublishError(f"{path}: its bytes changed since it was added (no longer {image_id[:12]}...); "
                               "run `sortloop ingest` on its folder again")
        with contextlib.suppress(FileExistsError):  # a concurrent push published it meanwhile
            os.link(staged, target)
    except OSError as exc:
        raise PublishError(f"{path}: cannot be published for review ({exc.strerror or exc})") from None
    finally:
        staged.unlink(missing_ok=True)
    return name
