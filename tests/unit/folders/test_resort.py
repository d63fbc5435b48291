"""`resort`: a new model re-routes the copies no person checked; dry run, undo, and people's photos kept.

The "new model" is the session's sort model deployed again with its class list reversed: a real artifact
whose every prediction differs (except the middle class) from the one that sorted, so moves are certain
without training anything.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.data import manifest
from loop.errors import SortloopError
from loop.folders import corrections
from loop.folders.apply import apply_labels
from loop.folders.resort import resort, undo_resort
from loop.sorting import copies
from loop.sorting.folder import sort_folder
from loop.sorting.review_csv import REVIEW_CSV
from loop.workspace import Workspace
from sortloop.cli import app
from tests.helpers.sorting import deploy_copy, sample_ikea


def tree_state(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256), _review.csv included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def deploy_reversed(ws, artifact: Path, version: str = "v0002") -> list[str]:
    """Deploy `artifact` again as `version` with its classes in reverse order; returns the new class list."""
    deploy_copy(ws, artifact, version)
    spec_path = ws.models_dir / version / "model.json"
    spec = json.loads(spec_path.read_text())
    spec["classes"] = spec["classes"][::-1]
    spec_path.write_text(json.dumps(spec))
    return spec["classes"]


def review_rows(dest: Path) -> dict[str, dict]:
    with open(dest / REVIEW_CSV, newline="") as fh:
        return {row["image_id"]: row for row in csv.DictReader(fh)}


@pytest.fixture
def sorted_tree(ws, sort_model, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SORTLOOP_SORT__FLAG_THRESHOLD", "0.5")
    monkeypatch.setenv("SORTLOOP_SORT__WORKERS", "0")  # a handful of photos: no decoder processes to start
    deploy_copy(ws, sort_model)
    src, dest = tmp_path / "inbox", tmp_path / "sorted"
    sample_ikea(shared_data, src, per_class=2, classes=4)
    fresh = Workspace(ws.root)
    assert sort_folder(fresh, src, dest).ok
    return fresh, dest, copies.load_records(fresh, dest)


def workspace_state(ws) -> dict[str, str]:
    return {str(p.relative_to(ws.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def test_dry_run_lists_every_move_and_changes_nothing(sorted_tree, sort_model) -> None:
    ws, dest, records = sorted_tree
    classes = deploy_reversed(ws, sort_model)
    before_tree, before_ws = tree_state(dest), workspace_state(ws)

    report = resort(ws, dest, dry_run=True)

    assert tree_state(dest) == before_tree and workspace_state(ws) == before_ws
    old = {r.dest_path: r for r in records.itertuples()}
    expected = {p for p, r in old.items() if classes[::-1].index(r.label) != len(classes) // 2}
    assert {m.src for m in report.moves} == expected and report.checked == len(records)
    for m in report.moves:
        assert m.old_category == old[m.src].label and m.category != m.old_category
        assert m.old_record["confidence"] == pytest.approx(old[m.src].confidence)
    res = CliRunner().invoke(app, ["resort", str(dest), "--dry-run", "-w", str(ws.root)])
    assert res.exit_code == 0, res.output
    assert f"would move {len(expected)}" in res.output
    first = report.moves[0]
    assert f"{first.old_category} ({first.old_record['confidence']:.2f}) -> {first.category}" in res.output
    assert tree_state(dest) == before_tree and workspace_state(ws) == before_ws


def test_resort_keeps_peoples_photos_and_undo_restores_the_tree_exactly(sorted_tree, sort_model) -> None:
    ws, dest, records = sorted_tree
    labeled, user_moved, not_scanned = records.iloc[0], records.iloc[1], records.iloc[2]
    manifest.set_labels(ws, [manifest.LabelChange(labeled.image_id, labeled.label, "review", "r@test")])
    assert apply_labels(ws).moved == []  # a confirmed guess: nothing to move
    by_hand = dest / "elsewhere"
    by_hand.mkdir()
    os.rename(user_moved.dest_path, by_hand / "scanned.jpg")
    corrections.scan(ws, dest)  # a user move: labeled "elsewhere" by a person
    os.rename(not_scanned.dest_path, by_hand / "not scanned yet.jpg")
    before = tree_state(dest)
    before_records = copies.load_records(ws, dest).set_index("record_id")
    deploy_reversed(ws, sort_model)

    report = resort(ws, dest)

    moved = {m.image_id: m for m in report.moves if m.final}
    assert moved and not {labeled.image_id, user_moved.image_id, not_scanned.image_id} & set(moved)
    assert Path(labeled.dest_path).exists() and (by_hand / "scanned.jpg").exists()
    assert (by_hand / "not scanned yet.jpg").exists() and report.human == 2 and len(report.changed) == 1
    after = copies.load_records(ws, dest).set_index("record_id")
    pending = review_rows(dest)
    for m in moved.values():
        assert not Path(m.src).exists() and Path(m.final).parent.relative_to(dest).parts[0] == m.category
        rec = after.loc[m.record_ids[0]]
        assert (rec.dest_path, rec.label, rec.model_version, rec.placed_by) == (m.final, m.category, "v0002", "resort")
        assert rec.flagged == m.record_updates["flagged"]
        assert (m.image_id in pending) == m.record_updates["flagged"]  # the new model's flag
        if m.image_id in pending:
            assert pending[m.image_id]["pred_label"] == m.category
    assert resort(ws, dest).moves == []  # a rerun with the same model moves nothing

    res = CliRunner().invoke(app, ["undo", "-w", str(ws.root)])
    assert res.exit_code == 0, res.output
    assert f"{len(moved)} cop(ies) put back" in res.output
    assert tree_state(dest) == before  # file lists and hashes, _review.csv included
    restored = copies.load_records(ws, dest).set_index("record_id")
    cols = ["dest_path", "category", "label", "confidence", "score", "flagged", "model_version", "placed_by"]
    assert restored[cols].equals(before_records[cols])
    with pytest.raises(SortloopError, match="no re-sort to undo"):
        undo_resort(ws)



def test_a_label_given_while_the_model_runs_keeps_the_copy(sorted_tree, sort_model, monkeypatch) -> None:
    from loop.folders import resort as resort_module

    ws, dest, _ = sorted_tree
    deploy_reversed(ws, sort_model)
    real_plan, labeled = resort_module._plan, []

    def plan_then_review(*args, **kwargs):
        planned = real_plan(*args, **kwargs)
        first = planned[0]
        manifest.set_labels(ws, [manifest.LabelChange(first.image_id, first.old_category, "review", "r@test")])
        labeled.append(first)
        return planned

    monkeypatch.setattr(resort_module, "_plan", plan_then_review)
    report = resort(ws, dest)
    assert labeled and labeled[0].image_id not in {m.image_id for m in report.moves}
    assert Path(labeled[0].src).exists() and report.human == 1 and report.moves


def test_serve_step_resorts_every_tree_after_a_deploy_unless_turned_off(sorted_tree, sort_model, monkeypatch) -> None:
    from sortloop.jobs import resort_step

    ws, dest, _ = sorted_tree
    deploy_reversed(ws, sort_model)
    monkeypatch.setenv("SORTLOOP_SORT__RESORT_AFTER_DEPLOY", "false")
    before = tree_state(dest)
    off = resort_step(Workspace(ws.root))
    assert off.skipped and "off" in off.summary and tree_state(dest) == before
    monkeypatch.delenv("SORTLOOP_SORT__RESORT_AFTER_DEPLOY")
    on = resort_step(Workspace(ws.root))  # on by default
    assert f"re-sorted {dest} with model v0002" in on.summary and tree_state(dest) != before
