"""The sort pipeline itself, without a workspace: decode -> predict -> flag -> safe copy -> `_review.csv`.

Why a module of its own: `sortloop sort` (`loop.sorting.folder`, which adds the manifest, the copy-records table and
the run log) and the standalone sorter frozen for PCs without Python (`sortloop.sorter`, which keeps its
record inside DEST) must give the same labels, confidences and flags on the same photos, so both run
exactly this code. It needs only numpy, Pillow and ONNX Runtime: no pandas, no torch, no workspace.
What differs is a `Sink`: which files count as sorted before, and where each flushed batch is recorded
(the workspace's tables, or a record inside DEST). Flags come from the model's own operating point
(`loop.scoring.flagging`: the catch curves in its model.json and the flag goal of the options), so a bundle that
ships model.json flags exactly like the workspace. `sortloop sort --ray` passes a `remote` engine: the
listed files are decoded, predicted and copied on the cluster, and its copies are recorded here the same way.

How it is fast: files stream through `loop.data.decode` (worker processes, a bounded number in flight), each
worker decodes a chunk and runs its own one-thread copy of the model on it (`loop.sorting.model_workers`), and
copies happen in background threads, so decoding, inference and file I/O overlap with two busy threads on two
CPUs. With no workers (`sort.workers = 0`) the model runs here on every CPU. Caveat: the model is fixed when
the run starts (a deploy during a run is picked up by the next).
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from loop.data.classnames import class_name_problem, twin_problem
from loop.data.decode import (
    Decoded,
    DecodeStream,
    PoolStart,
    SerialStream,
    WorkerSetup,
    decode_chunk,
    decode_stream,
    default_workers,
    model_threads,
)
from loop.data.images import iter_image_files
from loop.errors import DiskFullError, ModelError, SortloopError, first_disk_full, is_disk_full, stopped_by_full_disk
from loop.model.artifact import Prediction, Predictor, read_spec, spec_version
from loop.phases import PhaseClock
from loop.progress import ProgressCallback, no_progress
from loop.scoring.flagging import describe, settings_point
from loop.scoring.strategies import Strategy, get_strategy
from loop.scoring.unfamiliar import has_familiarity
from loop.sorting import copies, model_workers
from loop.sorting.copier import Copier, Done, Placed
from loop.sorting.report import SortReport

logger = logging.getLogger(__name__)

CHUNK = 4  # photos per worker task (decoded, then predicted as one batch there)
FLUSH_SECONDS = 30.0  # between flushes of the records. A flush rewrites the workspace's tables, so its cost grows with
#                       the workspace (flushed every 256 photos, a sort of 20,000 spent 27.5% of its time flushing:
#                       bench/sort_scale.py); on a clock, its share stays small at any size. A crash loses no copies:
#                       a rerun finds them identical at their destination and records them then.


@dataclass
class SortOptions:
    """How to sort: the `[sort]` settings of a workspace, or the ones a bundle carries in its model.json.

    The defaults are `loop.config.SortConfig`'s, restated because the frozen sorter has no pydantic;
    tests/unit/test_defaults.py fails if the two disagree.
    """

    flag_strategy: str = "auto"  # "auto": the strategy the model's catch curves pick (loop.scoring.flagging)
    flag_target: float = 0.8  # share of the model's mistakes the flags should catch
    flag_budget: float | None = None  # or: share of photos to flag (wins over the target)
    flag_threshold: float | None = None  # or: a fixed score threshold (wins over both)
    keep_tree: bool = True
    batch_size: int = 32
    workers: int = 2
    runtime: str = "onnx"
    precision: str = "auto"  # "auto": the INT8 ONNX model when it passed its gate (loop.model.artifact.PRECISIONS)
    unfamiliar: bool = True  # photos the model's unfamiliar score rejects go to `other_folder` (scoring.unfamiliar)
    other_folder: str = "_other"


RemoteBatches = Iterator[tuple[list[Decoded], Prediction, list[Done]]]


class Remote(Protocol):
    """Another engine (`loop.sorting.ray_sort` through `loop.sorting.folder`): decodes, predicts and copies
    `paths` with the artifact in `model_dir`, yielding (records, prediction, where each copy landed) per
    finished batch."""

    def __call__(self, paths: list[Path], model_dir: Path, predictor: Predictor) -> RemoteBatches:
        """The batches as they finish (failed records carry `error`)."""


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


def start_model_workers(model_dir: Path, options: SortOptions) -> PoolStart | None:
    """Start the decode workers that predict with the artifact in `model_dir` (None: `sort.workers` is 0), so
    they load while the caller prepares; `sort_into(..., workers=...)` takes them over."""
    workers = default_workers(options.workers)
    if not workers:
        return None
    setup = WorkerSetup(model_workers.load_model, (str(model_dir), options.runtime, options.precision),
                        preload=(model_workers.__name__,), check=model_workers.check_model)
    return PoolStart(workers, setup)


def sort_into(
    src: Path, dest: Path, model_dir: Path, sink: Sink, report: SortReport, *,
    options: SortOptions, on_progress: ProgressCallback | None = None, remote: Remote | None = None,
    workers: PoolStart | None = None,
) -> SortReport:
    """Sort every image under `src` into `dest/<predicted label>/` with the artifact in `model_dir`.

    The caller checked the folders (`check_folders`) and created `dest`. Copies are recorded through
    `sink` (which also lists the flagged ones in `dest/_review.csv`). Fills and returns `report`.
    With `remote`, the files are only listed here and `remote` decodes, predicts and copies them. `workers`:
    the caller's `start_model_workers(model_dir, options)`, now this run's (else they start here).

    Raises:
        ModelError: the artifact does not load or has class names that cannot be folders.
        DiskFullError: a disk filled up; what was copied before is recorded through `sink` first.
    """
    on_progress = on_progress or no_progress
    spec = read_spec(model_dir)
    image_size = int(spec["image_size"])
    # Flags: the strategy and threshold that meet the goal (catch rate, budget or fixed threshold) for THIS
    # model, from the curves estimated at its training and stored in its model.json.
    point = settings_point(spec, options)
    report.flag_strategy = point["strategy"]
    logger.info("flags: %s", describe(point))
    skip_dirs = [dest] if is_within(dest, src) else []
    processed = 0

    def todo() -> Iterator[Path]:
        nonlocal processed
        for path in iter_image_files(src, skip=skip_dirs, on_error=lambda f, why: report.failed.append((str(f), why))):
            try:
                st = path.stat()
                if sink.is_done(path, st.st_size, st.st_mtime_ns):
                    report.already_sorted += 1
                    processed += 1
                    continue
            except OSError:
                pass  # the decoder reports it with the reason
            yield path

    # Start decoding now (if the caller did not start the workers already): the worker processes start, load
    # the model and decode and predict the first chunks while model.json is checked here and the tree is
    # counted. Two batches in flight give slack for uneven decode times. A remote engine gets the list instead
    # (listed here, so resume works as for a local sort).
    count, chunk = 0, CHUNK  # decode workers, photos per worker task
    if remote is not None:
        stream: DecodeStream | SerialStream | _Listed = _Listed(list(todo()))
    else:
        start = workers or start_model_workers(model_dir, options)
        count = start.workers if start is not None else 0
        stream = decode_stream(todo(), image_size, workers=count, chunk=chunk,
                               prefetch=max(4 * count, 2 * options.batch_size // chunk), describe=sink.describe,
                               decode_fn=model_workers.decode_and_predict if count else decode_chunk,
                               setup=start.setup if start is not None else None, start=start)
    try:
        # With workers, they load the model (what fails there is raised at the first read, before any copy) and
        # this process needs only model.json; it loads the model itself when it predicts (no workers) or a
        # remote engine needs it.
        predictor = None
        if remote is not None or not count:
            predictor = Predictor(model_dir, options.runtime, precision=options.precision,
                                  threads=model_threads(count) if remote is None else None)
        classes = list(spec["classes"])
        check_classes(classes)
        check_category_folders(dest, classes + ([options.other_folder] if has_familiarity(spec) else []))
        total = sum(1 for _ in iter_image_files(src, skip=skip_dirs, on_error=lambda f, why: None))
    except BaseException:
        stream.close()
        raise
    report.model_version = spec_version(spec, model_dir)
    logger.info("sorting %s -> %s with %s (run %s)", src, dest, predictor or f"{report.model_version} in "
                f"{count} workers", report.run_id)
    on_progress(processed, total)

    placement = _Placement(src, dest, classes, get_strategy(point["strategy"]), point["threshold"], options)
    pending: list[Placed] = []
    copier = Copier(report, pending)
    clock = PhaseClock()  # the run's profile (report.stages), printed by bench/sort.py
    flushed_at = time.monotonic()
    if isinstance(stream, _Listed):
        assert predictor is not None
        predicted = _placed_batches(remote(stream.paths, model_dir, predictor), report)
    else:
        # The workers predicted each chunk: placed (and copied) as it arrives, so the last copies start with the
        # last chunk, not after a batch of `batch_size` filled up (the model here batches by `batch_size`)
        predicted = _predicted_batches(stream, predictor, chunk if count else options.batch_size, report, clock)
    disk_full: OSError | None = None  # a full disk stops the run; what was copied is recorded, then reported
    # What this process holds before the run (modules, the workspace's tables) is left out of the garbage
    # collector's full passes until the run ends: one pass over it took ~0.1 s in a 4 s sort of 200 photos
    # (gc.callbacks), the main process's time the decoders share the CPUs with.
    gc.freeze()
    try:
        for batch, prediction, placed, failures in predicted:
            if batch:
                placement.submit(batch, prediction, placed, sink, copier, report)
            copier.collect()
            processed += len(batch) + failures
            report.seen = processed
            on_progress(processed, total)
            clock.lap("place")
            if copier.disk_full:
                break
            if pending and time.monotonic() - flushed_at >= FLUSH_SECONDS:
                copier.collect(wait=True)
                clock.lap("copy_wait")
                _flush(sink, pending, report)
                clock.lap("record")
                flushed_at = time.monotonic()
        copier.collect(wait=True)
        clock.lap("copy_wait")
    except OSError as exc:
        disk_full = first_disk_full(exc, None)
    finally:
        predicted.close()
        stream.close()
        copier.close()  # finishes copies in flight (and records them) even when interrupted
        clock.lap("copy_wait")
        report.seen = processed
        try:
            _flush(sink, pending, report)  # again after a failed flush: the sinks' writes are idempotent
        except OSError as exc:
            disk_full = first_disk_full(exc, disk_full)
        clock.lap("record")
        report.stages.update(clock.seconds)
        gc.unfreeze()
    disk_full = disk_full or copier.disk_full
    if disk_full is not None:
        raise stopped_by_full_disk(disk_full, dest, report.summary()) from None
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


def check_writable(dest: Path) -> None:
    """Create `dest` and prove it takes a file (made and removed), before any photo is read: a read-only
    or full DEST is one line, not a failure per photo and a traceback.

    Raises:
        SortloopError (DiskFullError when full): naming DEST and the reason.
    """
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sortloop-probe.", dir=dest)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(dest) from None
        raise SortloopError(f"cannot write into {dest} ({exc.strerror or exc}); sort into a folder you can write "
                            "to, or make this one writable") from None


def check_classes(classes: list[str]) -> None:
    """Class names become folder names under DEST (on Windows too), and `scan` reads them back: refuse
    unusable ones (`loop.data.classnames`), and two names that differ only in case (one folder on Windows)."""
    for i, name in enumerate(classes):
        problem = class_name_problem(name)
        if problem is not None:
            raise ModelError(f"the deployed model's class {name!r} cannot be a category folder ({problem}); "
                             "fix the label (`sortloop train` refuses such labels) and retrain, or "
                             "`sortloop rollback`")
        twin = twin_problem(name, classes[:i])
        if twin is not None:
            raise ModelError(f"class name {name!r}: {twin}; merge or rename them and retrain")


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


# --- helpers -----------------------------------------------------------------------------------------


@dataclass
class _Placement:
    """Where each photo of a run goes: its class's folder, or `options.other_folder` when the model's
    unfamiliar score rejects it; flagged when unsure (the flags' operating point) or unfamiliar."""

    src: Path
    dest: Path
    classes: list[str]
    strategy: Strategy
    threshold: float | None  # None: no flags
    options: SortOptions
    # (folder, source folder) -> the copy's folder: the same for every photo of a source folder, so it is worked
    # out (a few stats: sub-folders matched to existing ones ignoring case) once per run, not per photo
    folders: dict[tuple[str, Path], Path] = field(default_factory=dict)

    def submit(self, batch: list[Decoded], prediction: Prediction, placed: list[Done] | None, sink: Sink,
               copier: Copier, report: SortReport) -> None:
        """Queue the copy of every photo of `batch` not sorted before (`placed`: where a remote engine put it)."""
        options = self.options
        scores = self.strategy(prediction.probs)
        for i, (rec, p, s) in enumerate(zip(batch, prediction.probs, scores, strict=True)):
            if sink.seen_before(rec):
                report.already_sorted += 1
                continue
            k = int(np.argmax(p))
            unfamiliar = options.unfamiliar and prediction.unfamiliar is not None and bool(prediction.unfamiliar[i])
            flagged = unfamiliar or (self.threshold is not None and float(s) >= self.threshold)
            folder = options.other_folder if unfamiliar else self.classes[k]
            key = (folder, rec.path.parent)
            if key not in self.folders:
                self.folders[key] = copies.category_folder(self.dest, folder, self.src, rec.path,
                                                           keep_tree=options.keep_tree)
            copier.submit(rec, self.classes[k], float(p[k]), float(s), flagged, self.folders[key],
                          done=placed[i] if placed is not None else None, category=folder, unfamiliar=unfamiliar)


class _Listed:
    """The files a remote engine will sort (listed here, so resume works as for a local sort)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def close(self) -> None:
        pass


Predicted = Iterator[tuple[list[Decoded], "Prediction | None", "list[Done] | None", int]]


def _predicted_batches(stream: DecodeStream | SerialStream, predictor: Predictor | None, size: int,
                       report: SortReport, clock: PhaseClock) -> Predicted:
    """Local engine: (decoded batch, prediction, None = copies still to make, failures): the workers'
    predictions (`model_workers.Predicted`), or with no workers (`predictor`) the model here."""
    stages = report.stages
    for batch, failures in _batches(stream, size, report):
        clock.lap("wait_decode")
        prediction = None
        if batch and all(isinstance(rec, model_workers.Predicted) for rec in batch):
            prediction = Prediction.concat([rec.prediction for rec in batch])  # type: ignore[attr-defined,misc]
        elif batch:
            assert predictor is not None, "decoded without a prediction, and no model here"
            prediction = predictor.predict_with_familiarity(np.stack([rec.pixels for rec in batch]))
            for rec in batch:
                rec.pixels = None  # 150 KB a photo, no longer needed: the records wait for a flush (FLUSH_SECONDS)
        clock.lap("predict")
        for rec in batch:
            stages["worker_hash"] = stages.get("worker_hash", 0.0) + rec.hash_s
            stages["worker_decode"] = stages.get("worker_decode", 0.0) + rec.decode_s
            stages["worker_describe"] = stages.get("worker_describe", 0.0) + rec.describe_s
            stages["worker_predict"] = stages.get("worker_predict", 0.0) + getattr(rec, "predict_s", 0.0)
        yield batch, prediction, None, failures


def _placed_batches(results: RemoteBatches, report: SortReport) -> Predicted:
    """Remote engine: the same, plus where each worker's copy landed."""
    for recs, prediction, placed in results:
        ok = [i for i, rec in enumerate(recs) if rec.ok]
        for rec in recs:
            if not rec.ok:
                _failed(report, rec)
        yield [recs[i] for i in ok], prediction.subset(ok), [placed[i] for i in ok], len(recs) - len(ok)


def _failed(report: SortReport, rec: Decoded) -> None:
    report.failed.append((str(rec.path), rec.error or "unreadable"))
    logger.info("skipped %s: %s", rec.path, rec.error)


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
            _failed(report, rec)
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
