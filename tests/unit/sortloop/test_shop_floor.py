"""The shop floor's everyday path: `ingest --labeled` on project folders, `serve` knowing every tree `sort`
wrote, quiet HTTP logs, and the small things (help text, examples, a deploy with nothing new)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from typer.testing import CliRunner

from loop.data import manifest
from loop.data.ingest import ingest_folder
from loop.errors import IngestRefused
from loop.workspace import Workspace
from sortloop import schedule
from sortloop.cli import app
from tests.conftest import make_image
from tests.helpers.sorting import deploy_copy, sample_ikea


def run(*args: str):
    return CliRunner().invoke(app, list(args))


# --- item 3: ingest --labeled says what it made, and refuses folders that are not categories -------------


def _project_tree(root: Path) -> None:
    """A shop archive: photos in project folders, with a category folder inside some of them."""
    for p, project in enumerate(("2024-03 Smith order", "2024-05 cafe", "2024-06 Jones kitchen")):
        make_image(root / project / f"IMG_{p}.jpg", (200, 30 * p, 10))
        for i, cls in enumerate(("table", "cabinet")):
            for j in range(2):
                make_image(root / project / cls / f"IMG_{i}{j}.jpg", (20 * p + 60 * i, 15 * j, 120))


def test_project_folders_are_refused_naming_classes_and_yes_and_nothing_is_read(ws, tmp_path):
    archive = tmp_path / "Photos"
    _project_tree(archive)
    result = run("-w", str(ws.root), "ingest", str(archive), "--labeled")
    assert result.exit_code == 1
    assert "3 of the 3 folders" in result.output and "look like projects or dates" in result.output
    assert "'2024-03 Smith order'" in result.output and "--classes" in result.output and "--yes" in result.output
    assert manifest.load(ws).empty

    # --classes: a photo takes the first folder on its path that is a category; the rest come in unlabeled
    result = run("-w", str(ws.root), "ingest", str(archive), "--labeled", "--classes", "table,cabinet")
    assert result.exit_code == 0, result.output
    assert "2 categories (photos added): cabinet 6, table 6" in result.output
    df = manifest.load(ws)
    assert len(df) == 15 and df["label"].isna().sum() == 3
    assert set(df.loc[df["path"].str.contains("/table/"), "label"]) == {"table"}


def test_thin_classes_are_refused_unless_yes(ws, tmp_path):
    folder = tmp_path / "sorted-by-hand"
    for i, cls in enumerate(("chair", "sofa", "bed")):
        for j in range(2 if cls != "bed" else 4):
            make_image(folder / cls / f"{j}.jpg", (70 * i, 30 * j, 90))
    with pytest.raises(IngestRefused, match=r"2 of the 3 folders .* fewer than 3 photos \(chair, sofa\)"):
        ingest_folder(ws, folder, labeled=True, check_folders=True)
    result = run("-w", str(ws.root), "ingest", str(folder), "--labeled", "--yes")
    assert result.exit_code == 0 and "3 categories (photos added): bed 4, chair 2, sofa 2" in result.output


# --- item 9: serve knows every tree sort wrote; library HTTP logs stay quiet ------------------------------


def test_sort_registers_its_dest_and_serve_names_it_and_scans_at_start(ws, sort_model, shared_data, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("SORTLOOP_SCHEDULE__TIMEZONE", "UTC")
    deploy_copy(ws, sort_model)
    sample_ikea(shared_data, tmp_path / "inbox", per_class=1, classes=2)
    dest = tmp_path / "sorted"
    result = run("-w", str(ws.root), "sort", str(tmp_path / "inbox"), str(dest))
    assert result.exit_code == 0, result.output
    assert f"registered {dest} for `serve` to scan" in result.output
    listed = run("-w", str(ws.root), "watch", "list")
    assert str(dest) in listed.output
    again = run("-w", str(ws.root), "sort", str(tmp_path / "inbox"), str(dest))
    assert "registered" not in again.output  # once

    fresh = Workspace(ws.root)
    scheduler = schedule.build_scheduler(fresh, scheduler_cls=BackgroundScheduler, start_now=schedule.START_NOW)
    scheduler.start(paused=True)
    try:
        lines = schedule.describe_jobs(fresh, scheduler)
    finally:
        scheduler.shutdown(wait=False)
    scan = next(i for i, line in enumerate(lines) if line.startswith("scan "))
    assert " now, then " in lines[scan]  # scan runs at start-up, like pull and push
    assert lines[scan + 1] == f"  scans {dest}"


def test_http_libraries_log_requests_only_with_vv(ws):
    for flags, level in ((["-v"], logging.WARNING), (["-vv"], logging.NOTSET), ([], logging.WARNING)):
        assert run(*flags, "-w", str(ws.root), "status").exit_code == 0
        assert {logging.getLogger(n).level for n in ("httpx", "httpcore", "urllib3")} == {level}, flags


# --- item 10: the small things ---------------------------------------------------------------------------


def test_help_has_no_markup_escapes_and_every_group_has_an_example():
    assert "sortloop[ray]" in run("sort", "--help").output and "\\[" not in run("sort", "--help").output
    for group in ([], ["review"], ["labelstudio"], ["watch"]):
        assert "Example: sortloop" in run(*group, "--help").output, group


def test_deploy_with_nothing_new_says_so_and_succeeds(ws, sort_model):
    deploy_copy(ws, sort_model)
    result = run("-w", str(ws.root), "deploy")
    assert result.exit_code == 0, result.output
    assert "nothing to deploy: v0001 is already the deployed model" in result.output
    assert "refused" not in result.output


def test_a_person_moving_a_bundle_copy_keeps_its_bytes_reachable_for_apply(ws, tmp_path):
    """`manifest.follow_copies`: rows whose path is the moved copy follow it; an original elsewhere stays."""
    copy = tmp_path / "sorted" / "stool" / "IMG_6.jpg"
    make_image(copy, (10, 20, 30))
    original = make_image(tmp_path / "orig" / "IMG_7.jpg", (90, 20, 30))
    from loop.data.ingest import ImageInfo, register_images

    register_images(ws, [ImageInfo("a" * 64, str(copy)), ImageInfo("b" * 64, str(original))], source="user")
    moved = tmp_path / "sorted" / "chair" / "IMG_6.jpg"
    moved.parent.mkdir()
    shutil.move(copy, moved)
    assert manifest.follow_copies(ws, {str(copy): str(moved), str(tmp_path / "x.jpg"): "y"}) == 1
    paths = manifest.load(ws).set_index("image_id")["path"]
    assert paths["a" * 64] == str(moved) and paths["b" * 64] == str(original)
