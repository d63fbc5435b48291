"""The manifest: one row per image, keyed by the sha256 of its bytes, the single source of truth.

A renamed or copied photo has the same `image_id`, so it is the same image. Every label change goes
through `set_labels` (new labeled rows through `ingest.register_images`), which gives a newly labeled
photo its train/valid side (`loop.data.splits`) and keeps the label history (`history/labels.jsonl`) exactly
equal to what the manifest committed, whatever moment a process is killed at (`commit_with_history`):
the changes are first written as intents (`history/labels.pending.jsonl`), then the manifest is replaced,
then they are appended to the history; an intent left by a kill is appended the next time the history is
read or a label written, only if the manifest shows it (`recover_history`): no phantom, lost or doubled line.
`path` is where the image was first seen. When those bytes are a sorted copy (the standalone sorter's,
imported by `scan`) and the copy moves, `follow_copies` points the row at its new place, so push, train,
apply and resort can still read it. Caveat: later copies elsewhere do not move a path that still reads.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from loop.atomic import append_jsonl, atomic_write, read_jsonl
from loop.data.classnames import check_label
from loop.data.splits import assign_splits
from loop.tables import conform, locked, read_table, update_table, write_table_atomic
from loop.workspace import Workspace

COLUMNS: dict[str, str] = {
    "image_id": "string",  # sha256 of the file bytes
    "path": "string",  # absolute path where the image was first seen
    "source": "string",  # "user" (real photos; metrics are on these) or "web"
    "item_id": "string",  # physical item: all its photos stay on one side of the split
    "item_rule": "string",  # how item_id was set: csv, exact, near_duplicate, burst, single
    "label": "string",  # the current label (NA = unlabeled; "_other" = none of these, never a class)
    "label_source": "string",  # folder, review, user_move, ...
    "label_by": "string",  # who set it (reviewer e-mail, "ingest", "scan", ...)
    "label_at": "datetime64[ns, UTC]",
    "split": "string",  # "train" / "valid" (NA until assigned)
    "pred_label": "string",  # latest prediction
    "pred_conf": "float64",
    "pred_score": "float64",  # uncertainty score of the flag strategy; higher = more worth a look
    "pred_model": "string",
    "flag": "string",  # low_confidence, user_moved, or NA
    "review_task": "Int64",  # Label Studio task id (a hint only, never a key)
    "review_status": "string",  # queued, pushed, reviewed, skipped
    "review_rank": "float64",  # order chosen by `loop.review.queue` (lower = sooner; NA = not selected)
    "phash": "string",  # perceptual hash (hex), for near-duplicate grouping
    "taken_at": "datetime64[ns, UTC]",  # EXIF DateTimeOriginal, if any
    "added_at": "datetime64[ns, UTC]",
}

logger = logging.getLogger(__name__)

HISTORY_FILE = "labels.jsonl"
PENDING_FILE = "labels.pending.jsonl"  # intents of the one label write in progress (see commit_with_history)
# The values `review_status` takes (what `sortloop labels --review` accepts besides "none"; flags: loop.flags)
REVIEW_STATUSES = ("queued", "pushed", "reviewed", "skipped")


def manifest_path(ws: Workspace) -> Path:
    return ws.manifest_dir / "manifest.parquet"


def history_path(ws: Workspace) -> Path:
    return ws.history_dir / HISTORY_FILE


def load(ws: Workspace) -> pd.DataFrame:
    """The manifest as a DataFrame (empty, with all columns, before the first ingest).

    Example:
        >>> df = load(open_workspace("data"))   # doctest: +SKIP
        >>> df.groupby("split").label.value_counts()
    """
    return read_table(manifest_path(ws), COLUMNS)


def update(ws: Workspace, change: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """Apply `change(manifest) -> manifest` atomically under the manifest lock.

    Do not change labels this way: use `set_labels`, which keeps the history.
    """
    return update_table(manifest_path(ws), COLUMNS, change)


def follow_copies(ws: Workspace, moved: dict[str, str]) -> int:
    """Rows whose `path` is a copy that moved (old path -> new path) now point at the new place.

    Why: a photo first seen as a copy (sorted on another PC) has no other known bytes; a person moving
    that copy must not make it unreadable. Rows whose path is elsewhere (an original) are left alone.
    Returns how many rows changed.
    """
    if not moved:
        return 0
    changed = 0

    def follow(df: pd.DataFrame) -> pd.DataFrame:
        nonlocal changed
        hit = df["path"].isin(list(moved))
        changed = int(hit.sum())
        df.loc[hit, "path"] = df.loc[hit, "path"].map(moved)
        return df

    update(ws, follow)
    return changed


def now_utc() -> pd.Timestamp:
    return pd.Timestamp(datetime.now(UTC))


@dataclass(frozen=True)
class LabelChange:
    """One label decision: `image_id` is now `label`, said by `by` through `source`.

    `label` None takes a label back (the photo becomes unlabeled; `source` None then)."""

    image_id: str
    label: str | None
    source: str | None
    by: str
    at: pd.Timestamp | None = None
    note: str = ""


def pending_path(ws: Workspace) -> Path:
    return ws.history_dir / PENDING_FILE


def commit_with_history(ws: Workspace, df: pd.DataFrame, records: list[dict]) -> None:
    """Replace the manifest with `df` and append `records` (label changes it contains) to the history, so
    that the history says exactly what the manifest committed even if this process is killed at any point.

    The caller holds the manifest lock (`locked(manifest_path(ws))`). Steps: (1) the records, tagged with a
    transaction id, are written atomically as intents; (2) the manifest is replaced atomically; (3) the
    records are appended to the history; (4) the intents are removed. `recover_history` finishes or drops
    an interrupted one.
    """
    recover_history(ws)  # an earlier write killed midway is settled before this one
    if not records:
        write_table_atomic(conform(df, COLUMNS), manifest_path(ws))
        return
    txn = uuid.uuid4().hex
    records = [{**r, "txn": txn} for r in records]
    with atomic_write(pending_path(ws), "w") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        write_table_atomic(conform(df, COLUMNS), manifest_path(ws))
    except OSError:  # a full disk: the manifest is unchanged (atomic), so the intents are void
        pending_path(ws).unlink(missing_ok=True)
        raise
    append_jsonl(history_path(ws), records, ensure_ascii=False)
    pending_path(ws).unlink()


def recover_history(ws: Workspace) -> int:
    """Settle a label write that was killed midway: append its intents that the manifest shows (it was
    committed) and are not in the history yet; drop the others (it was not). Returns the lines appended.

    Call with the manifest lock held (`commit_with_history` and `history` do).
    """
    pending = pending_path(ws)
    if not pending.exists():
        return 0
    intents = read_jsonl(pending)
    df = read_table(manifest_path(ws), COLUMNS).drop_duplicates("image_id").set_index("image_id")
    logged = {(r.get("txn"), r.get("image_id")) for r in read_jsonl(history_path(ws))} if intents else set()
    last = {r.get("image_id"): r for r in intents}  # an image changed twice in one write: its last change
    shown = {image_id for image_id, r in last.items() if _committed(df, r)}
    missing = [r for r in intents if r.get("image_id") in shown and (r.get("txn"), r.get("image_id")) not in logged]
    if missing:
        append_jsonl(history_path(ws), missing, ensure_ascii=False)
    pending.unlink()
    logger.info("settled an interrupted label write: %d of %d change(s) were committed, %d appended to the history",
                sum(1 for r in intents if r.get("image_id") in shown), len(intents), len(missing))
    return len(missing)


def _committed(df: pd.DataFrame, record: dict) -> bool:
    """True if the manifest row shows this change: same label, source and time."""
    image_id = record.get("image_id")
    if image_id not in df.index:
        return False
    row = df.loc[image_id]
    if pd.isna(row["label_at"]):
        return False
    # a label taken back (new_label None) shows as an NA label and source
    return (_opt(row["label"]) == record.get("new_label") and _opt(row["label_source"]) == record.get("source")
            and row["label_at"] == pd.to_datetime(record.get("at"), utc=True))


def set_labels(ws: Workspace, changes: Iterable[LabelChange],
               also: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> int:
    """Apply label changes to the manifest and the history log; returns how many labels changed.

    A change that repeats the current label and source is a no-op (no history line), so replaying the
    same changes is safe. Unknown image ids raise ManifestError: the caller must ingest first; a label
    that cannot be a class raises ClassNameError (nothing is written then). `also(manifest) -> manifest`
    changes other columns in the same locked read and write (a pull's review statuses with its labels).
    """
    from loop.errors import ManifestError

    changes = list(changes)
    if not changes and also is None:
        return 0
    for c in changes:
        if c.label is not None:
            check_label(c.label)  # a class, or "none of these" (OTHER_LABEL)
    path = manifest_path(ws)
    with locked(path):
        df = read_table(path, COLUMNS)
        index = pd.Index(df["image_id"])
        missing = [c.image_id for c in changes if c.image_id not in index]
        if missing:
            raise ManifestError(f"{len(missing)} image(s) not in the manifest, e.g. {missing[0]}; ingest them first")
        df = df.set_index("image_id", drop=False)
        records, stamp = [], now_utc()
        for c in changes:
            old_label, old_source = _opt(df.at[c.image_id, "label"]), _opt(df.at[c.image_id, "label_source"])
            if old_label == c.label and old_source == c.source:
                continue
            at = c.at if c.at is not None else stamp
            records.append(
                {
                    "image_id": c.image_id,
                    "old_label": old_label,
                    "new_label": c.label,
                    "old_source": old_source,
                    "source": c.source,
                    "by": c.by,
                    "at": pd.Timestamp(at).isoformat(),
                    "note": c.note,
                    # what the model had said when the person labeled it: the flags' measured catch rate
                    "pred_label": _opt(df.at[c.image_id, "pred_label"]),
                    "pred_model": _opt(df.at[c.image_id, "pred_model"]),
                    "flag": _opt(df.at[c.image_id, "flag"]),
                }
            )
            df.at[c.image_id, "label"] = pd.NA if c.label is None else c.label
            df.at[c.image_id, "label_source"] = pd.NA if c.source is None else c.source
            df.at[c.image_id, "label_by"] = c.by
            df.at[c.image_id, "label_at"] = pd.Timestamp(at)
        df = df.reset_index(drop=True)
        if records:
            # A photo labeled for the first time (review, user move) gets its stable train/valid side now.
            df = assign_splits(df, ws.settings.split)
        if also is not None:
            df = also(df)
        if records or also is not None:
            commit_with_history(ws, df, records)
        return len(records)


def _opt(value: object) -> str | None:
    return None if pd.isna(value) else str(value)


def history(ws: Workspace) -> pd.DataFrame:
    """Every label change the manifest committed, oldest first (columns: image_id, old_label, new_label,
    source, by, at, note, and the model's pred_label / pred_model / flag at that moment: None in lines
    written before they were recorded)."""
    path = history_path(ws)
    cols = ["image_id", "old_label", "new_label", "old_source", "source", "by", "at", "note", "pred_label",
            "pred_model", "flag"]
    if pending_path(ws).exists():
        with locked(manifest_path(ws)):
            recover_history(ws)
    if not path.exists():
        return pd.DataFrame(columns=cols)
    rows = read_jsonl(path)
    out = pd.DataFrame(rows, columns=cols, dtype=object)
    out["at"] = pd.to_datetime(out["at"], utc=True, format="ISO8601")
    return out
