"""Sort a folder: copy every image under SRC into `DEST/<predicted label>/`, with the deployed model.

How it is fast: files stream through `loop.decode` (JPEG draft decode + EXIF orientation in worker
processes, a bounded number in flight), the model runs on batches through the portable artifact (ONNX
Runtime by default: measured ~2x faster than torch on CPU; no fastai anywhere on this path), and
decoding the next batch overlaps inference and copying of the current one.

How it is safe: originals are only read. Copies go through `loop.copies.safe_copy` (temp name in the
target folder, fsync, link/rename; never overwrites: identical bytes are skipped, different ones get
`name (2).jpg`). Every copy is recorded in `<workspace>/runs/sorted_copies.parquet`, so a rerun copies
nothing already sorted (a source file is recognised by path + size + mtime without being read again).
The model version is fixed when the run starts: a deploy during a run does not change it.

Layout: by default the source's sub-folders are kept under each category (`DEST/<label>/<sub/folders>/
name`), because camera names repeat across folders (IMG_0001.JPG in every project), so a flat layout
would rename many photos to `name (2).jpg` and lose which project each came from; `--flat` (or
`sort.keep_tree = false`) puts every copy directly in `DEST/<label>/`. Either way `scan` reads the
category from the first folder under DEST.

Also written: predictions (`pred_label`, `pred_conf`, `pred_score`, `pred_model`) and `flag =
low_confidence` into the manifest (new images are registered first), and `DEST/_review.csv` (rebuilt
from the records by `loop.review_list`: the flagged copies no person has looked at yet).
Caveat: flags are set only on images no person has labeled yet (`label_source` not review/user_move),
and an existing `user_moved` flag is never replaced.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from loop import copies, manifest
from loop.atomic import append_jsonl
from loop.classnames import class_name_problem
from loop.decode import Decoded, decode_stream, default_workers
from loop.errors import DiskFullError, ModelError, SortloopError, is_disk_full
from loop.flagging import describe, settings_point
from loop.images import iter_image_files
from loop.progress import ProgressCallback, no_progress
from loop.review_list import REVIEW_CSV, write_review_csv  # noqa: F401  (REVIEW_CSV: re-exported)
from loop.select import get_strategy
from loop.workspace import Workspace

if TYPE_CHECKING:
    from loop.artifact import Predictor

logger = logging.getLogger(__name__)

FLUSH_EVERY = 256  # images between writes of the manifest and the records (a crash loses no copies:
#                    a rerun finds them identical at their destination and records them then)
HUMAN_SOURCES = manifest.HUMAN_SOURCES
ENGINES = ("local", "ray")


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


def sort_folder(
    ws: Workspace,
    src: Path | str,
    dest: Path | str,
    *,
    keep_tree: bool | None = None,
    engine: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> SortReport:
    """Copy every image under `src` into `dest/<predicted label>/` with the deployed model.

    Args:
        ws: the workspace (its deployed model, manifest and settings `[sort]`).
        src: a folder (searched recursively; directory symlinks are not followed) or one image file.
        dest: the sorted tree (created if missing). May not be `src` itself or contain it.
        keep_tree: keep `src`'s sub-folders under each category (default: setting `sort.keep_tree`).
        engine: "local" (decode worker processes + the model here) or "ray" (decode, predict and copy on
            the Ray cluster of settings `[ray]`, see `loop.ray_engine`); default: setting `sort.engine`.
        on_progress: called with (files done, files total).
    Returns:
        A SortReport; `.ok` is False if any file failed (each listed with its reason).
    Raises:
        ModelError: no deployed model, or it does not load. SortloopError: bad `src`/`dest`, or another sort
        is writing into `dest` right now. DiskFullError: DEST's or the workspace's disk filled up; every
        copy made is recorded, `.summary` says what was done, and a rerun after freeing space continues.

    Example:
        >>> report = sort_folder(open_workspace("data"), "~/photos/new", "~/photos/sorted")   # doctest: +SKIP
        >>> print(report.summary())
    """
    src, dest = _check_folders(Path(src), Path(dest))
    with copies.dest_lock(ws, dest):  # one sort at a time per destination (a second one refuses clearly)
        return _sort_locked(ws, src, dest, keep_tree=keep_tree, engine=engine, on_progress=on_progress or no_progress)


def _sort_locked(ws: Workspace, src: Path, dest: Path, *, keep_tree: bool | None, engine: str | None,
                 on_progress: ProgressCallback) -> SortReport:
    """`sort_folder` once the destination is locked and the folders checked."""
    from loop.artifact import load_predictor, read_spec
    from loop.registry import current_model_dir

    settings = ws.settings.sort
    dest_is_new = not dest.exists()
    keep_tree = settings.keep_tree if keep_tree is None else keep_tree
    started = time.perf_counter()

    # The model is fixed here, once: a deploy during the run changes the pointer, not this folder.
    model_dir = current_model_dir(ws)
    spec = read_spec(model_dir)
    image_size = int(spec["image_size"])
    # Flags: the strategy and threshold that meet the user's goal (catch rate or budget) for THIS model,
    # from the curves estimated at its training (`loop.flagging`).
    point = settings_point(spec, settings)
    flag_strategy, threshold = point["strategy"], point["threshold"]
    strategy = get_strategy(flag_strategy)
    logger.info("flags: %s", describe(point))
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + copies.new_record_id()[:6]
    report = SortReport(src=str(src), dest=str(dest), run_id=run_id)

    # Resume: what earlier runs already copied from here into this destination. If the whole destination
    # is gone, so are its copies: their records are retired (a full re-sort follows, and scan must not
    # mistake the new copies for moves of the old ones).
    done = copies.load_records(ws, dest)
    done = done[done["status"] != "gone"]
    if dest_is_new and len(done):
        logger.info("%s no longer exists: retiring %d records of earlier sorts into it", dest, len(done))
        copies.update_records(ws, {rid: {"status": "gone"} for rid in done["record_id"]})
        done = done.iloc[0:0]
    dest.mkdir(parents=True, exist_ok=True)
    known = {(p, int(s), int(m)) for p, s, m in zip(done["source_path"], done["source_size"].fillna(-1),
                                                    done["source_mtime_ns"].fillna(-1), strict=True)}
    known_ids = {(p, i): rid for p, i, rid in zip(done["source_path"], done["image_id"], done["record_id"],
                                                  strict=True)}
    touched: dict[str, dict] = {}
    skip_dirs = [dest] if _is_within(dest, src) else []
    pending = _Pending()
    processed = 0

    def todo() -> Iterator[Path]:
        nonlocal processed
        for path in iter_image_files(src, skip=skip_dirs):
            try:
                st = path.stat()
                if (str(path), st.st_size, st.st_mtime_ns) in known:
                    report.already_sorted += 1
                    processed += 1
                    continue
            except OSError:
                pass  # the decoder reports it with the reason
            yield path

    # Start decoding now: the worker processes spawn and decode the first batches while the model loads
    # and the tree is counted. Two batches in flight (~10 MB at 224 px) give slack for uneven decode times.
    # On Ray, the files are listed here and the cluster decodes, predicts and copies (nothing to start yet).
    engine = engine or settings.engine
    if engine not in ENGINES:
        raise SortloopError(f"unknown sort engine {engine!r}; valid: {', '.join(ENGINES)} (sort.engine)")
    if engine == "ray":
        stream = _Listed(list(todo()))
    else:
        workers, chunk = default_workers(settings.workers), 4
        stream = decode_stream(todo(), image_size, workers=workers, chunk=chunk,
                               prefetch=max(4 * workers, 2 * settings.batch_size // chunk))
    try:
        predictor = load_predictor(model_dir, runtime=settings.runtime, precision=settings.precision)
        total = sum(1 for _ in iter_image_files(src, skip=skip_dirs))
    except BaseException:
        stream.close()
        raise
    report.model_version = predictor.version
    try:
        _check_classes(predictor.classes)
        _check_category_folders(dest, predictor.classes)
    except BaseException:
        stream.close()
        raise
    logger.info("sorting %s -> %s with %r (run %s)", src, dest, predictor, run_id)
    on_progress(processed, total)

    copier = _Copier(report, pending, predictor.version)
    if isinstance(stream, _Listed):
        from loop.ray_engine import sort_batches

        predicted = _placed_batches(sort_batches(
            stream.paths, _known_by_path(known_ids), model_dir, src=src, dest=dest, keep_tree=keep_tree,
            runtime=settings.runtime, int8=predictor.int8, batch_size=settings.batch_size,
            address=ws.settings.ray.address,
            actors=ws.settings.ray.actors), report)
    else:
        predicted = _predicted_batches(stream, predictor, settings.batch_size, report)
    disk_full: OSError | None = None  # a full disk stops the run; what was copied is recorded, then reported
    try:
        for batch, probs, placed, failures in predicted:
            if batch:
                scores = strategy(probs)
                for i, (rec, p, s) in enumerate(zip(batch, probs, scores, strict=True)):
                    rid = known_ids.get((str(rec.path), rec.image_id))
                    if rid is not None:  # touched, not changed: still sorted; remember its new mtime
                        report.already_sorted += 1
                        touched[rid] = {"source_size": rec.size_bytes, "source_mtime_ns": rec.mtime_ns}
                        continue
                    k = int(np.argmax(p))
                    label = predictor.classes[k]
                    flagged = threshold is not None and float(s) >= threshold
                    copier.submit(rec, label, float(p[k]), float(s), flagged,
                                  copies.category_folder(dest, label, src, rec.path, keep_tree=keep_tree),
                                  done=placed[i] if placed is not None else None)
            copier.collect()
            processed += len(batch) + failures
            report.seen = processed
            on_progress(processed, total)
            if copier.disk_full:
                break
            if pending.size >= FLUSH_EVERY:
                copier.collect(wait=True)
                _flush(ws, dest, pending, report)
        copier.collect(wait=True)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        disk_full = exc
    finally:
        predicted.close()
        stream.close()
        copier.close()  # finishes copies in flight (and records them) even when interrupted
        report.seen = processed
        report.seconds = time.perf_counter() - started
        for finish in (lambda: _flush(ws, dest, pending, report), lambda: copies.update_records(ws, touched),
                       lambda: write_review_csv(ws, dest), lambda: _log_run(ws, report)):
            try:
                finish()
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                disk_full = disk_full or exc
    disk_full = disk_full or copier.disk_full
    if disk_full is not None:
        logger.warning("stopped: disk full (%s). %s", disk_full, report.summary())
        where = getattr(disk_full, "path", None) or disk_full.filename or dest
        raise DiskFullError(where, summary=report.summary()) from None
    on_progress(processed, total)
    logger.info(report.summary())
    return report


# --- helpers -----------------------------------------------------------------------------------------


def _check_folders(src: Path, dest: Path) -> tuple[Path, Path]:
    src, dest = src.expanduser().absolute(), dest.expanduser().absolute()
    if not src.exists():
        raise SortloopError(f"{src} does not exist; give the folder of photos to sort")
    if src.resolve() == dest.resolve():
        raise SortloopError("source and destination are the same folder; sort into a different folder")
    if src.is_dir() and _is_within(src, dest):
        raise SortloopError(f"{src} is inside the destination {dest}; sort it into a folder outside it")
    return src, dest


def _check_classes(classes: list[str]) -> None:
    """Class names become folder names under DEST, and `scan` reads them back: refuse unusable ones."""
    for name in classes:
        problem = class_name_problem(name)
        if problem is not None:
            raise ModelError(f"the deployed model's class {name!r} cannot be a category folder ({problem}); "
                             "fix the label (`sortloop train` refuses such labels) and retrain, or "
                             "`sortloop rollback`")


def _check_category_folders(dest: Path, classes: list[str]) -> None:
    """Before any copy: a category folder that is a symlink or resolves outside DEST is refused."""
    for name in classes:
        try:
            copies.check_target_folder(dest / name, dest)
        except copies.UnsafeFolder as exc:
            raise SortloopError(f"category folder refused: {exc}") from None


def _is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.resolve().relative_to(outer.resolve())
        return True
    except ValueError:
        return False


class _Listed:
    """The files a Ray sort will send to the cluster (listed here, so resume works as for a local sort)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def close(self) -> None:
        pass


Predicted = Iterator[tuple[list[Decoded], np.ndarray, "list | None", int]]


def _predicted_batches(stream: Iterator[Decoded], predictor: Predictor, size: int, report: SortReport) -> Predicted:
    """Local engine: (decoded batch, probs, None = copies still to make, failures) with the model here."""
    for batch, failures in _batches(stream, size, report):
        probs = predictor.predict(np.stack([rec.pixels for rec in batch])) if batch else None
        yield batch, probs, None, failures


def _placed_batches(results: Iterator, report: SortReport) -> Predicted:
    """Ray engine: the same, plus where each worker's copy landed (see `loop.ray_engine.sort_batches`)."""
    for recs, probs, placed in results:
        ok = [i for i, rec in enumerate(recs) if rec.ok]
        for rec in recs:
            if not rec.ok:
                _failed(report, rec)
        yield [recs[i] for i in ok], probs[ok], [placed[i] for i in ok], len(recs) - len(ok)


def _known_by_path(known_ids: dict[tuple[str, str], str]) -> dict[str, list[str]]:
    by_path: dict[str, list[str]] = {}
    for path, image_id in known_ids:
        by_path.setdefault(path, []).append(image_id)
    return by_path


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


class _Pending:
    """Copies made since the last flush: records, manifest rows, review lines, folders to fsync."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.infos: list = []
        self.preds: dict[str, tuple[str, float, float, bool]] = {}
        self.flagged = False  # a flagged copy since the last flush: `_review.csv` is rebuilt
        self.folders: set[Path] = set()

    @property
    def size(self) -> int:
        return len(self.records)


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
    inference; results are recorded in the main thread, in order, by `collect`."""

    def __init__(self, report: SortReport, pending: _Pending, version: str) -> None:
        self.report, self.pending, self.version = report, pending, version
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sortloop-copy")
        self.jobs: deque[_Job] = deque()
        self.disk_full: OSError | None = None  # the first "no space left" of a copy: the run stops

    def submit(self, rec: Decoded, label: str, conf: float, score: float, flagged: bool, folder: Path,
               done: tuple[Path, bool] | OSError | None = None) -> None:
        """Copy `rec` into `folder`; or, with `done`, record a copy a Ray worker made (or failed to make)."""
        if done is None:
            future = self.pool.submit(copies.safe_copy, rec.path, folder, rec.path.name, image_id=rec.image_id or "",
                                      size=rec.size_bytes, mtime_ns=rec.mtime_ns, sync_dir=False,
                                      root=Path(self.report.dest))
        else:
            future = Future()
            if isinstance(done, OSError):
                future.set_exception(done)
            else:
                future.set_result(done)
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
        from loop.ingest import ImageInfo

        rec, report, pending = job.rec, self.report, self.pending
        if copied:
            report.copied += 1
            report.renamed += final.name != rec.path.name
        else:
            report.identical_existing += 1
        report.per_label[job.label] = report.per_label.get(job.label, 0) + 1
        report.flagged += job.flagged
        now = pd.Timestamp(datetime.now(UTC))
        st = final.stat()
        pending.folders.add(final.parent)
        pending.records.append({
            "record_id": copies.new_record_id(), "image_id": rec.image_id, "source_path": str(rec.path),
            "source_size": rec.size_bytes, "source_mtime_ns": rec.mtime_ns, "dest_root": report.dest,
            "dest_path": str(final), "label": job.label, "confidence": job.conf, "score": job.score,
            "flagged": job.flagged, "model_version": self.version, "sorted_at": now, "run_id": report.run_id,
            "category": job.label, "dest_size": st.st_size, "dest_mtime_ns": st.st_mtime_ns, "status": "present",
            "checked_at": now, "placed_by": "sort",
        })
        pending.infos.append(ImageInfo(image_id=rec.image_id or "", path=str(rec.path), phash=rec.phash,
                                       taken_at=rec.taken_at))
        pending.preds[rec.image_id or ""] = (job.label, job.conf, job.score, job.flagged)
        pending.flagged |= job.flagged


def _flush(ws: Workspace, dest: Path, pending: _Pending, report: SortReport) -> None:
    """Copies made durable (directory fsync), then the manifest (register + predictions + flags), then the
    copy records, then _review.csv: a crash in between only means a rerun re-finds identical copies. Each
    part is cleared once written, so calling it again after a failure (a full disk) redoes only the rest."""
    if not pending.records:
        return
    for folder in pending.folders:
        copies.fsync_dir(folder)
    from loop.ingest import register_images

    report.registered += register_images(ws, pending.infos, source="user")
    pending.infos = []
    preds, version = pending.preds, report.model_version

    def apply(df: pd.DataFrame) -> pd.DataFrame:
        rows = df["image_id"].isin(preds.keys())
        for i in df.index[rows]:
            label, conf, score, flagged = preds[df.at[i, "image_id"]]
            df.at[i, "pred_label"], df.at[i, "pred_conf"], df.at[i, "pred_score"] = label, conf, score
            df.at[i, "pred_model"] = version
            human = df.at[i, "label_source"] in HUMAN_SOURCES if not pd.isna(df.at[i, "label_source"]) else False
            if flagged and not human and pd.isna(df.at[i, "flag"]):
                df.at[i, "flag"] = "low_confidence"
        return df

    manifest.update(ws, apply)
    pending.preds = {}
    copies.append_records(ws, pending.records)
    pending.records = []
    pending.folders.clear()
    if pending.flagged:
        pending.flagged = False  # rebuilt from the records, so nothing is lost if this write fails
        write_review_csv(ws, dest)


def _log_run(ws: Workspace, report: SortReport) -> None:
    """One JSON line per run in `runs/sort_runs.jsonl`: counts, failures, the model version used."""
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    entry = {
        "run_id": report.run_id, "at": datetime.now(UTC).isoformat(), "src": report.src, "dest": report.dest,
        "model_version": report.model_version, "seen": report.seen, "copied": report.copied,
        "already_sorted": report.already_sorted, "identical_existing": report.identical_existing,
        "flagged": report.flagged, "failed": report.failed, "seconds": round(report.seconds, 3),
    }
    append_jsonl(ws.runs_dir / "sort_runs.jsonl", [entry])
