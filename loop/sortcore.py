"""The sort pipeline itself, without a workspace: decode -> predict -> flag -> safe copy -> `_review.csv`.

Why a module of its own: `sortloop sort` (`loop.sort`, which adds the manifest, the copy-records table and
the run log) and the standalone sorter frozen for PCs without Python (`loop.app.sorter`, which keeps its
record inside DEST) must give the same labels, confidences and flags on the same photos, so both run
exactly this code. It needs only numpy, Pillow and ONNX Runtime: no pandas, no torch, no workspace.
What differs is a `Sink`: which files count as sorted before, and where each flushed batch is recorded
(the workspace's tables, or a record inside DEST).

How it is fast: files stream through `loop.decode` (worker processes, a bounded number in flight), the
model runs on batches, and copies happen in a background thread, so decoding, inference and file I/O
overlap. Caveat: the model is fixed when the run starts (a deploy during a run is picked up by the next).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from loop import copies
from loop.artifact import Predictor, read_spec
from loop.classnames import class_name_problem
from loop.decode import Decoded, decode_stream, default_workers
from loop.errors import DiskFullError, ModelError, SortloopError, is_disk_full
from loop.images import iter_image_files
from loop.progress import ProgressCallback, no_progress
from loop.select import get_strategy

logger = logging.getLogger(__name__)

REVIEW_CSV = "_review.csv"
REVIEW_COLUMNS = ["dest_path", "source_path", "pred_label", "pred_conf", "score", "strategy", "model_version",
                  "image_id", "sorted_at"]
FLUSH_EVERY = 256  # images between flushes of the records (a crash loses no copies: a rerun finds them
#                    identical at their destination and records them then)


@dataclass
class SortOptions:
    """How to sort: the `[sort]` settings of a workspace, or the ones a bundle carries in its model.json."""

    flag_strategy: str = "least_confidence"
    flag_threshold: float = 0.5
    keep_tree: bool = True
    batch_size: int = 32
    workers: int = 2
    runtime: str = "onnx"
    precision: str = "float"  # "auto": the INT8 ONNX model when it passed its gate (loop.artifact.PRECISIONS)


@dataclass
class SortReport:
    """What one sort run did. `failed` lists (path, reason) for every file that was not sorted."""

    src: str = ""
    dest: str = ""
    model_version: str = ""
    run_id: str = ""
    seen: int = 0
    copied: int = 0
    already_sorted: int = 0
    identical_existing: int = 0  # an identical file already sat at the destination name
    renamed: int = 0  # copied under a unique name because a different file had the name
    flagged: int = 0
    registered: int = 0  # new images added to the manifest
    failed: list[tuple[str, str]] = field(default_factory=list)
    per_label: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True if every file was sorted (or had been before)."""
        return not self.failed

    def summary(self) -> str:
        rate = (self.copied + self.identical_existing) / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"sorted {self.seen} files from {self.src} into {self.dest} with model {self.model_version}: "
            f"{self.copied} copied ({self.renamed} under a new name), {self.identical_existing} already there, "
            f"{self.already_sorted} sorted before, {self.flagged} flagged for review, {len(self.failed)} failed "
            f"({self.seconds:.1f} s" + (f", {rate:.1f} images/s)" if rate > 0 else ")"),
        ]
        if self.per_label:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(self.per_label.items())))
        if self.failed:
            reasons: dict[str, int] = {}
            for _, reason in self.failed:
                key = reason.split(" (")[0]
                reasons[key] = reasons.get(key, 0) + 1
            lines.append("  failures: " + ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())))
        return "\n".join(lines)


@dataclass
class Placed:
    """One photo sorted: where its copy is (`copied` False: identical bytes were already there)."""

    rec: Decoded
    label: str
    conf: float
    score: float
    flagged: bool
    final: Path
    copied: bool
    sorted_at: datetime


class Sink(Protocol):
    """Where a sort keeps its memory: what was sorted before, and the record of each flushed batch."""

    describe: bool  # compute pHash and EXIF time per image (the manifest wants them; a DEST record does not)

    def is_done(self, path: Path, size: int, mtime_ns: int) -> bool:
        """True if this source file (same path, size, mtime) was sorted into DEST before: not read again."""

    def seen_before(self, rec: Decoded) -> bool:
        """True if this path with these bytes was sorted before (only touched): not copied again."""

    def flush(self, placed: list[Placed], report: SortReport) -> None:
        """Record durable copies (in order, after their folders were fsynced) and list the flagged ones in
        `DEST/_review.csv`."""


def sort_into(
    src: Path, dest: Path, model_dir: Path, sink: Sink, report: SortReport, *,
    options: SortOptions, on_progress: ProgressCallback | None = None,
) -> SortReport:
    """Sort every image under `src` into `dest/<predicted label>/` with the artifact in `model_dir`.

    The caller checked the folders (`check_folders`) and created `dest`. Copies are recorded through
    `sink` (which also lists the flagged ones in `dest/_review.csv`). Fills and returns `report`.

    Raises:
        ModelError: the artifact does not load or has class names that cannot be folders.
        DiskFullError: a disk filled up; what was copied before is recorded through `sink` first.
    """
    on_progress = on_progress or no_progress
    strategy = get_strategy(options.flag_strategy)
    image_size = int(read_spec(model_dir)["image_size"])
    skip_dirs = [dest] if is_within(dest, src) else []
    processed = 0

    def todo() -> Iterator[Path]:
        nonlocal processed
        for path in iter_image_files(src, skip=skip_dirs):
            try:
                st = path.stat()
                if sink.is_done(path, st.st_size, st.st_mtime_ns):
                    report.already_sorted += 1
                    processed += 1
                    continue
            except OSError:
                pass  # the decoder reports it with the reason
            yield path

    # Start decoding now: the worker processes spawn and decode the first batches while the model loads
    # and the tree is counted. Two batches in flight (~10 MB at 224 px) give slack for uneven decode times.
    workers, chunk = default_workers(options.workers), 4
    stream = decode_stream(todo(), image_size, workers=workers, chunk=chunk,
                           prefetch=max(4 * workers, 2 * options.batch_size // chunk), describe=sink.describe)
    try:
        predictor = Predictor(model_dir, options.runtime, precision=options.precision)
        check_classes(predictor.classes)
        check_category_folders(dest, predictor.classes)
        total = sum(1 for _ in iter_image_files(src, skip=skip_dirs))
    except BaseException:
        stream.close()
        raise
    report.model_version = predictor.version
    logger.info("sorting %s -> %s with %r (run %s)", src, dest, predictor, report.run_id)
    on_progress(processed, total)

    pending: list[Placed] = []
    copier = _Copier(report, pending)
    disk_full: OSError | None = None  # a full disk stops the run; what was copied is recorded, then reported
    try:
        for batch, failures in _batches(stream, options.batch_size, report):
            if batch:
                probs = predictor.predict(np.stack([rec.pixels for rec in batch]))
                scores = strategy(probs)
                for rec, p, s in zip(batch, probs, scores, strict=True):
                    if sink.seen_before(rec):
                        report.already_sorted += 1
                        continue
                    k = int(np.argmax(p))
                    label = predictor.classes[k]
                    sub = rec.path.parent.relative_to(src).parts if options.keep_tree and src.is_dir() else ()
                    copier.submit(rec, label, float(p[k]), float(s), float(s) >= options.flag_threshold,
                                  copies.portable_folder(dest / label, sub))
            copier.collect()
            processed += len(batch) + failures
            report.seen = processed
            on_progress(processed, total)
            if copier.disk_full:
                break
            if len(pending) >= FLUSH_EVERY:
                copier.collect(wait=True)
                _flush(sink, pending, report)
        copier.collect(wait=True)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        disk_full = exc
    finally:
        stream.close()
        copier.close()  # finishes copies in flight (and records them) even when interrupted
        report.seen = processed
        try:
            _flush(sink, pending, report)  # again after a failed flush: the sinks' writes are idempotent
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            disk_full = disk_full or exc
    disk_full = disk_full or copier.disk_full
    if disk_full is not None:
        where = getattr(disk_full, "path", None) or disk_full.filename or dest
        raise DiskFullError(where, summary=report.summary()) from None
    on_progress(processed, total)
    return report


def check_folders(src: Path, dest: Path) -> tuple[Path, Path]:
    """Absolute `src` and `dest`, or SortloopError if sorting `src` into `dest` makes no sense."""
    src, dest = src.expanduser().absolute(), dest.expanduser().absolute()
    if not src.exists():
        raise SortloopError(f"{src} does not exist; give the folder of photos to sort")
    if src.resolve() == dest.resolve():
        raise SortloopError("source and destination are the same folder; sort into a different folder")
    if src.is_dir() and is_within(src, dest):
        raise SortloopError(f"{src} is inside the destination {dest}; sort it into a folder outside it")
    return src, dest


def check_classes(classes: list[str]) -> None:
    """Class names become folder names under DEST (on Windows too), and `scan` reads them back: refuse
    unusable ones (`loop.classnames`), and two names that differ only in case (one folder on Windows)."""
    seen: dict[str, str] = {}
    for name in classes:
        problem = class_name_problem(name)
        if problem is not None:
            raise ModelError(f"the deployed model's class {name!r} cannot be a category folder ({problem}); "
                             "fix the label (`sortloop train` refuses such labels) and retrain, or "
                             "`sortloop rollback`")
        twin = seen.setdefault(name.casefold(), name)
        if twin != name:
            raise ModelError(f"class names {twin!r} and {name!r} differ only in case: one folder on Windows; "
                             "merge or rename them and retrain")


def check_category_folders(dest: Path, classes: list[str]) -> None:
    """Before any copy: a category folder that is a symlink or resolves outside DEST is refused."""
    for name in classes:
        try:
            copies.check_target_folder(dest / name, dest)
        except copies.UnsafeFolder as exc:
            raise SortloopError(f"category folder refused: {exc}") from None


def is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.resolve().relative_to(outer.resolve())
        return True
    except ValueError:
        return False


def review_row(dest_path: str, source_path: str, label: str, conf: float, score: float, strategy: str,
               version: str, image_id: str, sorted_at: str) -> dict[str, str]:
    """One line of `_review.csv` (columns REVIEW_COLUMNS), as both the workspace and a DEST record write it."""
    return {"dest_path": dest_path, "source_path": source_path, "pred_label": label, "pred_conf": f"{conf:.4f}",
            "score": f"{score:.4f}", "strategy": strategy, "model_version": version, "image_id": image_id,
            "sorted_at": sorted_at}


def append_review(path: Path, placed: list[Placed], strategy: str, version: str) -> None:
    """Append the flagged copies to `DEST/_review.csv` (header on first write), durably: the standalone
    sorter's review list (a workspace rebuilds its list from the records instead: `loop.review_list`)."""
    rows = [p for p in placed if p.flagged]
    if not rows:
        return
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=REVIEW_COLUMNS)
        if new:
            writer.writeheader()
        for p in rows:
            writer.writerow(review_row(str(p.final), str(p.rec.path), p.label, p.conf, p.score, strategy, version,
                                       p.rec.image_id or "", p.sorted_at.isoformat()))
        fh.flush()
        os.fsync(fh.fileno())


# --- helpers -----------------------------------------------------------------------------------------


def _batches(stream: Iterator[Decoded], size: int, report: SortReport) -> Iterator[tuple[list[Decoded], int]]:
    """Group decoded files into batches of `size`; failures go straight to the report.

    Yields (batch, failures since the previous yield) so the caller can count progress.
    """
    batch: list[Decoded] = []
    failures = 0
    for rec in stream:
        if rec.ok:
            batch.append(rec)
        else:
            report.failed.append((str(rec.path), rec.error or "unreadable"))
            logger.info("skipped %s: %s", rec.path, rec.error)
            failures += 1
        if len(batch) >= size or failures >= size:
            yield batch, failures
            batch, failures = [], 0
    if batch or failures:
        yield batch, failures


def _flush(sink: Sink, pending: list[Placed], report: SortReport) -> None:
    """Copies made durable (directory fsync), then the sink's records and review list: a crash in between
    only means a rerun re-finds identical copies."""
    if not pending:
        return
    for folder in {p.final.parent for p in pending}:
        copies.fsync_dir(folder)
    sink.flush(list(pending), report)
    pending.clear()


@dataclass
class _Job:
    rec: Decoded
    label: str
    conf: float
    score: float
    flagged: bool
    future: Future


class _Copier:
    """Copies files in one background thread (in submission order), so file I/O and fsync overlap
    inference; results are counted and queued for the sink in the main thread, in order, by `collect`."""

    def __init__(self, report: SortReport, pending: list[Placed]) -> None:
        self.report, self.pending = report, pending
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sortloop-copy")
        self.jobs: deque[_Job] = deque()
        self.disk_full: OSError | None = None  # the first "no space left" of a copy: the run stops

    def submit(self, rec: Decoded, label: str, conf: float, score: float, flagged: bool, folder: Path) -> None:
        future = self.pool.submit(copies.safe_copy, rec.path, folder, rec.path.name, image_id=rec.image_id or "",
                                  size=rec.size_bytes, mtime_ns=rec.mtime_ns, sync_dir=False,
                                  root=Path(self.report.dest))
        self.jobs.append(_Job(rec, label, conf, score, flagged, future))

    def collect(self, wait: bool = False) -> None:
        """Record finished copies (all of them if `wait`); re-raises anything but an OSError."""
        while self.jobs and (wait or self.jobs[0].future.done()):
            job = self.jobs.popleft()
            try:
                final, copied = job.future.result()
            except OSError as exc:  # includes SourceChanged; the file is reported, the run goes on
                self.report.failed.append((str(job.rec.path), f"copy failed ({exc.strerror or exc})"))
                logger.warning("copy of %s failed: %s", job.rec.path, exc)
                if is_disk_full(exc) and self.disk_full is None:
                    self.disk_full = DiskFullError(self.report.dest)
                continue
            self._record(job, final, copied)

    def close(self) -> None:
        """Let copies in flight finish and record the ones that succeeded (used on the way out)."""
        self.pool.shutdown(wait=True)
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
        report.per_label[job.label] = report.per_label.get(job.label, 0) + 1
        report.flagged += job.flagged
        self.pending.append(Placed(job.rec, job.label, job.conf, job.score, job.flagged, final, copied,
                                   datetime.now(UTC)))

