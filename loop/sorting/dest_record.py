"""The record a sorter keeps inside DEST: `DEST/.sortloop/copies.csv` and `DEST/.sortloop/sorter.json`.

Why inside DEST: the standalone sorter runs on a PC with no workspace, and the sorted folder is what
travels back (a share, a USB disk). `sortloop scan DEST` on the main machine imports the copies listed
here (`loop.sorting.handback`), so moves made on that PC become corrections and its flagged photos reach review.
Paths are stored relative to DEST with `/`, so the record stays true wherever DEST is mounted; the CSV
is only appended to (one fsynced batch at a time), so a crash loses at most the batch in flight, and a
rerun finds those copies identical at their destination.
`sorter.json` holds the newest bundle that sorted into DEST (its build time and model): an older bundle
refuses to sort there, so a newer bundle replaces an older one on the PC rather than the two mixing their
guesses in one tree.
The standalone sorter follows the main sort's rules inside DEST: it never writes through a symlink
(`DEST/.sortloop`, its files and `DEST/_review.csv` must be real; `record_dir`), one sorter at a time per
DEST (`sorter_lock`: an OS lock on `DEST/.sortloop/sorter.lock`, fcntl on POSIX, msvcrt on Windows, freed
when the process dies), and `_review.csv` is rebuilt whole from all records (`write_review`).
Caveat: stdlib only (the standalone sorter ships without pandas); the import into a workspace is elsewhere.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from loop.atomic import atomic_write, write_json_atomic
from loop.data.decode import Decoded
from loop.errors import SortloopError
from loop.sorting.dest_copies import COLUMNS, COPIES_CSV, RECORD_DIR, pc_unfamiliar, read_rows
from loop.sorting.pipeline import Placed, SortReport
from loop.sorting.review_csv import REVIEW_COLUMNS, REVIEW_CSV, review_row

logger = logging.getLogger(__name__)

SORTER_JSON = "sorter.json"
LOCK_FILE = "sorter.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def record_dir(dest: Path) -> Path:
    """`DEST/.sortloop`, created if missing; refused if it (or `DEST/_review.csv`) is a symlink or not what
    it should be: writing through it would write outside DEST.

    Raises:
        SortloopError: naming the link and the fix.
    """
    folder = Path(dest) / RECORD_DIR
    for path, kind in ((folder, "folder"), (Path(dest) / REVIEW_CSV, "file")):
        if path.is_symlink():
            raise SortloopError(f"{path} is a symlink; the sorter never writes through a link in DEST: remove it "
                                "and sort again")
        if path.exists() and (path.is_dir() != (kind == "folder")):
            raise SortloopError(f"{path} should be a {kind}; move it away and sort again")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def sorter_lock(dest: Path) -> Iterator[None]:
    """Hold the one-sorter-per-DEST lock (the OS frees it when the process dies, on Windows too).

    Raises:
        SortloopError: another sorter is writing into `dest` right now.
    """
    path = record_dir(dest) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
    try:
        try:
            _lock(fd)
        except OSError:
            raise SortloopError(f"another sorter is writing into {dest} right now; let it finish, then run this "
                                "one again (it continues where that one stopped)") from None
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


if os.name == "nt":
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def write_review(dest: Path, strategy: str) -> None:
    """Rebuild `DEST/_review.csv` whole (atomically, never through a link) from every flagged row of the
    DEST record, one row per copy, plus the rows a workspace's sort listed there (kept as they were)."""
    dest = Path(dest)
    path = dest / REVIEW_CSV
    rows: dict[str, dict[str, str]] = {}
    own = {str(dest.joinpath(*PurePosixPath(r["dest_path"]).parts)): r for r in read_rows(dest)}
    for row in read_review(path):
        if row.get("dest_path") and row["dest_path"] not in own:
            rows[row["dest_path"]] = row
    for final, r in own.items():
        if r.get("flagged") == "1" and Path(final).exists():
            rows[final] = review_row(final, r["source_path"], r["label"], float(r["confidence"]), float(r["score"]),
                                     strategy, r["model_version"], r["image_id"], r["sorted_at"], pc_unfamiliar(r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REVIEW_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows[k] for k in sorted(rows))
    data = text.getvalue().encode("utf-8")
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return
    with atomic_write(path) as fh:
        fh.write(data)


def read_review(path: Path) -> list[dict[str, str]]:
    """The rows of a `_review.csv` ([] if missing, a symlink or unreadable)."""
    if path.is_symlink() or not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            return [r for r in csv.DictReader(fh) if None not in r]
    except (OSError, csv.Error):
        return []


def check_bundle(dest: Path, built_at: str | None, version: str) -> None:
    """Refuse to sort into `dest` with a sorter bundle older than the newest that sorted there already.

    Bundles are ordered by when they were built (UTC ISO time), not by model version, so a bundle rebuilt
    after a rollback still replaces the one it follows. A sorter with no build time (run from a checkout)
    is never refused.
    Raises:
        SortloopError: `dest` was sorted by a newer bundle (use that one).
    """
    newest = _read_note(dest)
    if built_at and newest.get("built_at") and str(newest["built_at"]) > built_at:
        raise SortloopError(f"{dest} was sorted by a newer sorter (model {newest.get('model_version')}, built "
                            f"{newest['built_at']}) than this one (model {version}, built {built_at}); use the "
                            "newer sorter and delete this one")


def note_bundle(dest: Path, built_at: str | None, version: str) -> None:
    """Remember in `DEST/.sortloop/sorter.json` the newest bundle (and model) that sorted into `dest`."""
    newest = _read_note(dest)
    if newest.get("built_at") and (not built_at or str(newest["built_at"]) > built_at):
        return
    write_json_atomic(Path(dest) / RECORD_DIR / SORTER_JSON,
                      {"model_version": version, "built_at": built_at, "at": datetime.now(UTC).isoformat()},
                      indent=2)


def _read_note(dest: Path) -> dict:
    try:
        note = json.loads((Path(dest) / RECORD_DIR / SORTER_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


class DestRecordSink:
    """A `loop.sorting.pipeline.Sink` that remembers sorts in `DEST/.sortloop/copies.csv` (no workspace)."""

    describe = False  # pHash and EXIF time are for the manifest; the main machine computes what it needs

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        rows = read_rows(self.dest)
        self.known = {(r["source_path"], int(r["source_size"]), int(r["source_mtime_ns"])) for r in rows}
        self.known_ids = {(r["source_path"], r["image_id"]) for r in rows}

    def is_done(self, path: Path, size: int, mtime_ns: int) -> bool:
        return (str(path), size, mtime_ns) in self.known

    def seen_before(self, rec: Decoded) -> bool:
        return (str(rec.path), rec.image_id) in self.known_ids

    def flush(self, placed: list[Placed], report: SortReport) -> None:
        """Append one row per copy, fsynced (header on first write); then the flagged ones to _review.csv."""
        path = record_dir(self.dest) / COPIES_CSV
        new = not path.exists() or path.stat().st_size == 0
        fresh = [p for p in placed if (str(p.rec.path), p.rec.image_id or "") not in self.known_ids]  # a retry
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for p in fresh:
            st = p.final.stat()
            writer.writerow({
                "record_id": uuid.uuid4().hex, "image_id": p.rec.image_id, "source_path": str(p.rec.path),
                "source_size": p.rec.size_bytes, "source_mtime_ns": p.rec.mtime_ns,
                "dest_path": PurePosixPath(*p.final.relative_to(self.dest).parts).as_posix(),
                "label": p.label, "confidence": repr(p.conf), "score": repr(p.score), "flagged": int(p.flagged),
                "model_version": report.model_version, "sorted_at": p.sorted_at.isoformat(),
                "run_id": report.run_id, "dest_size": st.st_size, "dest_mtime_ns": st.st_mtime_ns,
            })
        _append_whole(path, text.getvalue().encode("utf-8"))
        for p in fresh:
            self.known.add((str(p.rec.path), p.rec.size_bytes, p.rec.mtime_ns))
            self.known_ids.add((str(p.rec.path), p.rec.image_id or ""))
        write_review(self.dest, report.flag_strategy)


def _append_whole(path: Path, data: bytes) -> None:
    """Append `data` and fsync, or leave the file as it was (a full disk must not leave half a batch)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | getattr(os, "O_BINARY", 0), 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
