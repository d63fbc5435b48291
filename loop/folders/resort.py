"""Re-sort: after a deploy, copies no person has checked move to the class the new model gives them.

`resort(ws, dest)` runs the deployed model over the sorted copies in `dest` whose photo has no label (no
reviewer, no user move, no labeled folder), was not marked reviewed, and whose copy sits where sortloop
left it (not moved by a person, same bytes: each copy's sha256 is checked as it is decoded). A copy the
new model puts in another class moves there (`loop.folders.moves`: journaled, never overwriting) and takes the
new model's prediction and flag (copy record, manifest, `_review.csv`). `dry_run=True` lists every move
(old -> new class, both confidences) and changes nothing on disk.

Every run is logged (`runs/moves/<run_id>.json`: each move, and what it replaced) and `undo_resort`
puts that run's copies back where they were, with their old predictions and flags.
Caveat: undo moves back only copies still where the re-sort put them, unchanged; one a person moved or
edited since is reported and left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loop.data import manifest
from loop.data.decode import decode_stream, default_workers, model_threads
from loop.errors import SortloopError
from loop.flags import LOW_CONFIDENCE, MODEL_FLAGS, UNFAMILIAR
from loop.folders import moves
from loop.folders.apply import check_folder_name, copy_state, recorded_roots, target_folder
from loop.progress import ProgressCallback, no_progress
from loop.scoring.flagging import settings_point
from loop.scoring.strategies import get_strategy
from loop.sorting import copies
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("label", "confidence", "score", "flagged", "model_version", "placed_by")
MANIFEST_FIELDS = ("pred_label", "pred_conf", "pred_score", "pred_model", "flag")
REPLACEABLE_FLAGS = (None, *MODEL_FLAGS)  # flags a re-sort may replace (a person's never)
SMALL = 64  # fewer copies than this are decoded in this process (starting decoder processes costs seconds)


@dataclass
class ResortReport:
    """What one re-sort did (or, with `dry_run`, would do): `moves` as planned, `final` set once done."""

    dest: str
    run_id: str = ""
    model_version: str = ""
    dry_run: bool = False
    checked: int = 0  # copies the model looked at
    human: int = 0  # copies of photos a person labeled, reviewed or moved: never re-routed
    changed: list[str] = field(default_factory=list)  # copies a person moved or edited: left alone
    failed: list[tuple[str, str]] = field(default_factory=list)
    moves: list[moves.Move] = field(default_factory=list)

    def summary(self) -> str:
        verb = "would move" if self.dry_run else "moved"
        done = self.moves if self.dry_run else [m for m in self.moves if m.final]
        text = (f"re-sorted {self.dest} with model {self.model_version}: {self.checked} unchecked copies looked at, "
                f"{verb} {len(done)}; {self.human} checked by a person (kept), {len(self.changed)} moved or "
                f"edited by a person (kept), {len(self.failed)} failed (unreadable or not movable)"
                + ("" if self.dry_run or not done else f" (undo: sortloop undo {self.run_id})"))
        for m in self.moves:
            old, new = m.old_record, m.record_updates
            text += (f"\n  {Path(m.src).name}: {m.old_category} ({old['confidence']:.2f}) -> {m.category} "
                     f"({new['confidence']:.2f})")
        return text


def _plain(value: Any) -> Any:
    """A JSON-able value (numpy scalars, pandas NA) for the journal and the run log."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def resort(ws: Workspace, dest: Path | str, *, dry_run: bool = False,
           on_progress: ProgressCallback | None = None) -> ResortReport:
    """Move the copies in `dest` that no person checked to the class the deployed model gives them now.

    Args:
        dest: a tree written by `sort_folder`.
        dry_run: only list the moves (old -> new class, both confidences); nothing on disk changes.
    Returns:
        A ResortReport; undo its moves with `undo_resort(ws, report.run_id)`.
    Raises:
        ModelError: no deployed model. SortloopError: `dest` was never sorted into, or a class name
            cannot be a folder (nothing moves).

    Example:
        >>> print(resort(open_workspace("data"), "~/photos/sorted", dry_run=True).summary())   # doctest: +SKIP
    """
    (root,) = recorded_roots(ws, dest)
    if not Path(root).is_dir():
        raise SortloopError(f"{root} does not exist any more; nothing to re-sort")
    report = ResortReport(dest=root, run_id=moves.new_run_id(), dry_run=dry_run)
    if dry_run:  # no lock, no recovery: a dry run writes nothing
        report.moves = _plan(ws, report, on_progress or no_progress)
        return report
    # The model runs outside the moves lock (minutes on a big tree; a `scan` meanwhile must not wait that
    # long); the plan is then checked again under the lock against what changed in the meantime.
    moves.recover(ws)
    planned = _plan(ws, report, on_progress or no_progress)
    with moves.exclusive(ws):
        planned = _still_unchecked(ws, planned, report)
        report.moves = moves.run_batch(ws, "resort", report.run_id, planned, dest_roots=[root],
                                       info={"dest": root, "model_version": report.model_version})
    report.failed += [(m.src, m.error) for m in report.moves if m.error]
    logger.info(report.summary())
    return report


def _plan(ws: Workspace, report: ResortReport, on_progress: ProgressCallback) -> list[moves.Move]:
    from loop.learning.registry import current_model_dir
    from loop.model.artifact import load_predictor

    settings = ws.settings.sort
    report.model_version = current_model_dir(ws).name  # raises the "nothing deployed" error first
    df = manifest.load(ws).set_index("image_id")
    checked_by_person = set(df.index[df["label"].notna() | (df["review_status"] == "reviewed").fillna(False)])
    records = copies.load_records(ws, Path(report.dest))
    records = records[records["status"] == "present"]
    groups: list[pd.DataFrame] = []
    for _, group in records.groupby("dest_path", sort=True):
        rec = group.iloc[0]
        if rec["image_id"] in checked_by_person:
            report.human += 1
        elif pd.isna(rec["category"]) or (group["placed_by"] == "user").any() or copy_state(rec) == "gone":
            report.changed.append(str(rec["dest_path"]))
        else:
            groups.append(group)
    if not groups:
        return []

    model_dir = current_model_dir(ws)
    workers = default_workers(settings.workers) if len(groups) >= SMALL else 0
    predictor = load_predictor(model_dir, runtime=settings.runtime, threads=model_threads(workers))
    for name in predictor.classes:
        check_folder_name(name, what=f"class of model {predictor.version}")
    report.model_version = predictor.version
    point = settings_point(predictor.spec, settings)  # the deployed model's flag operating point
    strategy, threshold = get_strategy(point["strategy"]), point["threshold"]
    other = settings.other_folder if settings.unfamiliar else None  # where the model's unfamiliar photos go
    by_path = {str(g.iloc[0]["dest_path"]): g for g in groups}
    planned: list[moves.Move] = []
    total, done = len(groups), 0
    on_progress(0, total)
    stream = decode_stream((Path(p) for p in by_path), predictor.image_size, describe=False, workers=workers)
    try:
        batch: list = []
        for item in stream:
            if not item.ok:
                report.failed.append((str(item.path), item.error or "unreadable"))
            elif item.image_id != by_path[str(item.path)].iloc[0]["image_id"]:
                report.changed.append(str(item.path))  # edited by a person: not sortloop's copy any more
            else:
                batch.append(item)
            if len(batch) >= settings.batch_size:
                planned += _predict(batch, predictor, strategy, threshold, by_path, df, report, other)
                done += len(batch)
                on_progress(done, total)
                batch = []
        if batch:
            planned += _predict(batch, predictor, strategy, threshold, by_path, df, report, other)
    finally:
        stream.close()
    on_progress(total, total)
    return planned


def _still_unchecked(ws: Workspace, planned: list[moves.Move], report: ResortReport) -> list[moves.Move]:
    """The planned moves whose photo is still unlabeled and whose copy is still where sortloop left it."""
    if not planned:
        return planned
    df = manifest.load(ws).set_index("image_id")
    labeled = set(df.index[df["label"].notna() | (df["review_status"] == "reviewed").fillna(False)])
    records = copies.load_records(ws).set_index("record_id")
    keep = []
    for m in planned:
        rec = records.loc[m.record_ids[0]] if m.record_ids[0] in records.index else None
        if m.image_id in labeled:
            report.human += 1
        elif (rec is None or rec["dest_path"] != m.src or rec["status"] != "present" or str(rec["placed_by"]) == "user"
              or copy_state(rec) != "ok"):
            report.changed.append(m.src)
        else:
            keep.append(m)
    return keep


def _predict(batch: list, predictor: Any, strategy: Any, threshold: float | None, by_path: dict[str, pd.DataFrame],
             df: pd.DataFrame, report: ResortReport, other: str | None) -> list[moves.Move]:
    prediction = predictor.predict_with_familiarity(np.stack([item.pixels for item in batch]))
    probs = prediction.probs
    scores = strategy(probs)
    out = []
    for i, (item, p, s) in enumerate(zip(batch, probs, scores, strict=True)):
        report.checked += 1
        group = by_path[str(item.path)]
        rec = group.iloc[0]
        k = int(np.argmax(p))
        label = predictor.classes[k]
        unfamiliar = other is not None and prediction.unfamiliar is not None and bool(prediction.unfamiliar[i])
        category = other if unfamiliar else label  # the folder: as `sortloop sort` decides it
        if category == rec["category"]:
            continue
        flagged = unfamiliar or (threshold is not None and float(s) >= threshold)
        row = df.loc[rec["image_id"]] if rec["image_id"] in df.index else None
        old_flag = None if row is None or pd.isna(row["flag"]) else str(row["flag"])
        new_flag = old_flag if old_flag not in REPLACEABLE_FLAGS else \
            (UNFAMILIAR if unfamiliar else LOW_CONFIDENCE if flagged else None)
        path = Path(str(rec["dest_path"]))
        out.append(moves.Move(
            record_ids=list(group["record_id"]), image_id=str(rec["image_id"]), size=int(item.size_bytes),
            src=str(path), folder=str(target_folder(Path(report.dest), path, str(rec["category"]), category)),
            name=path.name, category=category, old_category=str(rec["category"]),
            record_updates={"label": label, "confidence": float(p[k]), "score": float(s), "flagged": flagged,
                            "model_version": predictor.version, "placed_by": "resort"},
            old_record={f: _plain(rec[f]) for f in RECORD_FIELDS},
            manifest_updates={} if row is None else {"pred_label": label, "pred_conf": float(p[k]),
                                                     "pred_score": float(s), "pred_model": predictor.version,
                                                     "flag": new_flag},
            old_manifest={} if row is None else {f: _plain(row[f]) for f in MANIFEST_FIELDS},
        ))
    return out


@dataclass
class UndoReport:
    """What undoing a re-sort did: copies put back, and copies left alone (a person moved or edited them)."""

    run_id: str
    undone: str
    restored: list[tuple[str, str]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"undid re-sort {self.undone}: {len(self.restored)} cop(ies) put back, {len(self.left)} left alone"
        for path in self.left[:20]:
            text += f"\n  left (moved or edited since): {path}"
        return text


def resort_runs(ws: Workspace) -> list[dict]:
    """Logged re-sort runs that moved something, oldest first, each with `undone_by` (None if not undone)."""
    undone = {r["info"].get("undoes"): r["run_id"] for r in moves.list_logs(ws, "undo")}
    return [{**r, "undone_by": undone.get(r["run_id"])} for r in moves.list_logs(ws, "resort")]


def undo_resort(ws: Workspace, run_id: str | None = None) -> UndoReport:
    """Put the copies a re-sort moved back where they were, with their old predictions and flags.

    Args:
        run_id: the re-sort to undo (default: the latest one not undone yet).
    Raises:
        SortloopError: no such run, or it was undone already.

    Example:
        >>> print(undo_resort(open_workspace("data")).summary())   # doctest: +SKIP
    """
    with moves.exclusive(ws):
        runs = resort_runs(ws)
        if run_id is None:
            open_runs = [r for r in runs if not r["undone_by"]]
            if not open_runs:
                raise SortloopError("no re-sort to undo (every logged re-sort was undone already, or none moved "
                                    "anything)")
            run = open_runs[-1]
        else:
            found = [r for r in runs if r["run_id"] == run_id]
            if not found:
                known = ", ".join(r["run_id"] for r in runs) or "none"
                raise SortloopError(f"no re-sort run {run_id!r} (re-sort runs: {known})")
            run = found[0]
            if run["undone_by"]:
                raise SortloopError(f"re-sort {run_id} was undone already (by {run['undone_by']})")
        report = UndoReport(run_id=moves.new_run_id(), undone=run["run_id"])
        records = copies.load_records(ws).set_index("record_id")
        planned = []
        for m in run["moves"]:
            if not m["final"]:
                continue
            rids = [r for r in m["record_ids"] if r in records.index]
            rec = records.loc[rids[0]] if rids else None
            if (rec is None or rec["dest_path"] != m["final"] or rec["status"] != "present"
                    or rec["placed_by"] != "resort" or copy_state(rec) != "ok"):
                report.left.append(m["final"])
                continue
            planned.append(moves.Move(
                record_ids=rids, image_id=m["image_id"], size=m["size"], src=m["final"],
                folder=str(Path(m["src"]).parent), name=Path(m["src"]).name, category=m["old_category"],
                old_category=m["category"], record_updates=m["old_record"], old_record=m["record_updates"],
                manifest_updates=m["old_manifest"], old_manifest=m["manifest_updates"],
            ))
        done = moves.run_batch(ws, "undo", report.run_id, planned, dest_roots=run["dest_roots"],
                               info={"undoes": run["run_id"]}, always_log=True)
    report.restored = [(m.src, m.final) for m in done if m.final]
    report.left += [m.src for m in done if not m.final]
    logger.info(report.summary())
    return report
