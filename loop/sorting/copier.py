"""The sort's copier: copies in background threads, results counted and queued in submission order.

Why apart from `loop.sorting.pipeline`: the pipeline decides what goes where; this keeps the file I/O (and fsync)
overlapping inference, and records, in submission order, copies made here or reported by a remote engine
(`done`: a Ray worker already made the copy), so both engines count and record copies the same way.
Caveat: `collect` must be called from the thread that submits (the pending list is not locked).
"""

from __future__ import annotations

import logging
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loop.data.decode import Decoded
from loop.errors import DiskFullError, is_disk_full
from loop.sorting import copies
from loop.sorting.report import SortReport

logger = logging.getLogger(__name__)

# Copies in flight at once, one thread each: a copy mostly waits for its fsync (the disk), not for a CPU, and a
# disk or a network share serves several at once; one thread made the sort wait ~2 ms a photo for copies at
# the end of a `bench/sort.py` round on a busy disk. Each destination folder keeps to one lane, so the names
# in a folder (`name (2)`, ...) are still chosen in submission order, and no two threads list one folder.
COPY_LANES = 4


@dataclass
class Placed:
    """One photo sorted: where its copy is (`copied` False: identical bytes were already there)."""

    rec: Decoded
    label: str  # the model's best class
    conf: float
    score: float
    flagged: bool
    final: Path
    copied: bool
    sorted_at: datetime
    category: str = ""  # the folder under DEST it went to: `label`, or the unfamiliar folder ("" = `label`)
    unfamiliar: bool = False  # the unfamiliar score sent it to the unfamiliar folder (loop.scoring.unfamiliar)

    @property
    def folder(self) -> str:
        return self.category or self.label


Done = tuple[Path, bool] | OSError | None  # a remote copy: (final path, copied?), its error, or none made


@dataclass
class _Job:
    rec: Decoded
    label: str
    conf: float
    score: float
    flagged: bool
    future: Future
    category: str
    unfamiliar: bool


class Copier:
    """Copies files in background threads (`COPY_LANES`, a destination folder per lane), so file I/O and fsync
    overlap inference; results are counted and queued for the sink in the main thread, in submission order,
    by `collect`."""

    def __init__(self, report: SortReport, pending: list[Placed]) -> None:
        self.report, self.pending = report, pending
        self.lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix="sortloop-copy") for _ in range(COPY_LANES)]
        self.jobs: deque[_Job] = deque()
        self.disk_full: OSError | None = None  # the first "no space left" of a copy: the run stops

    def submit(self, rec: Decoded, label: str, conf: float, score: float, flagged: bool, folder: Path,
               done: Done = None, *, category: str = "", unfamiliar: bool = False) -> None:
        """Copy `rec` into `folder`; or, with `done`, record a copy a remote worker made (or failed to make).
        `category` names the folder under DEST (default: `label`)."""
        if done is None:
            lane = self.lanes[zlib.crc32(str(folder).casefold().encode()) % len(self.lanes)]  # casefold: Windows
            future = lane.submit(copies.safe_copy, rec.path, folder, rec.path.name, image_id=rec.image_id or "",
                                 size=rec.size_bytes, mtime_ns=rec.mtime_ns, sync_dir=False,
                                 root=Path(self.report.dest))
        else:
            future = Future()
            if isinstance(done, OSError):
                future.set_exception(done)
            else:
                future.set_result(done)
        self.jobs.append(_Job(rec, label, conf, score, flagged, future, category or label, unfamiliar))

    def collect(self, wait: bool = False) -> None:
        """Record finished copies (all of them if `wait`); re-raises anything but an OSError."""
        while self.jobs and (wait or self.jobs[0].future.done()):
            job = self.jobs.popleft()
            try:
                final, copied = job.future.result()
            except OSError as exc:  # includes SourceChanged; the file is reported, the run goes on
                if is_disk_full(exc):  # not a failure of this file: the run stops, one line says why
                    self.report.left_for_rerun += 1
                    logger.debug("copy of %s stopped: disk full", job.rec.path)
                    if self.disk_full is None:
                        self.disk_full = DiskFullError(self.report.dest)
                    continue
                self.report.failed.append((str(job.rec.path), f"copy failed ({exc.strerror or exc})"))
                logger.warning("copy of %s failed: %s", job.rec.path, exc)
                continue
            self._record(job, final, copied)

    def close(self) -> None:
        """Let copies in flight finish and record the ones that succeeded (used on the way out)."""
        for lane in self.lanes:
            lane.shutdown(wait=True)
        while self.jobs:
            job = self.jobs.popleft()
            if not job.future.cancelled() and job.future.exception() is None:
                self._record(job, *job.future.result())

    def _record(self, job: _Job, final: Path, copied: bool) -> None:
        report = self.report
        if copied:
            report.copied += 1
            report.renamed += final.name != job.rec.path.name
        else:
            report.identical_existing += 1
        report.per_label[job.category] = report.per_label.get(job.category, 0) + 1
        report.flagged += job.flagged
        report.unfamiliar += job.unfamiliar
        self.pending.append(Placed(job.rec, job.label, job.conf, job.score, job.flagged, final, copied,
                                   datetime.now(UTC), job.category, job.unfamiliar))
