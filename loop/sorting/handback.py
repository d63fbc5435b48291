"""Sorts made away from the workspace come back: `DEST/.sortloop/copies.csv` into the workspace.

The standalone sorter (`sortloop bundle`) records its copies inside DEST (`loop.sorting.dest_record`). `scan`
calls `import_dest_record` first, so each of those copies becomes an ordinary copy record (dest_root =
DEST as mounted here) and each photo a manifest row with the sorter's prediction and, if it was unsure,
the flag `low_confidence`, or `unfamiliar` for a copy in the unfamiliar folder (exactly what `sortloop
sort` writes; `review push` sends those). The scan that
follows then sees moves made on that PC as corrections.
Caveat: photos are registered at their copy's path in DEST (the sorter's source folder is on another
machine), without pHash or EXIF time, so they join no inferred item group.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

import pandas as pd

from loop.sorting import copies, dest_copies
from loop.workspace import Workspace

logger = logging.getLogger(__name__)


def import_dest_record(ws: Workspace, dest: Path | str) -> int:
    """Import the copies listed in `dest/.sortloop/copies.csv` that the workspace does not know yet.

    Returns:
        How many copy records were added (0 if `dest` has no such record, or nothing new).
    """
    from loop.data.ingest import ImageInfo, register_images
    from loop.sorting.folder import record_predictions

    dest = Path(dest).expanduser().absolute()
    rows = dest_copies.read_rows(dest)
    if not rows:
        return 0
    known = set(copies.load_records(ws)["record_id"])
    fresh = [r for r in rows if r["record_id"] not in known]
    if not fresh:
        return 0
    register_images(ws, [ImageInfo(image_id=r["image_id"], path=str(dest / r["dest_path"])) for r in fresh],
                    source="user")
    by_version: dict[str, dict[str, tuple[str, float, float, bool]]] = {}
    for r in fresh:  # in file order: a later sort of the same photo wins, as it does in `sortloop sort`
        by_version.setdefault(r["model_version"], {})[r["image_id"]] = (
            r["label"], float(r["confidence"]), float(r["score"]), r["flagged"] in ("1", "True", "true"))
    unfamiliar = {r["image_id"] for r in fresh if _folder(r) == ws.settings.sort.other_folder}
    for version, preds in by_version.items():
        record_predictions(ws, preds, version, unfamiliar)
    now = pd.Timestamp.now(tz="UTC")
    copies.append_records(ws, [{
        "record_id": r["record_id"], "image_id": r["image_id"], "source_path": r["source_path"],
        "source_size": int(r["source_size"]), "source_mtime_ns": int(r["source_mtime_ns"]),
        "dest_root": str(dest), "dest_path": str(dest / r["dest_path"]), "label": r["label"],
        "confidence": float(r["confidence"]), "score": float(r["score"]),
        "flagged": r["flagged"] in ("1", "True", "true"), "model_version": r["model_version"],
        "sorted_at": pd.Timestamp(r["sorted_at"]), "run_id": r["run_id"], "category": _folder(r),
        "dest_size": int(r["dest_size"]), "dest_mtime_ns": int(r["dest_mtime_ns"]), "status": "present",
        "checked_at": now,
    } for r in fresh])
    logger.info("imported %d copies the standalone sorter made into %s", len(fresh), dest)
    return len(fresh)


def _folder(row: dict[str, str]) -> str:
    """The folder under DEST the sorter put the copy in: its class, or the unfamiliar folder."""
    return PurePosixPath(row["dest_path"]).parts[0]
