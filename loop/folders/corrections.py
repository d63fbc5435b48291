"""Corrections from user moves: a sorted copy a person moved to another category folder is a label.

`scan(ws, dest)` compares a sorted tree with the copy records `sort` kept (`loop.sorting.copies`). A copy still
at its recorded path with its recorded size and mtime is unchanged and is not read again. A copy missing
from its path is looked for elsewhere in the tree BY CONTENT (sha256), not by name, so a renamed copy is
found too; only files whose size matches a missing copy are hashed. Found in another category folder
(the first folder under DEST; the unfamiliar folder `sort.other_folder` counts as one, and a copy moved
there is labeled "none of these", `OTHER_LABEL`) → `LabelChange(source="user_move")` through
`manifest.set_labels` (which keeps the label history) and the manifest flag `user_moved`, so a reviewer
can confirm it. Not found → reported as deleted; a deletion is not a label. Moved out of every category
(to DEST itself or another folder starting with "_" or ".") → reported, not a label.

Copies sortloop moved itself (`apply`, `resort`) are in the records already, so they are not moves; scan
holds the moves lock (`loop.folders.moves.exclusive`) and finishes a batch a crash interrupted before it looks.
A move scan follows is marked `placed_by = user`: apply and resort never move that copy again.
Copies made by the standalone sorter on another PC are imported first from DEST/.sortloop (loop.sorting.handback);
their manifest rows point at the copy, so a move points them at its new place (`manifest.follow_copies`).

Caveat: a copy moved OUTSIDE the sorted tree looks deleted; a copy that was edited (new bytes) is a
different image and is reported as modified, not followed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from loop.data import manifest
from loop.data.classnames import OTHER_LABEL, class_name_problem, normal_name, twin_problem
from loop.data.images import file_sha256, iter_image_files
from loop.data.label_sources import USER_MOVE
from loop.errors import SortloopError
from loop.flags import USER_MOVED
from loop.folders import moves
from loop.progress import ProgressCallback, no_progress
from loop.sorting import copies
from loop.sorting.handback import import_dest_record
from loop.sorting.review_csv import write_review_csv
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

SCANNER = "scan"


@dataclass
class MovedCopy:
    """One copy found somewhere other than where sort (or the last scan) left it."""

    image_id: str
    old_path: str
    new_path: str
    old_category: str | None
    new_category: str | None  # None: moved out of every category folder


@dataclass
class ScanReport:
    """What one scan found. `corrections` are the moves that changed a label."""

    dest: str = ""
    checked: int = 0  # copy records looked at
    unchanged: int = 0
    hashed: int = 0  # files read to compute a hash (the rest were matched by size + mtime)
    moves: list[MovedCopy] = field(default_factory=list)
    corrections: list[MovedCopy] = field(default_factory=list)
    labels_changed: int = 0
    deleted: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    uncategorised: list[str] = field(default_factory=list)
    imported: int = 0  # copies the standalone sorter made, imported from DEST/.sortloop by this scan
    refused: list[tuple[MovedCopy, str]] = field(default_factory=list)  # moves into a twin of a class: flagged only

    def summary(self) -> str:
        text = f"imported {self.imported} copies the standalone sorter made; " if self.imported else ""
        text += (
            f"scanned {self.checked} sorted copies in {self.dest}: {self.unchanged} unchanged, "
            f"{len(self.corrections)} moved to another category (corrections, {self.labels_changed} labels "
            f"changed), {len(self.moves) - len(self.corrections)} other moves, {len(self.deleted)} deleted, "
            f"{len(self.modified)} modified; {self.hashed} files hashed"
        )
        for move in self.corrections[:20]:
            text += f"\n  {Path(move.new_path).name}: {move.old_category} -> {move.new_category}"
        for move, why in self.refused[:20]:
            text += (f"\n  NOT a label: {Path(move.new_path).name} moved into {move.new_category!r}: {why}; "
                     "flagged for review instead (rename the folder to the class it means)")
        return text


def category_of(path: Path, dest: Path, other_folder: str | None = None) -> str | None:
    """The category folder a file under `dest` is in (first folder below dest; `other_folder`, the
    unfamiliar folder, counts as one), or None if in none."""
    parts = path.relative_to(dest).parts
    if len(parts) < 2:
        return None
    if parts[0] == other_folder:
        return parts[0]
        return None
    name = normal_name(parts[0])  # macOS writes folder names in NFD; a class name is stored in NFC
    return None if class_name_problem(name) is not None else name  # "_x", ".x", "CONIN$"...: not a category


def _recorded_stat(rec: Mapping[str, Any]) -> tuple[int, int] | None:
    size, mtime = rec["dest_size"], rec["dest_mtime_ns"]
    if pd.isna(size) or pd.isna(mtime):
        return None
    return int(size), int(mtime)


def scan(ws: Workspace, dest: Path | str, *, on_progress: ProgressCallback | None = None) -> ScanReport:
    """Detect moved and deleted sorted copies under `dest`; record moves to another category as labels.

    Args:
        ws: the workspace holding the copy records and the manifest.
        dest: a destination folder given to `sort` earlier.
        on_progress: called with (copies checked, total).
    Returns:
        A ScanReport. Running it again right after finds nothing new (the records follow the moves).
    Raises:
        SortloopError: `dest` does not exist or was never a sort destination.

    Example:
        >>> print(scan(open_workspace("data"), "~/photos/sorted").summary())   # doctest: +SKIP
    """
    dest = Path(dest).expanduser().absolute()
    if not dest.is_dir():
        raise SortloopError(f"{dest} is not a folder; give the destination you sorted into")
    # sortloop's own moves (apply, resort) finish first and do not run meanwhile: never taken for a person's
    with moves.exclusive(ws):
        return _scan(ws, dest, on_progress or no_progress)


def _scan(ws: Workspace, dest: Path, on_progress: ProgressCallback) -> ScanReport:
    imported = import_dest_record(ws, dest)  # copies made by the standalone sorter (DEST/.sortloop), if any
    records = copies.load_records(ws, dest)
    if records.empty:
        raise SortloopError(f"nothing was ever sorted into {dest} with this workspace; run `sortloop sort` first")
    report = ScanReport(dest=str(dest), imported=imported)
    present = records[records["status"] == "present"]
    total = len(present)
    on_progress(0, total)

    on_disk: dict[str, tuple[int, int]] = {}
    for path in iter_image_files(dest):
        try:
            st = path.stat()
        except OSError:
            continue
        on_disk[str(path)] = (st.st_size, st.st_mtime_ns)

    updates: dict[str, dict] = {}
    missing: list[dict[str, Any]] = []
    claimed: set[str] = set()
    now = manifest.now_utc()
    classes = {str(c) for c in manifest.load(ws)["label"].dropna().unique()}  # a move into a twin of one is refused
    # Rows as plain dicts: a tree holds tens of thousands of copies, and iterrows builds a Series per row
    for i, rec in enumerate(present.astype(object).to_dict("records")):
        report.checked += 1
        stat = on_disk.get(rec["dest_path"])
        if stat is not None and stat == _recorded_stat(rec):
            report.unchanged += 1
            claimed.add(rec["dest_path"])
        elif stat is not None:
            report.hashed += 1
            if file_sha256(Path(rec["dest_path"])) == rec["image_id"]:  # touched, same bytes
                report.unchanged += 1
                claimed.add(rec["dest_path"])
                updates[rec["record_id"]] = {"dest_size": stat[0], "dest_mtime_ns": stat[1], "checked_at": now}
            else:
                report.modified.append(rec["dest_path"])
        else:
            missing.append(rec)
        if i % 256 == 0:
            on_progress(i, total)

    # Look for the missing copies among the files no record claims, hashing only plausible sizes.
    if missing:
        sizes = {int(r["dest_size"]) for r in missing if not pd.isna(r["dest_size"])}
        by_hash: dict[str, list[str]] = defaultdict(list)
        for path, (size, _mtime) in on_disk.items():
            if path in claimed or size not in sizes:
                continue
            report.hashed += 1
            try:
                by_hash[file_sha256(Path(path))].append(path)
            except OSError:
                continue
        resolved: dict[str, dict] = {}  # old dest_path -> update: records sharing one copy share its fate
        for rec in missing:
            if rec["dest_path"] in resolved:
                updates[rec["record_id"]] = resolved[rec["dest_path"]]
                continue
            candidates = [p for p in by_hash.get(rec["image_id"], []) if p not in claimed]
            if not candidates:
                report.deleted.append(rec["dest_path"])
                updates[rec["record_id"]] = resolved[rec["dest_path"]] = {"status": "deleted", "checked_at": now}
                continue
            new_path = candidates[0]
            claimed.add(new_path)
            old_cat = None if pd.isna(rec["category"]) else str(rec["category"])
            new_cat = category_of(Path(new_path), dest, ws.settings.sort.other_folder)
            move = MovedCopy(str(rec["image_id"]), str(rec["dest_path"]), new_path, old_cat, new_cat)
            report.moves.append(move)
            twin = None if new_cat is None else twin_problem(new_cat, classes)
            if new_cat is None:
                report.uncategorised.append(new_path)
            elif twin is not None:  # `Chair/` beside `chair/`: one folder on Windows, never a class
                report.refused.append((move, twin))
            elif new_cat != old_cat:
                report.corrections.append(move)
            size, mtime = on_disk[new_path]
            updates[rec["record_id"]] = resolved[rec["dest_path"]] = {
                "dest_path": new_path, "category": new_cat, "dest_size": size, "dest_mtime_ns": mtime,
                "checked_at": now, "placed_by": "user",  # apply and resort never move it again
            }
    for path in report.modified:  # keep reporting an edited copy once, then stop following it
        rid = present.loc[present["dest_path"] == path, "record_id"]
        for r in rid:
            updates.setdefault(r, {}).update({"status": "modified", "checked_at": now})

    report.labels_changed = _record_corrections(ws, report.corrections)
    _flag_refused(ws, [m for m, _ in report.refused])
    manifest.follow_copies(ws, {m.old_path: m.new_path for m in report.moves})  # bytes first seen as a copy
    copies.update_records(ws, updates)
    if updates:
        write_review_csv(ws, dest)
    on_progress(total, total)
    logger.info(report.summary())
    return report


def _flag_refused(ws: Workspace, moves: list[MovedCopy]) -> None:
    """A move whose folder cannot be a class stays a review item: flagged `user_moved`, its label unchanged."""
    if not moves:
        return
    from loop.data.ingest import ImageInfo, register_images

    register_images(ws, [ImageInfo(image_id=m.image_id, path=m.new_path) for m in moves], source="user")
    ids = {m.image_id for m in moves}

    def flag(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[df["image_id"].isin(ids), "flag"] = USER_MOVED
        return df

    manifest.update(ws, flag)


def _record_corrections(ws: Workspace, moves: list[MovedCopy]) -> int:
    """Labels (source user_move, with history) and the `user_moved` flag for each correction."""
    if not moves:
        return 0
    from loop.data.ingest import ImageInfo, register_images

    # A copy sorted before the manifest knew it (or a reset manifest): register it first.
    register_images(ws, [ImageInfo(image_id=m.image_id, path=m.new_path) for m in moves], source="user")
    other = ws.settings.sort.other_folder  # a copy moved there: "none of these", like the review answer
    changes = [
        manifest.LabelChange(image_id=m.image_id, label=OTHER_LABEL if m.new_category == other else str(m.new_category),
                             source=USER_MOVE, by=SCANNER, note=f"moved {m.old_path} -> {m.new_path}")
        for m in moves
    ]
    changed = manifest.set_labels(ws, changes)
    ids = {m.image_id for m in moves}

    def flag(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[df["image_id"].isin(ids), "flag"] = USER_MOVED
        return df

    manifest.update(ws, flag)
    return changed
