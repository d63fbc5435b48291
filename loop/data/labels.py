"""Read the labels without Python: filter the manifest (`sortloop labels`) and one photo's history (`history`).

Filters match whole values (`label="chair"`, `flag="low_confidence"`, `review="reviewed"`, `split="valid"`);
`review="none"` / `flag="none"` / `label="none"` select rows where the value is missing.
Caveat: an image is named by its content hash; a path is resolved by hashing the file (or, if it no longer
exists, by the path the manifest recorded when the photo was first seen).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from loop.choices import check_choice
from loop.data import manifest as mf
from loop.data.ingest import SOURCES
from loop.data.label_sources import LABEL_SOURCES
from loop.data.manifest import REVIEW_STATUSES
from loop.errors import ManifestError
from loop.flags import FLAGS
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

# What `sortloop labels` shows, in order; the manifest has more (see loop.data.manifest.COLUMNS).
LIST_COLUMNS = ["image_id", "label", "label_source", "label_by", "source", "split", "item_id", "flag",
                "review_status", "pred_label", "pred_conf", "path"]
# filter name -> manifest column
FILTERS = {"label": "label", "source": "source", "label_source": "label_source", "flag": "flag",
           "review": "review_status", "split": "split"}
MISSING = "none"
# The values each filter can take besides those in the manifest (so a typo is caught on a new workspace too).
KNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "source": SOURCES,
    "label_source": LABEL_SOURCES,
    "flag": FLAGS,
    "review": REVIEW_STATUSES,
    "split": ("train", "valid"),
}


def valid_values(ws: Workspace, df: pd.DataFrame, name: str) -> list[str]:
    """What filter `name` can match: its known values, the manifest's, and for `label` the declared classes."""
    values = set(KNOWN_VALUES.get(name, ())) | {str(v) for v in df[FILTERS[name]].dropna().unique()}
    if name == "label":
        values |= set(ws.settings.classes)
    return sorted(values)


def filter_labels(ws: Workspace, **filters: str | None) -> pd.DataFrame:
    """Manifest rows matching every given filter, with `LIST_COLUMNS`, ordered by label then path.

    Args:
        filters: any of `FILTERS` (label, source, label_source, flag, review, split); None = no filter;
            "none" matches a missing value.

    Raises:
        ManifestError: an unknown filter name (the valid ones are listed).
        UnknownChoiceError: a value none of the photos can have (a typo), with the valid ones.

    Example:
        >>> filter_labels(open_workspace("data"), label="chair", split="valid")   # doctest: +SKIP
    """
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise ManifestError(f"unknown filter {unknown[0]!r}; use one of {', '.join(FILTERS)}")
    df = mf.load(ws)
    keep = pd.Series(True, index=df.index)
    for name, value in filters.items():
        if value is None:
            continue
        check_choice(f"--{name.replace('_', '-')}", value, [MISSING, *valid_values(ws, df, name)])
        column = df[FILTERS[name]]
        keep &= column.isna() if value == MISSING else (column == value).fillna(False)
    rows = df.loc[keep, LIST_COLUMNS]
    return rows.sort_values(["label", "path"], na_position="last").reset_index(drop=True)


@dataclass(frozen=True)
class ImageHistory:
    """One photo's manifest row and every label change it went through, oldest first."""

    row: pd.Series
    changes: pd.DataFrame  # columns: old_label, new_label, old_source, source, by, at, note

    def lines(self) -> list[str]:
        """Human-readable lines: the photo, then one line per change."""
        r = self.row
        label = "unlabeled" if pd.isna(r["label"]) else f"{r['label']} ({r['label_source']})"
        text = [f"{r['image_id']}  {r['path']}", f"now: {label}; split {_na(r['split'])}; "
                f"flag {_na(r['flag'])}; review {_na(r['review_status'])}; model guess {_na(r['pred_label'])}"]
        if self.changes.empty:
            text.append("no label changes recorded")
        for c in self.changes.itertuples():
            old = "unlabeled" if c.old_label is None or pd.isna(c.old_label) else f"{c.old_label} ({c.old_source})"
            note = f"  [{c.note}]" if isinstance(c.note, str) and c.note else ""
            text.append(f"{pd.Timestamp(c.at).isoformat(timespec='seconds')}  {old} -> {c.new_label} "
                        f"({c.source}) by {c.by}{note}")
        return text


def find_image(ws: Workspace, ref: str | Path, df: pd.DataFrame | None = None) -> pd.Series:
    """The manifest row of a photo named by a path (hashed if it exists) or a sha256 prefix (6+ hex digits).

    Raises:
        ManifestError: no such photo, or a prefix that matches several (say how to narrow it).
    """
    from loop.data.images import file_sha256

    df = mf.load(ws) if df is None else df
    path = Path(ref).expanduser()
    if path.is_file():
        image_id = file_sha256(path)
        hit = df[df["image_id"] == image_id]
        if hit.empty:
            raise ManifestError(f"{path} is not in the manifest (sha256 {image_id[:12]}); "
                                "ingest or sort it first")
        return hit.iloc[0]
    by_path = df[df["path"] == str(path.resolve())]
    if not by_path.empty:
        return by_path.iloc[0]
    text = str(ref).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{6,64}", text):
        raise ManifestError(f"{ref}: no such file, and not a sha256 prefix (6 or more hex digits)")
    hit = df[df["image_id"].str.startswith(text)]
    if hit.empty:
        raise ManifestError(f"no photo in the manifest has a sha256 starting with {text}")
    if len(hit) > 1:
        raise ManifestError(f"{len(hit)} photos have a sha256 starting with {text}; give more digits")
    return hit.iloc[0]


def image_history(ws: Workspace, ref: str | Path) -> ImageHistory:
    """One photo's current row and its label history (`history/labels.jsonl`), oldest first.

    Example:
        >>> print("\\n".join(image_history(open_workspace("data"), "3fa2c1").lines()))   # doctest: +SKIP
    """
    row = find_image(ws, ref)
    history = mf.history(ws)
    changes = history[history["image_id"] == row["image_id"]].drop(columns=["image_id"]).reset_index(drop=True)
    return ImageHistory(row, changes)


def _na(value: object) -> str:
    return "-" if value is None or pd.isna(value) else str(value)
