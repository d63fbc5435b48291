"""`DEST/_review.csv`: the sorted copies still waiting for a person's look, rebuilt from the records.

Why rebuilt, not appended: the list must follow what happened after the sort (a reviewer labeled the photo,
a person moved the copy, `apply` or `resort` moved it, a newer model is sure of it now). So it is written
whole, atomically, from the copy records (`loop.sorting.copies`: where each copy is, its current flag) and the
manifest (who labeled the image): one row per flagged copy present in the tree, sorted by path, header
always. The standalone sorter's flagged copies (`DEST/.sortloop/copies.csv`) not imported by a scan yet
are listed too, so a sort from the workspace never drops the PC's rows. A photo a person labeled (review,
user move) or a reviewer marked reviewed leaves the list.
Caveat: the file is sortloop's own; edits to it are overwritten by the next sort, scan, apply or resort.
The manifest (pandas) is imported where the list is rebuilt, so the frozen sorter can import this module
without it (it rebuilds its own list: `loop.sorting.dest_record.write_review`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from loop.atomic import atomic_write
from loop.data.label_sources import labeled_after_sorting
from loop.errors import ModelError
from loop.flags import LOW_CONFIDENCE, UNFAMILIAR
from loop.model.artifact import read_spec
from loop.scoring.flagging import settings_point
from loop.sorting import copies, dest_copies

if TYPE_CHECKING:
    import pandas as pd

    from loop.workspace import Workspace

    Tables = tuple[pd.DataFrame, pd.DataFrame]  # (copy records, manifest)

logger = logging.getLogger(__name__)

REVIEW_CSV = "_review.csv"
REVIEW_COLUMNS = ["dest_path", "source_path", "pred_label", "pred_conf", "score", "strategy", "model_version",
                  "image_id", "sorted_at", "flag"]  # flag: low_confidence, or unfamiliar (in the unfamiliar folder)


def pending_rows(ws: Workspace, dest: Path, tables: Tables | None = None) -> list[dict[str, str]]:
    """The flagged copies under `dest` that no person has labeled or reviewed yet, sorted by path.

    `tables`: (every copy record, the manifest) as the caller just wrote them; else both are read."""
    import pandas as pd

    from loop.data import manifest

    every = copies.load_records(ws, dest) if tables is None else copies.records_under(tables[0], dest)
    records = every[(every["status"] == "present") & every["flagged"].fillna(False).astype(bool)]
    # Rebuilt on every flush of a sort, over tables of tens of thousands of rows: columns go through numpy
    # (iterating pandas' Arrow strings costs ~1 µs an element)
    pc_flagged = [r for r in dest_copies.read_rows(dest) if r.get("flagged") == "1"]  # the standalone sorter's
    imported = set(every["record_id"].to_numpy(object)) if pc_flagged else set()
    from_pc = [r for r in pc_flagged if r["record_id"] not in imported]  # not imported by a scan yet
    if records.empty and not from_pc:
        return []
    df = manifest.load(ws) if tables is None else tables[1]
    reviewed = df["review_status"].eq("reviewed").fillna(False).to_numpy(bool)
    human = reviewed | labeled_after_sorting(df)  # the manifest always has the column
    done = set(df["image_id"].to_numpy(object)[human])
    strategies: dict[str, str] = {}
    rows: dict[str, dict[str, str]] = {}
    columns = ["image_id", "dest_path", "source_path", "label", "confidence", "score", "model_version", "sorted_at",
               "category"]
    for rec in records[columns].astype(object).itertuples():
        if rec.image_id in done or rec.dest_path in rows:
            continue
        rows[rec.dest_path] = review_row(
            rec.dest_path, rec.source_path, rec.label, rec.confidence, rec.score,
            _strategy(ws, str(rec.model_version), strategies), rec.model_version, rec.image_id,
            "" if pd.isna(rec.sorted_at) else rec.sorted_at.isoformat(), rec.category == ws.settings.sort.other_folder)
    for r in from_pc:
        final = str(Path(dest).joinpath(*PurePosixPath(r["dest_path"]).parts))
        if r["image_id"] in done or final in rows or not Path(final).exists():
            continue
        rows[final] = review_row(final, r["source_path"], r["label"], float(r["confidence"]), float(r["score"]),
                                 _strategy(ws, r["model_version"], strategies), r["model_version"], r["image_id"],
                                 r["sorted_at"], dest_copies.pc_unfamiliar(r))
    return [rows[k] for k in sorted(rows)]


def _strategy(ws: Workspace, version: str, cache: dict[str, str]) -> str:
    """The flag strategy the model `version` sorted with (`sort.flag_strategy` may be "auto")."""
    if version not in cache:
        try:
            cache[version] = settings_point(read_spec(ws.models_dir / version), ws.settings.sort)["strategy"]
        except ModelError:  # the version folder is gone: say what the settings say
            cache[version] = ws.settings.sort.flag_strategy
    return cache[version]


def write_review_csv(ws: Workspace, dest: Path, tables: Tables | None = None) -> Path:
    """Rebuild `dest/_review.csv` atomically from the records and the manifest (`tables`: as `pending_rows`);
    returns its path."""
    path = Path(dest) / REVIEW_CSV
    rows = pending_rows(ws, Path(dest), tables)
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
            "sorted_at": sorted_at, "flag": UNFAMILIAR if unfamiliar else LOW_CONFIDENCE}
