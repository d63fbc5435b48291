"""Sorted copies: the safe copy into a category folder, and the table recording every copy ever made.

Safe copy: the bytes go to a hidden temp file in the target folder, are fsynced, and are then hard-linked
to the final name (`os.link` fails if the name exists, so nothing is ever overwritten, even by two
sorts racing into one folder); a file system without hard links falls back to a checked rename. An
existing file with the same name and identical bytes means "already there" (skipped); different bytes
get a unique name `name (2).jpg`. The source must still be the file that was hashed: same size and mtime
before and after the copy (or, without a known mtime, the same sha256 of the bytes copied).

The records table (`<workspace>/runs/sorted_copies.parquet`, locked and atomic like the manifest) keeps,
per copy: image_id, source path and its size/mtime, destination root and path, predicted label,
confidence, score, model version, time, and — updated by `corrections.scan` — the copy's current
category, size/mtime and status, and who placed it there (`placed_by`: sort, apply, resort, undo — moves
sortloop made itself, through `loop.folders.moves` — or user, a move `scan` followed). Sort uses it to resume;
scan uses size+mtime to avoid re-hashing; apply and resort never move a copy a person placed.
Windows rules, on every copy (a sorted tree is often opened or copied on Windows): a name is made
portable first (`portable_name`: forbidden characters `<>:"/\\|?*` and control characters become `_`,
trailing dots and spaces go, device names such as `CON` or `com1.jpg` get a `_` suffix), an existing name
that differs only in case (`Chair.jpg` vs `chair.jpg`) counts as taken, and a name that would push the
full path past 260 characters is shortened (stem cut, a short hash of the original name added).
One sort at a time writes into a destination (`dest_lock`, a lock file in the workspace keyed by the
destination's real path): a second sort into the same DEST refuses at once with a clear error instead of
racing the first (two racing sorts used to record every copy twice). Records are also idempotent: a
record for a (source, dest path, image) already recorded as present is not added again.
Caveat: originals are only ever read; but a source file changed between decode and copy is reported as
a failure rather than copied, because its recorded hash would be wrong. The destination lock is per
workspace: two workspaces sorting into one DEST are not serialised. The 260-character rule is applied
to the path on this machine; the same tree under a longer root elsewhere can still exceed it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from loop.data.filenames import MAX_NAME_BYTES, WINDOWS_MAX_PATH, portable_name
from loop.errors import SortloopError

if TYPE_CHECKING:  # the records table needs pandas; the safe copy (and the standalone sorter) does not
    import pandas as pd

    from loop.workspace import Workspace

RECORD_COLUMNS: dict[str, str] = {
    "record_id": "string",
    "image_id": "string",
    "source_path": "string",
    "source_size": "Int64",
    "source_mtime_ns": "Int64",
    "dest_root": "string",
    "dest_path": "string",  # where the copy is now (scan follows moves)
    "label": "string",  # predicted label at sort time
    "confidence": "float64",
    "score": "float64",
    "flagged": "boolean",
    "model_version": "string",
    "sorted_at": "datetime64[ns, UTC]",
    "run_id": "string",
    "category": "string",  # the category folder the copy is in now (NA if moved out of all)
    "dest_size": "Int64",
    "dest_mtime_ns": "Int64",
    "status": "string",  # present / deleted / modified / gone
    "checked_at": "datetime64[ns, UTC]",
    "placed_by": "string",  # who put the copy where it is: sort, apply, resort, undo, or user (scan saw it moved)
}

COPY_CHUNK = 1 << 20
TEMP_PREFIX = ".sortloop-"  # temp copies are `.sortloop-<12 hex>.tmp` in the target folder
TEMP_NAME = re.compile(r"\.sortloop-[0-9a-f]{12}\.tmp")


def records_path(ws: Workspace) -> Path:
    return ws.runs_dir / "sorted_copies.parquet"


def load_records(ws: Workspace, dest_root: Path | None = None) -> pd.DataFrame:
    """All copy records (or those under one destination root)."""
    from loop.tables import read_table

    df = read_table(records_path(ws), RECORD_COLUMNS)
    return df if dest_root is None else records_under(df, dest_root)


def records_under(df: pd.DataFrame, dest_root: Path) -> pd.DataFrame:
    """The records of copies sorted into the destination root `dest_root`."""
    return df[df["dest_root"] == str(dest_root)].reset_index(drop=True)


def append_records(ws: Workspace, rows: list[dict]) -> pd.DataFrame:
    """Add copy records under the table lock; a row whose (source, dest path, image) is already recorded as
    present is skipped, so replaying a write (a retry after a failure) never doubles a record. Returns every
    record, as written."""
    import pandas as pd

    if not rows:
        return load_records(ws)

    from loop.tables import update_table

    new = pd.DataFrame(rows)
    key = ["source_path", "dest_path", "image_id"]

    def change(df: pd.DataFrame) -> pd.DataFrame:
        # Only records of these images can match: filtered in pandas first, as the table holds every copy ever made
        same = df["image_id"].isin(new["image_id"]) & df["status"].eq("present").fillna(False)
        known = set(df.loc[same, key].itertuples(index=False, name=None))
        fresh = new[[k not in known for k in new[key].itertuples(index=False, name=None)]].drop_duplicates(key)
        return pd.concat([df, fresh], ignore_index=True) if len(df) else fresh

    return update_table(records_path(ws), RECORD_COLUMNS, change)


@contextlib.contextmanager
def dest_lock(ws: Workspace, dest: Path) -> Iterator[None]:
    """Hold the lock that lets one sort at a time write into `dest`.

    Raises:
        SortloopError: another sort (this machine, this workspace) is writing into `dest` now.
    """
    from loop.tables import held_or_refused  # pandas: only the workspace's sort gets here

    real = Path(dest).expanduser().resolve()
    path = ws.runs_dir / "locks" / f"dest-{hashlib.sha256(str(real).encode()).hexdigest()[:16]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with held_or_refused(path, SortloopError(f"another sort is writing into {real} right now; let it finish, "
                                             "then run this one again (it continues where that one stopped)")):
        yield


def update_records(ws: Workspace, changes: dict[str, dict]) -> None:
    """Apply `{record_id: {column: value}}` under the table lock."""
    if not changes:
        return
    from loop.tables import assign_by_key, update_table

    update_table(records_path(ws), RECORD_COLUMNS, lambda df: assign_by_key(df, "record_id", changes))


def new_record_id() -> str:
    return uuid.uuid4().hex


class SourceChanged(OSError):
    """The source's bytes no longer hash to the image_id it was decoded with."""


class UnsafeFolder(OSError):
    """A target folder that is, or passes through, a symlink below the destination, or lies outside it."""


def check_target_folder(folder: Path, root: Path) -> None:
    """Refuse to write into `folder` unless it stays inside `root` (DEST): no existing folder between them
    is a symlink, and its real path lies under root's real path. `root` itself may be a symlink.

    Raises:
        UnsafeFolder: with the offending folder and what to do.
    """
    real_root = Path(os.path.realpath(root))
    path = root
    for part in folder.relative_to(root).parts:
        path = path / part
        if path.is_symlink():
            raise UnsafeFolder(f"{path} is a symlink (to {os.path.realpath(path)}); sortloop only writes inside "
                               f"{root}: replace the link with a real folder")
        if not path.exists():
            return
        if not Path(os.path.realpath(path)).is_relative_to(real_root):
            raise UnsafeFolder(f"{path} resolves outside {root}; sortloop only writes inside it")


def same_content(path: Path, size: int, image_id: str) -> bool:
    """True if `path` is a regular file with exactly these bytes (size check first, then sha256)."""
    try:
        if not path.is_file() or path.stat().st_size != size:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(COPY_CHUNK):
                digest.update(block)
        return digest.hexdigest() == image_id
    except OSError:
        return False


def unique_name(name: str, n: int) -> str:
    """`x.jpg` for n == 1, else `x (n).jpg`."""
    if n == 1:
        return name
    stem, suffix = os.path.splitext(name)
    return f"{stem} ({n}){suffix}"


def category_folder(dest: Path, label: str, src: Path, path: Path, *, keep_tree: bool) -> Path:
    """Where a photo of `src` predicted `label` goes: `dest/label/`, plus its sub-folders under `src` if
    `keep_tree` (and `src` is a folder), made portable (`portable_folder`). Every engine places copies here."""
    sub = path.parent.relative_to(src).parts if keep_tree and src.is_dir() else ()
    return portable_folder(dest / label, sub)


def remove_orphan_temps(folder: Path) -> int:
    """Delete temp copies (`.sortloop-<hex>.tmp`) left in `folder` by a copier that was killed (between
    writing the temp file and linking it); returns how many. Only call it under the destination's
    `dest_lock` (no other sort is writing there, so every such file is an orphan)."""
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            if TEMP_NAME.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


# --- Windows paths (the name rules themselves: loop.data.filenames) -----------------------------------------

MIN_NAME_ROOM = 40  # a kept sub-tree deeper than this leaves too little room for names: copy beside it


def fit_name(folder: Path, name: str) -> str:
    """`name`, shortened if `folder/name` would pass Windows' 260-character paths or 255 bytes per name.

    A shortened name keeps its extension and gets `~` + 6 hex digits of the full name, so two long names
    that share a beginning stay distinct.
    Raises:
        OSError(ENAMETOOLONG): `folder` alone leaves no room for a name.
    """
    room = WINDOWS_MAX_PATH - len(str(folder)) - 1
    if len(name) <= room and len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        return name
    stem, suffix = os.path.splitext(name)
    tag = "~" + hashlib.sha1(name.encode("utf-8")).hexdigest()[:6]
    keep = min(len(stem), room - len(suffix) - len(tag))
    if keep < 1:
        raise OSError(errno.ENAMETOOLONG, f"{folder} is too deep for a Windows path (260 characters); "
                      "sort into a folder nearer the drive's root")
    while keep > 1 and len((stem[:keep] + tag + suffix).encode("utf-8")) > MAX_NAME_BYTES:
        keep -= 1
    return stem[:keep].rstrip(". ") + tag + suffix


def portable_folder(base: Path, parts: tuple[str, ...] | list[str]) -> Path:
    """`base/<parts>` with each part made portable and matched to an existing sibling folder that differs
    only in case (`Trip` and `trip` would merge on Windows anyway); `base` itself when the result would
    leave under MIN_NAME_ROOM characters for file names in a Windows path."""
    folder = base
    for part in parts:
        name = portable_name(part)
        twin = case_twin(folder, name)
        if twin is not None and (folder / twin).is_dir():
            name = twin
        folder = folder / name
    if len(str(folder)) > WINDOWS_MAX_PATH - MIN_NAME_ROOM:
        return base
    return folder


def candidate(folder: Path, name: str, n: int) -> Path:
    """The n-th path to try for `name` in `folder` under the Windows rules (copies and moves alike):
    `unique_name` fitted to 260 characters, or the existing entry equal to it ignoring case (which the
    caller then treats as taken, or as already there if its bytes are identical)."""
    target = folder / fit_name(folder, unique_name(name, n))
    twin = case_twin(folder, target.name)
    return folder / twin if twin is not None and twin != target.name else target


def case_twin(folder: Path, name: str) -> str | None:
    """The name of the entry in `folder` that equals `name` ignoring case (itself included), or None."""
    return _listing(folder).get(name.casefold())


_listings: dict[str, tuple[int, dict[str, str]]] = {}  # folder -> (its mtime_ns, {casefolded: name})
_listings_lock = threading.Lock()
MAX_CACHED_FOLDERS = 4096


def _listing(folder: Path) -> dict[str, str]:
    """A folder's names by casefold, cached until its mtime changes (sort updates it for its own copies,
    so a folder is listed once per run, not once per copy)."""
    try:
        mtime = os.stat(folder).st_mtime_ns
    except OSError:
        return {}
    key = str(folder)
    with _listings_lock:
        hit = _listings.get(key)
        if hit is not None and hit[0] == mtime:
            return hit[1]
    names: dict[str, str] = {}
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            names.setdefault(entry.name.casefold(), entry.name)
    with _listings_lock:
        if len(_listings) >= MAX_CACHED_FOLDERS:
            _listings.clear()
        _listings[key] = (mtime, names)
    return names


def _remember(folder: Path, name: str) -> None:
    """Add a name we just created to `folder`'s cached listing (and its new mtime)."""
    with contextlib.suppress(OSError):
        names = dict(_listing_cached(folder))
        names.setdefault(name.casefold(), name)
        with _listings_lock:
            _listings[str(folder)] = (os.stat(folder).st_mtime_ns, names)


def _listing_cached(folder: Path) -> dict[str, str]:
    with _listings_lock:
        hit = _listings.get(str(folder))
    return hit[1] if hit is not None else _listing(folder)


def fsync_dir(folder: Path) -> None:
    """Make a rename/link in `folder` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(src: Path, folder: Path, name: str, image_id: str, size: int, mtime_ns: int | None) -> Path:
    """Copy `src` to a hidden temp file in `folder`, fsynced, mtime kept, and check it is the expected file:
    by its (size, mtime) before and after the copy when `mtime_ns` is given (the caller hashed these bytes
    moments ago), else by hashing the bytes copied."""
    tmp = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}.tmp"  # short: the final name may use all 255 bytes
    digest = hashlib.sha256() if mtime_ns is None else None
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            before = os.fstat(fin.fileno())
            if digest is None:
                copy_bytes(fin, fout)
            else:
                while block := fin.read(COPY_CHUNK):
                    digest.update(block)
                    fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
            drop_from_cache(fout.fileno())
            after = os.fstat(fin.fileno())
        if digest is not None:
            changed = digest.hexdigest() != image_id
        else:
            expected = (size, mtime_ns)
            changed = (before.st_size, before.st_mtime_ns) != expected or (after.st_size, after.st_mtime_ns) != expected
        if changed:
            raise SourceChanged(f"{src} changed while being sorted; run sort again")
        # timestamps are a courtesy (e.g. FAT volumes refuse some); the bytes are what matter
        with contextlib.suppress(OSError):
            shutil.copystat(src, tmp, follow_symlinks=True)
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def drop_from_cache(fd: int) -> None:
    """Let the kernel drop the page cache of a copy just fsynced (clean pages, so none are lost).

    Why: a sort writes each copy once and never reads it back. Kept cached, a sort of 50,000 photos (100 GB of
    copies) cycles all free memory through them, pushing out what the machine does read;
    and on the 2-vCPU VM of `bench/sort.py` each fresh cache page cost the copy threads CPU the decoders
    needed (the main process's system time grew 0.3 -> 1.7 s from one 200-photo sort to the fourth, the
    sort's speed 49 -> 41 photos/s; dropped, it stays at 0.3-0.5 s). A no-op where `posix_fadvise` is
    missing (Windows, macOS)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):  # advice only: a file system that refuses it keeps its cache
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


FICLONE = 0x40049409  # Linux ioctl: the new file shares the source's blocks (btrfs, XFS): no bytes copied


def copy_bytes(fin: BinaryIO, fout: BinaryIO) -> str:
    """Copy the whole of `fin` into the empty `fout`, in the kernel where it can; returns how.

    Why: a sort copies every photo, and a Python read/write loop costs the main process's cores (which
    decode the next photos) two passes of each file through user space. In order: a reflink (copy-on-write
    clone, instant), `os.copy_file_range` (in-kernel, Linux), then a plain read/write loop (Windows, macOS,
    file systems that refuse both). `sendfile` is not tried: where `copy_file_range` is missing, it is
    too (macOS sends only to sockets).
    """
    if hasattr(os, "copy_file_range"):  # Linux: a reflink is tried first
        import fcntl

        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return "reflink"
        except OSError:
            pass
        try:
            while os.copy_file_range(fin.fileno(), fout.fileno(), 1 << 30):
                pass
            return "copy_file_range"
        except OSError:  # e.g. EXDEV across file systems on old kernels, or a FUSE mount: start over
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
    while block := fin.read(COPY_CHUNK):
        fout.write(block)
    return "read_write"


def give_name(src: Path, target: Path) -> str | None:
    """Give the file at `src` the name `target`, never replacing an existing file.

    A hard link is atomic and refuses an existing name; where the file system has none (FAT, some network
    shares) the file is renamed after checking the name is free. Returns "linked" (`src` still exists),
    "renamed" (`src` is gone), or None when the name was taken meanwhile (look at it again).
    """
    try:
        os.link(src, target)
        return "linked"
    except FileExistsError:
        return None
    except OSError:
        if target.exists():
            return None
        os.replace(src, target)
        return "renamed"


def safe_copy(
    src: Path, folder: Path, name: str, *, image_id: str, size: int, mtime_ns: int | None = None,
    sync_dir: bool = True, root: Path | None = None,
) -> tuple[Path, bool]:
    """Copy `src` into `folder` as `name` without ever overwriting; returns (final path, copied?).

    copied is False when a file with identical bytes already sat at one of the candidate names
    (`name`, `name (2)`, ...), which is then returned instead. With `sync_dir=False` the caller must
    `fsync_dir(folder)` before relying on the new name surviving a power cut (sort does it per flush).
    With `mtime_ns` (the source's, when `image_id` was computed) the source is checked by size + mtime
    instead of being hashed a second time. With `root`, `folder` must stay inside it (`check_target_folder`).
    Names follow the Windows rules (see the module docstring).

    Raises:
        OSError: the copy failed (no space, permission denied, ...); no partial file is left behind.
        SourceChanged: the source's bytes no longer match `image_id`.
        UnsafeFolder: `folder` is, or passes through, a symlink below `root`, or lies outside it.
    """
    if root is not None:
        check_target_folder(folder, root)
    folder.mkdir(parents=True, exist_ok=True)
    name = portable_name(name)
    tmp: Path | None = None
    n = 1
    try:
        while True:
            target = candidate(folder, name, n)  # `chair.jpg` is taken on Windows by `Chair.jpg`
            if target.exists() or target.is_symlink():
                if same_content(target, size, image_id):
                    return target, False
                n += 1
                continue
            if tmp is None:
                tmp = _write_temp(src, folder, name, image_id, size, mtime_ns)
            placed = give_name(tmp, target)
            if placed is None:
                continue  # someone else took the name meanwhile: look at it again
            if placed == "renamed":
                tmp = None
            if sync_dir:
                fsync_dir(folder)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
                tmp = None
            _remember(folder, target.name)
            return target, True
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
