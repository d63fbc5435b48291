"""`scan`: user moves of sorted copies become user_move labels; deletions are reported; no needless hashing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from loop.data import manifest
from loop.errors import SortloopError
from loop.folders import corrections
from loop.sorting import copies
from loop.sorting.folder import sort_folder
from sortloop.cli import app
from tests.helpers.sorting import deploy_copy, ikea_classes, sample_ikea


@pytest.fixture
def sorted_tree(ws, sort_model, shared_data, tmp_path):
    deploy_copy(ws, sort_model)
    src, dest = tmp_path / "inbox", tmp_path / "sorted"
    sample_ikea(shared_data, src, per_class=2, classes=3)
    assert sort_folder(ws, src, dest).ok
    return ws, dest, copies.load_records(ws, dest), ikea_classes(shared_data)


def other_class(classes: list[str], label: str) -> str:
    return next(c for c in classes if c != label)


def count_hashes(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = corrections.file_sha256

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(corrections, "file_sha256", counting)
    return calls


def test_moved_copy_becomes_user_move_label(sorted_tree, monkeypatch) -> None:
    ws, dest, records, classes = sorted_tree
    moved, deleted = records.iloc[0], records.iloc[1]
    target_class = other_class(classes, moved.label)
    new_path = dest / target_class / "renamed by a person.jpg"  # a new name: matched by content
    new_path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(moved.dest_path, new_path)
    os.remove(deleted.dest_path)
    hashes = count_hashes(monkeypatch)

    report = corrections.scan(ws, dest)

    assert [(m.image_id, m.new_category) for m in report.corrections] == [(moved.image_id, target_class)]
    assert report.deleted == [deleted.dest_path]
    assert report.labels_changed == 1 and report.unchanged == len(records) - 2
    assert len(hashes) <= 2  # only files whose size matched a missing copy were read
    df = manifest.load(ws).set_index("image_id")
    row = df.loc[moved.image_id]
    assert (row.label, row.label_source, row.flag) == (target_class, "user_move", "user_moved")
    assert pd.isna(df.loc[deleted.image_id].label)  # a deletion is not a label
    hist = manifest.history(ws)
    last = hist[hist.image_id == moved.image_id].iloc[-1]
    assert (last.new_label, last.source, last.by) == (target_class, "user_move", "scan")

    # a second scan finds nothing new and reads no file
    hashes.clear()
    again = corrections.scan(ws, dest)
    assert again.corrections == [] and again.deleted == [] and hashes == []
    assert again.unchanged == len(records) - 1
    assert len(manifest.history(ws)) == len(hist)


def test_unchanged_tree_is_not_rehashed_and_touch_rehashes_once(sorted_tree, monkeypatch) -> None:
    ws, dest, records, _ = sorted_tree
    hashes = count_hashes(monkeypatch)
    report = corrections.scan(ws, dest)
    assert hashes == [] and report.unchanged == len(records) and not report.moves

    touched = Path(records.iloc[0].dest_path)
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    report = corrections.scan(ws, dest)
    assert hashes == [touched] and report.unchanged == len(records) and not report.modified
    hashes.clear()
    corrections.scan(ws, dest)
    assert hashes == []


def test_moves_that_are_not_corrections(sorted_tree) -> None:
    ws, dest, records, _ = sorted_tree
    same = records.iloc[0]
    sub = Path(same.dest_path).parent / "keep" / "these"
    sub.mkdir(parents=True)
    shutil.move(same.dest_path, sub / "x.jpg")  # within the same category
    out = records.iloc[1]
    shutil.move(out.dest_path, dest / "loose.jpg")  # out of every category
    edited = records.iloc[2]
    Path(edited.dest_path).write_bytes(Path(edited.dest_path).read_bytes() + b"edited")

    report = corrections.scan(ws, dest)
    assert report.corrections == [] and report.labels_changed == 0
    assert len(report.moves) == 2 and report.uncategorised == [str(dest / "loose.jpg")]
    assert report.modified == [edited.dest_path]
    assert manifest.load(ws).label.isna().all()
    assert "user_moved" not in set(manifest.load(ws).flag.dropna())


def test_move_back_and_forth_records_each_decision(sorted_tree) -> None:
    ws, dest, records, classes = sorted_tree
    rec = records.iloc[0]
    a = other_class(classes, rec.label)
    (dest / a).mkdir(exist_ok=True)
    first = dest / a / Path(rec.dest_path).name
    shutil.move(rec.dest_path, first)
    corrections.scan(ws, dest)
    back = Path(rec.dest_path)
    shutil.move(first, back)
    report = corrections.scan(ws, dest)
    assert [m.new_category for m in report.corrections] == [rec.label]
    hist = manifest.history(ws)
    assert hist[hist.image_id == rec.image_id].new_label.tolist() == [a, rec.label]


def test_copy_shared_by_two_sources_moves_once(sorted_tree, tmp_path) -> None:
    ws, dest, records, classes = sorted_tree
    rec = records.iloc[0]
    twin = tmp_path / "second_inbox" / Path(rec.source_path).relative_to(tmp_path / "inbox")
    twin.parent.mkdir(parents=True)
    shutil.copy2(rec.source_path, twin)  # same bytes, same relative name: lands on the same copy
    report = sort_folder(ws, tmp_path / "second_inbox", dest)
    assert report.identical_existing == 1 and report.copied == 0
    target = dest / other_class(classes, rec.label) / "moved.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(rec.dest_path, target)

    scanned = corrections.scan(ws, dest)
    assert len(scanned.corrections) == 1 and scanned.deleted == []
    now = copies.load_records(ws, dest)
    assert set(now.dest_path[now.image_id == rec.image_id]) == {str(target)}


def test_deleted_destination_is_sorted_afresh(sorted_tree) -> None:
    ws, dest, records, _ = sorted_tree
    shutil.rmtree(dest)
    src = Path(records.source_path.iloc[0]).parents[1]
    report = sort_folder(ws, src, dest)
    assert report.copied == len(records) and report.already_sorted == 0
    scanned = corrections.scan(ws, dest)  # the retired records are not mistaken for moved copies
    assert scanned.moves == [] and scanned.deleted == [] and scanned.unchanged == len(records)


def test_cli_scan_and_errors(sorted_tree, tmp_path) -> None:
    ws, dest, records, classes = sorted_tree
    rec = records.iloc[0]
    target = dest / other_class(classes, rec.label) / "moved.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(rec.dest_path, target)
    result = CliRunner().invoke(app, ["scan", str(dest), "-w", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert "1 moved to another category" in result.output
    (tmp_path / "never_sorted").mkdir()
    with pytest.raises(SortloopError, match="nothing was ever sorted"):
        corrections.scan(ws, tmp_path / "never_sorted")
    result = CliRunner().invoke(app, ["scan", str(tmp_path / "nope"), "-w", str(ws.root)])
    assert result.exit_code == 1 and "not a folder" in result.output
