"""`apply`: a labeled photo's sorted copy moves to its label's folder; a person's moves and edits are left alone."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.data import manifest
from loop.errors import ClassNameError, SortloopError
from loop.folders import corrections
from loop.folders.apply import apply_labels
from loop.sorting import copies
from loop.sorting.review_csv import REVIEW_CSV
from sortloop.cli import app
from tests.helpers.sorting import ikea_classes, sort_sample


def tree_state(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256), _review.csv included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def review(ws, image_id: str, label: str) -> None:
    manifest.set_labels(ws, [manifest.LabelChange(image_id, label, "review", "reviewer@test")])
    manifest.update(ws, lambda df: df.assign(review_status=df["review_status"].mask(df["image_id"] == image_id,
                                                                                    "reviewed")))


def pending(dest: Path) -> set[str]:
    with open(dest / REVIEW_CSV, newline="") as fh:
        return {row["image_id"] for row in csv.DictReader(fh)}


@pytest.fixture
def sorted_tree(ws, sort_model, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SORTLOOP_SORT__FLAG_THRESHOLD", "0")  # every copy flagged: _review.csv lists all
    monkeypatch.setenv("SORTLOOP_SORT__WORKERS", "0")  # a handful of photos: no decoder processes to start
    fresh, src, dest = sort_sample(ws, sort_model, shared_data, tmp_path)
    return fresh, src, dest, copies.load_records(fresh, dest), ikea_classes(shared_data)


def other_class(classes: list[str], *labels: str) -> str:
    return next(c for c in classes if c not in labels)


def test_reviewed_copy_moves_once_and_scan_does_not_see_a_user_move(sorted_tree) -> None:
    ws, src, dest, records, classes = sorted_tree
    originals = tree_state(src)
    rec = records.iloc[0]
    label = other_class(classes, rec.label)
    assert rec.image_id in pending(dest)
    review(ws, rec.image_id, label)

    report = apply_labels(ws)

    old = Path(rec.dest_path)
    new = dest / label / old.relative_to(dest / rec.label)
    assert report.moved == [(str(old), str(new))]
    assert not old.exists() and hashlib.sha256(new.read_bytes()).hexdigest() == rec.image_id
    after = copies.load_records(ws, dest).set_index("record_id").loc[rec.record_id]
    assert (after.dest_path, after.category, after.placed_by) == (str(new), label, "apply")
    assert rec.image_id not in pending(dest) and len(pending(dest)) == len(records) - 1
    assert tree_state(src) == originals  # originals never touched

    scanned = corrections.scan(ws, dest)  # sortloop's own move is not a person's correction
    assert scanned.moves == [] and scanned.corrections == [] and scanned.unchanged == len(records)
    assert manifest.load(ws).set_index("image_id").loc[rec.image_id, "label_source"] == "review"

    before = tree_state(dest)
    again = apply_labels(ws)  # a rerun is a no-op
    assert again.moved == [] and tree_state(dest) == before
    assert not (ws.runs_dir / "moves" / f"{again.run_id}.json").exists()


def test_user_moved_and_edited_copies_are_left_alone(sorted_tree) -> None:
    ws, _, dest, records, classes = sorted_tree
    moved, edited, later = records.iloc[1], records.iloc[2], records.iloc[3]
    # a person moves one copy (not scanned yet), edits another; reviewers then label both otherwise
    user_class = other_class(classes, moved.label)
    user_path = dest / user_class / "mine.jpg"
    user_path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(moved.dest_path, user_path)
    with open(edited.dest_path, "ab") as fh:
        fh.write(b"edited")
    edited_bytes = Path(edited.dest_path).read_bytes()
    review(ws, moved.image_id, other_class(classes, moved.label, user_class))
    review(ws, edited.image_id, other_class(classes, edited.label))

    report = apply_labels(ws)
    assert report.moved == [] and report.placed_by_person == [moved.dest_path] and report.edited == [edited.dest_path]
    assert user_path.exists() and Path(edited.dest_path).read_bytes() == edited_bytes

    # scanned: the move is the person's (placed_by user), so a later label does not move it either
    corrections.scan(ws, dest)
    review(ws, moved.image_id, other_class(classes, moved.label, user_class))
    again = apply_labels(ws, dest)
    assert again.moved == [] and user_path.exists()

    # a reviewer confirming the model's guess moves nothing
    review(ws, later.image_id, later.label)
    assert apply_labels(ws).moved == []


def test_unusable_label_refuses_and_moves_nothing(sorted_tree) -> None:
    ws, _, dest, records, classes = sorted_tree
    review(ws, records.iloc[0].image_id, other_class(classes, records.iloc[0].label))
    bad = records.iloc[1].image_id
    with pytest.raises(ClassNameError):  # refused where labels enter ...
        review(ws, bad, "../escape")
    # ... so only a manifest written before that check can hold one
    manifest.update(ws, lambda df: df.assign(label=df["label"].mask(df["image_id"] == bad, "../escape")))
    before = tree_state(dest)
    with pytest.raises(SortloopError, match="cannot be a category folder"):
        apply_labels(ws)
    assert tree_state(dest) == before and not (dest.parent / "escape").exists()


def test_label_with_no_folder_gets_one_and_name_taken_gets_a_new_name(sorted_tree) -> None:
    ws, _, dest, records, _ = sorted_tree
    rec, other = records.iloc[0], records.iloc[1]
    assert not (dest / "new-class").exists()
    review(ws, other.image_id, "new-class")
    old = Path(rec.dest_path)
    target = dest / "lamp" / old.relative_to(dest / rec.label)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"someone else's file")  # a different file holds the name
    review(ws, rec.image_id, "lamp")
    res = CliRunner().invoke(app, ["apply", str(dest), "-w", str(ws.root)])
    assert res.exit_code == 0, res.output
    assert target.read_bytes() == b"someone else's file"
    renamed = target.with_name(f"{target.stem} (2){target.suffix}")
    assert renamed.exists() and not old.exists() and "2 cop(ies) moved" in res.output
    moved_other = dest / "new-class" / Path(other.dest_path).relative_to(dest / other.label)
    assert moved_other.exists() and not Path(other.dest_path).exists()


def test_a_move_that_fails_leaves_that_copy_and_moves_the_others(sorted_tree, monkeypatch) -> None:
    import errno

    from loop.folders import moves

    ws, _, dest, records, classes = sorted_tree
    stuck, other = records.iloc[0], records.iloc[1]
    for rec in (stuck, other):
        review(ws, rec.image_id, other_class(classes, rec.label))
    real_link, real_replace = os.link, os.replace

    def no_cross_device(real):
        def call(src, dst, *args, **kwargs):
            if str(src) == stuck.dest_path:  # this copy's target is on another file system
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst, *args, **kwargs)
        return call

    real_rename = moves.rename_noreplace
    monkeypatch.setattr(moves, "rename_noreplace",
                        lambda src, dst: str(src) != stuck.dest_path and real_rename(src, dst))
    monkeypatch.setattr(moves.os, "link", no_cross_device(real_link))
    monkeypatch.setattr(moves.os, "replace", no_cross_device(real_replace))
    report = apply_labels(ws)
    assert [p for p, _ in report.failed] == [stuck.dest_path] and Path(stuck.dest_path).exists()
    assert [old for old, _ in report.moved] == [other.dest_path] and not Path(other.dest_path).exists()
    assert not moves.journal_path(ws).exists() and "1 FAILED" in report.summary()
    monkeypatch.undo()
    assert [old for old, _ in apply_labels(ws).moved] == [stuck.dest_path]  # retried by the next run
