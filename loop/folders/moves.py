"""Moving sorted copies between category folders: one atomic, never-overwriting move, and a journal.

Why a journal: `apply` and `resort` move many copies and then record where each went. A kill -9 between
the two would leave the copy records pointing at old paths, and `scan` would then take sortloop's own
moves for a person's corrections. So every batch of moves is written first to `runs/moves.journal.json`
(atomic write), then executed, then finalised (copy records, manifest predictions, the run log in
`runs/moves/<run_id>.json`, `_review.csv`), and only then is the journal deleted. `recover` redoes an
unfinished journal; every step is idempotent, so recovering twice is harmless. Batches run under one
lock (`runs/moves.lock`), which `scan` takes too.

One move = one `renameat2(RENAME_NOREPLACE)` on Linux: atomic, and refused if the name exists, so a copy
is always in exactly one place and nothing is ever overwritten. Elsewhere (or where the file system
lacks it): `os.link(src, target)` (also refuses an existing name) then `os.unlink(src)`. The naming rules
are the sort copy's: a name held by different bytes gets `name (2).jpg`; identical bytes there count as
done (the source copy is then removed).
Caveat: on the link + unlink path, a kill -9 in the microseconds between the two leaves two names for one
file (one inode, never two copies of the bytes) until the next run's recovery removes the old name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loop.atomic import write_json_atomic
from loop.data import manifest
from loop.errors import SortloopError
from loop.sorting import copies
from loop.tables import assign_by_key, locked
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

JOURNAL_FILE = "moves.journal.json"
LOG_DIR = "moves"


@dataclass
class Move:
    """One copy to move: the record(s) that point at `src` (copies sharing a file share its fate).

    `record_updates` and `manifest_updates` are applied once the file is in place (JSON-able values);
    `old_record` / `old_manifest` keep what they replace, so a run can be undone exactly.
    """

    record_ids: list[str]
    image_id: str
    size: int
    src: str
    folder: str
    name: str
    category: str
    old_category: str | None = None
    record_updates: dict[str, Any] = field(default_factory=dict)
    old_record: dict[str, Any] = field(default_factory=dict)
    manifest_updates: dict[str, Any] = field(default_factory=dict)
    old_manifest: dict[str, Any] = field(default_factory=dict)
    final: str | None = None  # where the copy ended up (set when done; None: the source had vanished)
    error: str | None = None  # why the move failed (the copy stayed where it was)


def journal_path(ws: Workspace) -> Path:
    return ws.runs_dir / JOURNAL_FILE


def log_path(ws: Workspace, run_id: str) -> Path:
    return ws.runs_dir / LOG_DIR / f"{run_id}.json"


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + copies.new_record_id()[:6]


@contextlib.contextmanager
def exclusive(ws: Workspace) -> Iterator[None]:
    """Hold the moves lock and finish any batch a crash interrupted first."""
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    with locked(ws.runs_dir / "moves"):
        _recover_locked(ws)
        yield


def recover(ws: Workspace) -> bool:
    """Finish a batch of moves a crash interrupted; True if there was one."""
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    with locked(ws.runs_dir / "moves"):
        return _recover_locked(ws)


def _recover_locked(ws: Workspace) -> bool:
    path = journal_path(ws)
    if not path.exists():
        return False
    try:
        batch = json.loads(path.read_text())
    except ValueError:  # torn? impossible with the atomic write; refuse to guess
        raise SortloopError(f"{path} is damaged; check the sorted folders, then delete it") from None
    logger.warning("finishing the %s run %s that was interrupted", batch["kind"], batch["run_id"])
    _execute(ws, batch)
    return True


def run_batch(ws: Workspace, kind: str, run_id: str, moves: list[Move], *, dest_roots: list[str],
              info: dict[str, Any] | None = None, always_log: bool = False) -> list[Move]:
    """Journal, execute and finalise `moves` (call inside `exclusive`); returns them with `final` set.

    Args:
        kind: "apply", "resort" or "undo" (written to the run log).
        dest_roots: the sorted trees whose `_review.csv` is rebuilt afterwards.
        info: extra fields for the run log (e.g. the model version, the run undone).
        always_log: write the run log even when there is nothing to move (an undo marks its run undone).
    """
    batch = {"kind": kind, "run_id": run_id, "at": datetime.now(UTC).isoformat(), "dest_roots": dest_roots,
             "info": info or {}, "moves": [m.__dict__ for m in moves]}
    if moves or always_log:
        write_json_atomic(journal_path(ws), batch, default=str)
    done = _execute(ws, batch, always_log)
    return [Move(**m) for m in done["moves"]]


def _execute(ws: Workspace, batch: dict, always_log: bool = True) -> dict:
    """Do every move (idempotently), then log the run, record the moves (copy records, manifest), rebuild
    `_review.csv`, and only then drop the journal: a crash at any point is finished by `recover`."""
    from loop.sorting.review_csv import write_review_csv

    for m in batch["moves"]:
        try:
            for root in batch["dest_roots"]:  # never into a symlinked category folder (outside DEST)
                if Path(m["folder"]).is_relative_to(root):
                    copies.check_target_folder(Path(m["folder"]), Path(root))
            final = move_copy(Path(m["src"]), Path(m["folder"]), m["name"], image_id=m["image_id"],
                              size=m["size"])
        except OSError as exc:  # permission denied, another file system...: this copy stays, the rest go on
            final, m["error"] = None, f"{exc.strerror or exc}"
            logger.warning("could not move %s: %s", m["src"], m["error"])
        m["final"] = None if final is None else str(final)
        if final is None and not m.get("error"):
            logger.warning("%s is no longer where it was; not moved", m["src"])
    moves = batch["moves"]
    if moves or always_log:
        write_json_atomic(log_path(ws, batch["run_id"]), batch, default=str, indent=1)
    if moves:
        now = manifest.now_utc()
        changes: dict[str, dict] = {}
        for m in moves:
            if m["final"] is None:
                continue
            st = os.stat(m["final"])
            for rid in m["record_ids"]:
                changes[rid] = {"dest_path": m["final"], "category": m["category"], "dest_size": st.st_size,
                                "dest_mtime_ns": st.st_mtime_ns, "checked_at": now, **m["record_updates"]}
        copies.update_records(ws, changes)
        _update_manifest(ws, {m["image_id"]: m["manifest_updates"] for m in moves
                              if m["final"] is not None and m["manifest_updates"]})
        manifest.follow_copies(ws, {m["src"]: m["final"] for m in moves if m["final"] not in (None, m["src"])})
    for root in batch["dest_roots"]:
        if Path(root).is_dir():
            write_review_csv(ws, Path(root))
    journal_path(ws).unlink(missing_ok=True)
    return batch


def _update_manifest(ws: Workspace, updates: dict[str, dict[str, Any]]) -> None:
    if not updates:
        return

    manifest.update(ws, lambda df: assign_by_key(df, "image_id", updates))


def list_logs(ws: Workspace, kind: str | None = None) -> list[dict]:
    """Every logged run (optionally of one kind), oldest first."""
    folder = ws.runs_dir / LOG_DIR
    if not folder.is_dir():
        return []
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [r for r in runs if kind is None or r["kind"] == kind]


# --- one move ---------------------------------------------------------------------------------------------


def move_copy(src: Path, folder: Path, name: str, *, image_id: str, size: int) -> Path | None:
    """Move the copy at `src` into `folder` as `name` (or `name (n)`), never overwriting; idempotent.

    Returns the final path; None if `src` is gone and no identical file sits at a candidate name (a
    person moved or deleted it). A candidate holding identical bytes (or `src`'s own inode, left by an
    interrupted move) counts as done and `src` is removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        target = copies.candidate(folder, name, n)  # Windows' rules: case-insensitive, 260 characters
        if target == src:
            return src
        if target.exists() or target.is_symlink():
            if _same_file(src, target) or copies.same_content(target, size, image_id):
                if src.exists():
                    os.unlink(src)
                    copies.fsync_dir(src.parent)
                return target
            n += 1
            continue
        if not src.exists():
            return None
        try:
            if rename_noreplace(src, target):
                copies.fsync_dir(folder)
                copies.fsync_dir(src.parent)
                return target
        except FileExistsError:
            continue  # someone else took the name meanwhile: look at it again
        placed = copies.give_name(src, target)
        if placed is None:
            continue  # someone else took the name meanwhile: look at it again
        copies.fsync_dir(folder)
        if placed == "linked":
            os.unlink(src)
        copies.fsync_dir(src.parent)
        return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _load_renameat2() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):  # glibc older than 2.28, musl without it
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, target: Path) -> bool:
    """Rename `src` to `target` atomically unless `target` exists (Linux `renameat2`).

    Returns False when this system or file system cannot do it (the caller falls back to link + unlink).
    Raises:
        FileExistsError: `target` exists. OSError: any other failure of the rename itself.
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):  # not here: use the fallback
        return False
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(target))
    raise OSError(err, os.strerror(err), str(src))
