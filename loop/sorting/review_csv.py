"""`DEST/_review.csv`: the sorted copies still waiting for a person's look, rebuilt from the records.

Why rebuilt, not appended: the list must follow what happened after the sort (a reviewer labeled the photo,
a person moved the copy, `apply` or `resort` moved it, a newer model is sure of it now). So it is written
whole, atomically, from the copy records (`loop.sorting.copies`: where each copy is, its current flag) and the
manifest (who labeled the image): one row per flagged copy present in the tree, sorted by path, header
always. A photo a person labeled (review, user move) or a reviewer marked reviewed leaves the list.
The standalone sorter, which has no workspace, appends to the same file instead (`append_review`).
Caveat: the file is sortloop's own; edits to it are overwritten by the next sort, scan, apply or resort.
The manifest (pandas) is imported where the list is rebuilt, so the frozen sorter can append without it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from loop.atomic import atomic_write
from loop.errors import ModelError
from loop.model.artifact import read_spec
from loop.scoring.flagging import settings_point
from loop.sorting import copies

if TYPE_CHECKING:
    from loop.sorting.pipeline import Placed
    from loop.workspace import Workspace

logger = logging.getLogger(__name__)

REVIEW_CSV = "_review.csv"
REVIEW_COLUMNS = ["dest_path", "source_path", "pred_label", "pred_conf", "score", "strategy", "model_version",
                  "image_id", "sorted_at", "flag"]  # flag: low_confidence, or unfamiliar (in the unfamiliar folder)


def pending_rows(ws: Workspace, dest: Path) -> list[dict[str, str]]:
    """The flagged copies under `dest` that no person has labeled or reviewed yet, sorted by path."""
    import pandas as pd

    from loop.data import manifest

    records = copies.load_records(ws, dest)
    records = records[(records["status"] == "present") & records["flagged"].fillna(False).astype(bool)]
    if records.empty:
        return []
    df = manifest.load(ws).set_index("image_id")
    human = df["label_source"].isin(manifest.HUMAN_SOURCES).fillna(False) | (df["review_status"] == "reviewed")
    done = set(df.index[human.fillna(False).astype(bool)])
    strategies: dict[str, str] = {}
    rows: dict[str, dict[str, str]] = {}
    for rec in records.itertuples():
        if rec.image_id in done or rec.dest_path in rows:
            continue
        rows[rec.dest_path] = review_row(
            rec.dest_path, rec.source_path, rec.label, rec.confidence, rec.score,
            _strategy(ws, str(rec.model_version), strategies), rec.model_version, rec.image_id,
            "" if pd.isna(rec.sorted_at) else rec.sorted_at.isoformat(), rec.category == ws.settings.sort.other_folder)
    return [rows[k] for k in sorted(rows)]


def _strategy(ws: Workspace, version: str, cache: dict[str, str]) -> str:
    """The flag strategy the model `version` sorted with (`sort.flag_strategy` may be "auto")."""
    if version not in cache:
        try:
            cache[version] = settings_point(read_spec(ws.models_dir / version), ws.settings.sort)["strategy"]
        except ModelError:  # the version folder is gone: say what the settings say
            cache[version] = ws.settings.sort.flag_strategy
    return cache[version]


def write_review_csv(ws: Workspace, dest: Path) -> Path:
    """Rebuild `dest/_review.csv` atomically from the records and the manifest; returns its path."""
    path = Path(dest) / REVIEW_CSV
    rows = pending_rows(ws, Path(dest))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REVIEW_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:  # unchanged: leave the file alone (a no-op run changes nothing on disk)
            return path
    with atomic_write(path) as fh:
        fh.write(data)
    logger.debug("%s: %d copies pending review", path, len(rows))
    return path


def review_row(dest_path: str, source_path: str, label: str, conf: float, score: float, strategy: str,
               version: str, image_id: str, sorted_at: str, unfamiliar: bool = False) -> dict[str, str]:
    """One line of `_review.csv` (columns REVIEW_COLUMNS), as both the workspace and a DEST record write it."""
    return {"dest_path": dest_path, "source_path": source_path, "pred_label": label, "pred_conf": f"{conf:.4f}",
            "score": f"{score:.4f}", "strategy": strategy, "model_version": version, "image_id": image_id,
            "sorted_at": sorted_at, "flag": "unfamiliar" if unfamiliar else "low_confidence"}


def append_review(path: Path, placed: list[Placed], strategy: str, version: str) -> None:
    """Append the flagged copies to `DEST/_review.csv` (header on first write), durably: the standalone
    sorter's review list (a workspace rebuilds its list from the records instead: `write_review_csv`)."""
    rows = [p for p in placed if p.flagged]
    if not rows:
        return
    new = not path.exists()
    header = REVIEW_COLUMNS if new else _header(path)  # a list an older sorter began keeps its columns
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        if new:
            writer.writeheader()
        for p in rows:
            writer.writerow(review_row(str(p.final), str(p.rec.path), p.label, p.conf, p.score, strategy, version,
                                       p.rec.image_id or "", p.sorted_at.isoformat(), p.unfamiliar))
        fh.flush()
        os.fsync(fh.fileno())


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh), None) or REVIEW_COLUMNS
