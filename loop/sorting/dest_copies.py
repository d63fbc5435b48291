"""`DEST/.sortloop/copies.csv`, the standalone sorter's record of its copies: where it lives, its columns,
and its reader.

Why apart from `loop.sorting.dest_record` (which writes it): the workspace's review list reads the PC's
flagged rows too (`loop.sorting.review_csv`), and the record's writer builds on that list, so the reader
sits below both. Caveat: stdlib only, like the standalone sorter.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

RECORD_DIR = ".sortloop"
COPIES_CSV = "copies.csv"
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
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        rows = list(csv.DictReader(fh))
    complete = [r for r in rows if r.get("dest_mtime_ns") not in (None, "") and "\ufffd" not in "".join(
        str(v) for v in r.values())]
    if len(complete) < len(rows):
        logger.warning("ignoring %d incomplete lines in %s", len(rows) - len(complete), path)
    return complete


def pc_unfamiliar(row: dict[str, str]) -> bool:
    """Whether a DEST-record row is an unfamiliar photo: it went to the unfamiliar folder, not its label's."""
    return PurePosixPath(row["dest_path"]).parts[0] != row["label"]
