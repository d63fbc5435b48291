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
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from loop.atomic import write_json_atomic
from loop.data.decode import Decoded
from loop.errors import SortloopError
from loop.sorting.pipeline import Placed, SortReport
from loop.sorting.review_csv import REVIEW_CSV, append_review

logger = logging.getLogger(__name__)

RECORD_DIR = ".sortloop"
COPIES_CSV = "copies.csv"
SORTER_JSON = "sorter.json"
COLUMNS = ["record_id", "image_id", "source_path", "source_size", "source_mtime_ns", "dest_path", "label",
           "confidence", "score", "flagged", "model_version", "sorted_at", "run_id", "dest_size", "dest_mtime_ns"]


def copies_csv(dest: Path) -> Path:
    return Path(dest) / RECORD_DIR / COPIES_CSV


def read_rows(dest: Path) -> list[dict[str, str]]:
    """Every row of `DEST/.sortloop/copies.csv`, oldest first ([] if there is none); a torn last line
    (a crash mid-append) is skipped."""
    path = copies_csv(dest)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    complete = [r for r in rows if r.get("dest_mtime_ns") not in (None, "")]
    if len(complete) < len(rows):
        logger.warning("ignoring %d incomplete lines in %s", len(rows) - len(complete), path)
    return complete


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
        path = copies_csv(self.dest)
        path.parent.mkdir(parents=True, exist_ok=True)
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
        append_review(self.dest / REVIEW_CSV, placed, report.flag_strategy, report.model_version)


def _append_whole(path: Path, data: bytes) -> None:
    """Append `data` and fsync, or leave the file as it was (a full disk must not leave half a batch)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
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
