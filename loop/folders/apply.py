"""Labels reach the folders: a sorted copy of a labeled photo moves to its label's category folder.

`apply_labels(ws)` runs after every `review pull` (and as `sortloop apply [DEST]`). The rule: a photo with
a label in the manifest (a reviewer's, a confirmed user move, a labeled folder, however it was set)
belongs in `DEST/<label>/` ("none of these" in the unfamiliar folder, `sort.other_folder`); its copies
elsewhere move there, keeping their sub-folders and name.

Only copies sortloop made and left untouched move: still at the recorded path, with the recorded bytes
(size + mtime, or the sha256 when only the mtime changed), and not placed by a person (a move `scan`
followed). A copy a person moved, renamed or edited is reported and left alone; originals are never
touched. Moves go through `loop.folders.moves` (journal first, link + unlink, never overwriting, recorded in the
copy records so `scan` does not take them for a person's), and `_review.csv` is rebuilt.
Caveat: a label unusable as a folder name refuses the whole run before anything moves (the one check of
`loop.data.classnames`; such labels are refused where they enter, so only an old manifest can hold one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from loop.data import manifest
from loop.data.classnames import OTHER_LABEL, class_name_problem
from loop.data.images import file_sha256
from loop.errors import SortloopError
from loop.folders import moves
from loop.sorting import copies
from loop.workspace import Workspace

logger = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    """What one apply did: `moved` (old path, new path); copies left alone, each with why."""

    run_id: str = ""
    dests: list[str] = field(default_factory=list)
    checked: int = 0  # copies of labeled photos looked at
    moved: list[tuple[str, str]] = field(default_factory=list)
    placed_by_person: list[str] = field(default_factory=list)  # moved/renamed by a person, or missing
    edited: list[str] = field(default_factory=list)
    missing_dests: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why the move failed): the copy stayed

    def summary(self) -> str:
        text = (f"labels applied to {len(self.dests)} sorted tree(s): {len(self.moved)} cop(ies) moved to their "
                f"label's folder, {len(self.placed_by_person)} left where a person put them, "
                f"{len(self.edited)} edited (left alone)" + (f", {len(self.failed)} FAILED" if self.failed else ""))
        if self.missing_dests:
            text += f"; missing: {', '.join(self.missing_dests)}"
        for old, new in self.moved[:20]:
            text += f"\n  {old} -> {new}"
        for path in self.placed_by_person[:20]:
            text += f"\n  left (a person moved it): {path}"
        for path in self.edited[:20]:
            text += f"\n  left (edited): {path}"
        for path, why in self.failed[:20]:
            text += f"\n  NOT moved ({why}): {path}"
        return text


def check_folder_name(name: str, *, what: str) -> None:
    """Refuse a label that cannot be a category folder, saying how to fix it (used by apply and resort).

    The rule is the one every entry point uses (`loop.data.classnames`).
    """
    problem = class_name_problem(name)
    if problem is not None:
        raise SortloopError(f"nothing was moved: {what} {name!r} cannot be a category folder name ({problem}); "
                            "correct it and run again")


def copy_state(rec: pd.Series) -> str:
    """'ok' if the copy is where sortloop left it with the same bytes, else 'gone' or 'edited'."""
    path = Path(rec["dest_path"])
    try:
        st = path.stat()
    except OSError:
        return "gone"
    if not path.is_file():
        return "gone"
    size, mtime = rec["dest_size"], rec["dest_mtime_ns"]
    if not pd.isna(size) and not pd.isna(mtime) and (st.st_size, st.st_mtime_ns) == (int(size), int(mtime)):
        return "ok"
    return "ok" if file_sha256(path) == rec["image_id"] else "edited"


def target_folder(dest_root: Path, dest_path: Path, old_category: str, new_category: str) -> Path:
    """The same sub-folders under the new category: DEST/old/sub/x.jpg -> DEST/new/sub/."""
    try:
        rel = dest_path.parent.relative_to(dest_root / old_category)
    except ValueError:
        rel = Path()
    return dest_root / new_category / rel


def recorded_roots(ws: Workspace, dest: Path | str | None) -> list[str]:
    """The sorted trees to work on: `dest`, or every destination with copies on record."""
    records = copies.load_records(ws)
    roots = sorted(set(records.loc[records["status"] == "present", "dest_root"].dropna()))
    if dest is None:
        return roots
    root = str(Path(dest).expanduser().absolute())
    if root not in set(records["dest_root"].dropna()):
        raise SortloopError(f"nothing was ever sorted into {root} with this workspace; give a folder you sorted "
                            "into (or none: every sorted tree)")
    return [root]


def apply_labels(ws: Workspace, dest: Path | str | None = None) -> ApplyReport:
    """Move the sorted copies of labeled photos to their label's folder, in `dest` or every sorted tree.

    Returns:
        An ApplyReport. Running it again right after moves nothing.
    Raises:
        SortloopError: a label that is not usable as a folder name (nothing is moved), or `dest` was
            never sorted into.

    Example:
        >>> print(apply_labels(open_workspace("data")).summary())   # doctest: +SKIP
    """
    with moves.exclusive(ws):
        report = ApplyReport(run_id=moves.new_run_id(), dests=recorded_roots(ws, dest))
        planned = _plan(ws, report)
        done = moves.run_batch(ws, "apply", report.run_id, planned, dest_roots=report.dests)
    report.moved = [(m.src, m.final) for m in done if m.final]
    report.placed_by_person += [m.src for m in done if not m.final and not m.error]
    report.failed = [(m.src, m.error) for m in done if m.error]
    if report.moved or report.placed_by_person or report.edited or report.failed:
        logger.info(report.summary())
    return report


def _plan(ws: Workspace, report: ApplyReport) -> list[moves.Move]:
    labels = manifest.load(ws).set_index("image_id")["label"].dropna()
    records = copies.load_records(ws)
    records = records[(records["status"] == "present") & records["dest_root"].isin(report.dests)
                      & records["image_id"].isin(labels.index)]
    planned: list[moves.Move] = []
    for root in report.dests:
        if not Path(root).is_dir():
            report.missing_dests.append(root)
    records = records[~records["dest_root"].isin(report.missing_dests)]
    for path, group in records.groupby("dest_path", sort=True):
        rec = group.iloc[0]
        label, category = str(labels[rec["image_id"]]), rec["category"]
        if label == OTHER_LABEL:  # "none of these": its copy belongs in the unfamiliar folder
            label = ws.settings.sort.other_folder
        if not pd.isna(category) and category == label:
            continue
        report.checked += 1
        if pd.isna(category) or (group["placed_by"] == "user").any():
            report.placed_by_person.append(str(path))
            continue
        state = copy_state(rec)
        if state == "gone":  # `scan` will say where it went (a person's correction) or that it was deleted
            report.placed_by_person.append(str(path))
            continue
        if state == "edited":
            report.edited.append(str(path))
            continue
        if label != ws.settings.sort.other_folder:
            check_folder_name(label, what=f"the label of {Path(path).name}")
        root = Path(rec["dest_root"])
        planned.append(moves.Move(
            record_ids=list(group["record_id"]), image_id=str(rec["image_id"]), size=int(Path(path).stat().st_size),
            src=str(path), folder=str(target_folder(root, Path(path), str(category), label)), name=Path(path).name,
            category=label, old_category=str(category), record_updates={"placed_by": "apply"},
            old_record={"placed_by": None if pd.isna(rec["placed_by"]) else str(rec["placed_by"])},
        ))
    return planned
