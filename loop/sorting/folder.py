"""Sort a folder: copy every image under SRC into `DEST/<predicted label>/`, with the deployed model.

How it is fast: the pipeline is `loop.sorting.pipeline` (shared with the standalone sorter): files stream through
`loop.data.decode` (JPEG draft decode + EXIF orientation in worker processes, a bounded number in flight), the
model runs on batches through the portable artifact (ONNX Runtime by default: measured ~2x faster than
torch on CPU; no fastai anywhere on this path), and decoding the next batch overlaps inference and
copying of the current one. This module adds the workspace: manifest, copy records, run log, the
destination lock, and the engine choice (`--ray`: `loop.sorting.ray_sort` decodes, predicts and copies on a Ray
cluster; its copies are recorded through the same sink).

How it is safe: originals are only read. Copies go through `loop.sorting.copies.safe_copy` (temp name in the
target folder, fsync, link/rename; never overwrites: identical bytes are skipped, different ones get
`name (2).jpg`; names follow Windows' rules). Every copy is recorded in
`<workspace>/runs/sorted_copies.parquet`, so a rerun copies nothing already sorted (a source file is
recognised by path + size + mtime without being read again).
The model version is fixed when the run starts: a deploy during a run does not change it.

Layout: by default the source's sub-folders are kept under each category (`DEST/<label>/<sub/folders>/
name`), because camera names repeat across folders (IMG_0001.JPG in every project), so a flat layout
would rename many photos to `name (2).jpg` and lose which project each came from; `--flat` (or
`sort.keep_tree = false`) puts every copy directly in `DEST/<label>/`. Either way `scan` reads the
category from the first folder under DEST.

Unfamiliar photos (unlike every labeled one: `loop.scoring.unfamiliar`, scored by the model itself) are copied to
`DEST/<sort.other_folder>/` (default `_other`, sub-folders kept the same way) instead of a category, and
flagged `unfamiliar` so they reach review, where "none of these" is an answer.

Also written: predictions (`pred_label`, `pred_conf`, `pred_score`, `pred_model`) and `flag =
low_confidence` (or `unfamiliar`) into the manifest (new images are registered first), and
`DEST/_review.csv` (rebuilt from the records by `loop.sorting.review_csv`: the flagged copies no person has
looked at yet).
Caveat: flags are set only on images no person has labeled yet (`label_source` not review/user_move),
and an existing `user_moved` flag is never replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from loop.atomic import append_jsonl
from loop.data import manifest
from loop.data.decode import Decoded
from loop.data.label_sources import HUMAN_SOURCES
from loop.errors import DiskFullError, SortloopError, first_disk_full, stopped_by_full_disk
from loop.flags import LOW_CONFIDENCE, UNFAMILIAR
from loop.progress import ProgressCallback
from loop.sorting import copies
from loop.sorting.pipeline import (  # noqa: F401  (SortReport is part of this module's interface)
    Placed,
    RemoteBatches,
    SortOptions,
    SortReport,
    check_folders,
    check_writable,
    sort_into,
    start_model_workers,
)
from loop.sorting.review_csv import write_review_csv
from loop.workspace import Workspace

if TYPE_CHECKING:
    from loop.model.artifact import Predictor

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


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
            the Ray cluster of settings `[ray]`, see `loop.sorting.ray_sort`); default: setting `sort.engine`.
        on_progress: called with (files done, files total).
    Returns:
        A SortReport; `.ok` is False if any file failed (each listed with its reason).
    Raises:
        ModelError: no deployed model, or it does not load. SortloopError: bad `src`/`dest`, an unknown
        engine, another sort is writing into `dest` right now, or the Ray job failed. DiskFullError: DEST's
        or the workspace's disk filled up; every copy made is recorded, `.summary` says what was done, and
        a rerun after freeing space continues.

    Example:
        >>> report = sort_folder(open_workspace("data"), "~/photos/new", "~/photos/sorted")   # doctest: +SKIP
        >>> print(report.summary())
    """
    src, dest = check_folders(Path(src), Path(dest))
    with copies.dest_lock(ws, dest):  # one sort at a time per destination (a second one refuses clearly)
        return _sort_locked(ws, src, dest, keep_tree=keep_tree, engine=engine, on_progress=on_progress)


def _sort_locked(ws: Workspace, src: Path, dest: Path, *, keep_tree: bool | None, engine: str | None,
                 on_progress: ProgressCallback | None) -> SortReport:
    """`sort_folder` once the destination is locked and the folders checked."""
    from loop.learning.registry import current_model_dir

    options = sort_options(ws, keep_tree=keep_tree)
    engine = engine or ws.settings.sort.engine
    if engine not in ENGINES:
        raise SortloopError(f"unknown sort engine {engine!r}; valid: {', '.join(ENGINES)} (sort.engine)")
    dest_is_new = not dest.exists()
    started = time.perf_counter()

    # The model is fixed here, once: a deploy during the run changes the pointer, not this folder. Its workers
    # start now, loading it while the records are read (the sort takes them over).
    model_dir = current_model_dir(ws)
    workers = start_model_workers(model_dir, options) if engine == "local" else None
    with workers or contextlib.nullcontext():  # stopped here if the sort never took them over
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
        check_writable(dest)  # a read-only DEST is one line before any photo is read
        sink = _WorkspaceSink(ws, dest, done)
        remote = _RayRemote(ws, src, dest, options, sink) if engine == "ray" else None
        disk_full: OSError | None = None  # a full disk stops the run; what was copied is recorded, then reported
        try:
            sort_into(src, dest, model_dir, sink, report, options=options, on_progress=on_progress, remote=remote,
                      workers=workers)
        except DiskFullError as exc:
            disk_full = exc
        finally:
            report.seconds = time.perf_counter() - started
            for finish in (lambda: copies.update_records(ws, sink.touched), lambda: sink.review_csv_current or
                           write_review_csv(ws, dest), lambda: _log_run(ws, report)):
                try:
                    finish()
                except OSError as exc:
                    disk_full = first_disk_full(exc, disk_full)
        if disk_full is not None:
            logger.info("stopped: disk full (%s). %s", disk_full, report.summary())  # the CLI prints it once
            raise stopped_by_full_disk(disk_full, dest, report.summary()) from None
        logger.info(report.summary())
        return report


def sort_options(ws: Workspace, *, keep_tree: bool | None = None) -> SortOptions:
    """The workspace's `[sort]` settings as the pipeline's options (`keep_tree` overrides the setting)."""
    options = SortOptions(**{f.name: getattr(ws.settings.sort, f.name) for f in dataclasses.fields(SortOptions)})
    if keep_tree is not None:
        options.keep_tree = keep_tree
    return options


def record_predictions(ws: Workspace, preds: dict[str, tuple[str, float, float, bool]], version: str,
                       unfamiliar: set[str] | frozenset[str] = frozenset()) -> None:
    """Predictions into the manifest (`{image_id: (label, conf, score, flagged)}`), and a flag on flagged
    images no person has labeled: `unfamiliar` for the ids in `unfamiliar` (they went to the unfamiliar
    folder; it replaces `low_confidence`, it says more), else `low_confidence` where no flag is set yet."""
    manifest.update(ws, prediction_change(preds, version, unfamiliar))


def prediction_change(preds: dict[str, tuple[str, float, float, bool]], version: str,
                      unfamiliar: set[str] | frozenset[str] = frozenset()) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """`record_predictions` as a change of the manifest frame (a sort's flush commits it with the new rows)."""

    def apply(df: pd.DataFrame) -> pd.DataFrame:  # column-wise: it runs on every flush of a sort
        rows = df["image_id"].isin(preds.keys()).to_numpy()
        ids = df.loc[rows, "image_id"]
        picked = [preds[i] for i in ids]
        df.loc[rows, "pred_label"] = [label for label, _, _, _ in picked]
        df.loc[rows, "pred_conf"] = [conf for _, conf, _, _ in picked]
        df.loc[rows, "pred_score"] = [score for _, _, score, _ in picked]
        df.loc[rows, "pred_model"] = version
        flag = df.loc[rows, "flag"]
        flagged = np.array([f for _, _, _, f in picked], bool)
        may = flagged & ~df.loc[rows, "label_source"].isin(HUMAN_SOURCES).to_numpy(bool)
        open_flag = flag.isna().to_numpy(bool)
        replaceable = open_flag | flag.eq(LOW_CONFIDENCE).fillna(False).to_numpy(bool)  # unfamiliar says more
        to_unfamiliar = may & ids.isin(unfamiliar).to_numpy(bool) & replaceable
        to_unsure = may & ~to_unfamiliar & open_flag
        where = df.index[rows]
        df.loc[where[to_unfamiliar], "flag"] = UNFAMILIAR
        df.loc[where[to_unsure], "flag"] = LOW_CONFIDENCE
        return df

    return apply


class _WorkspaceSink:
    """The workspace's memory of a sort: the copy-records table (resume, scan) and the manifest."""

    describe = True

    def __init__(self, ws: Workspace, dest: Path, done: pd.DataFrame) -> None:
        self.ws, self.dest = ws, dest
        # Zipped as numpy columns: a sorted tree holds tens of thousands of records, and iterating pandas' Arrow
        # strings costs ~1 µs an element
        paths, ids, rids = (done[c].to_numpy(object).tolist() for c in ("source_path", "image_id", "record_id"))
        sizes, mtimes = (done[c].fillna(-1).to_numpy("int64").tolist() for c in ("source_size", "source_mtime_ns"))
        self.known = set(zip(paths, sizes, mtimes, strict=True))
        self.known_ids = dict(zip(zip(paths, ids, strict=True), rids, strict=True))
        self.touched: dict[str, dict] = {}
        # _review.csv was rebuilt by a flush of this run: nothing since changes what it lists (unflagged
        # copies and touched records do not), so the run's end need not rebuild it a second time.
        self.review_csv_current = False

    def is_done(self, path: Path, size: int, mtime_ns: int) -> bool:
        return (str(path), size, mtime_ns) in self.known

    def seen_before(self, rec: Decoded) -> bool:
        rid = self.known_ids.get((str(rec.path), rec.image_id))
        if rid is None:
            return False
        self.touched[rid] = {"source_size": rec.size_bytes, "source_mtime_ns": rec.mtime_ns}  # its new mtime
        return True

    def flush(self, placed: list[Placed], report: SortReport) -> None:
        """The manifest (new rows + predictions + flags, one write), then the copy records, then _review.csv
        (rebuilt from the two tables just written, not read back)."""
        from loop.data.ingest import ImageInfo, register_images

        flagged = any(p.flagged for p in placed)
        self.review_csv_current = self.review_csv_current and not flagged  # until rebuilt below
        infos = [ImageInfo(image_id=p.rec.image_id or "", path=str(p.rec.path), phash=p.rec.phash,
                           taken_at=p.rec.taken_at) for p in placed]
        predict = prediction_change({p.rec.image_id or "": (p.label, p.conf, p.score, p.flagged) for p in placed},
                                    report.model_version, {p.rec.image_id or "" for p in placed if p.unfamiliar})
        committed: list[pd.DataFrame] = []  # the manifest as this flush commits it, for _review.csv below

        def predictions(df: pd.DataFrame) -> pd.DataFrame:
            committed.append(predict(df))
            return committed[-1]

        report.registered += register_images(self.ws, infos, source="user", also=predictions)
        records = []
        for p in placed:
            st = p.final.stat()
            now = pd.Timestamp(p.sorted_at)
            records.append({
                "record_id": copies.new_record_id(), "image_id": p.rec.image_id, "source_path": str(p.rec.path),
                "source_size": p.rec.size_bytes, "source_mtime_ns": p.rec.mtime_ns, "dest_root": report.dest,
                "dest_path": str(p.final), "label": p.label, "confidence": p.conf, "score": p.score,
                "flagged": p.flagged, "model_version": report.model_version, "sorted_at": now,
                "run_id": report.run_id, "category": p.folder, "dest_size": st.st_size,
                "dest_mtime_ns": st.st_mtime_ns, "status": "present", "checked_at": now, "placed_by": "sort",
            })
        every_record = copies.append_records(self.ws, records)
        if flagged:
            write_review_csv(self.ws, self.dest, tables=(every_record, committed[-1]))
            self.review_csv_current = True


class _RayRemote:
    """The Ray engine as a `loop.sorting.pipeline.Remote`: the cluster of settings `[ray]` decodes, predicts and
    copies; files sorted before (the sink's records) are sent along so workers do not copy them again."""

    def __init__(self, ws: Workspace, src: Path, dest: Path, options: SortOptions, sink: _WorkspaceSink) -> None:
        self.ray, self.src, self.dest, self.options, self.sink = ws.settings.ray, src, dest, options, sink

    def __call__(self, paths: list[Path], model_dir: Path, predictor: Predictor) -> RemoteBatches:
        from loop.sorting.ray_sort import sort_batches

        known: dict[str, list[str]] = {}
        for path, image_id in self.sink.known_ids:
            known.setdefault(path, []).append(image_id)
        return sort_batches(paths, known, model_dir, src=self.src, dest=self.dest, keep_tree=self.options.keep_tree,
                            runtime=self.options.runtime, int8=predictor.int8, batch_size=self.options.batch_size,
                            other_folder=self.options.other_folder if self.options.unfamiliar else None,
                            address=self.ray.address, actors=self.ray.actors)


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
