"""A full disk, on real (tmpfs) disks: in DEST during sort, in the workspace during ingest and label writes.

Each ends in the summary of what was done and one error line (no traceback), loses nothing, leaves no temp
file, and a rerun after freeing space finishes the job without duplicates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from loop.data import manifest
from loop.data.images import file_sha256
from loop.errors import DiskFullError
from loop.sorting import copies
from loop.workspace import init_workspace, open_workspace
from sortloop.cli import app
from tests.conftest import make_image
from tests.helpers.faults import fill_disk, hidden_temps, resize_disk, small_disk
from tests.helpers.sorting import deploy_copy

runner = CliRunner()


def one_error_line(output: str) -> None:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0], output


def test_sort_into_a_full_dest_stops_cleanly_and_resumes(ws, sort_model, shared_data, tmp_path) -> None:
    deploy_copy(ws, sort_model)
    src = tmp_path / "src"
    src.mkdir()
    photos = sorted((shared_data / "ikea_products" / "chair").glob("*.jpg"))[:30]
    for p in photos:
        shutil.copy2(p, src / p.name)
    with small_disk(tmp_path / "dest", "300k") as dest:
        first = runner.invoke(app, ["sort", str(src), str(dest), "-w", str(ws.root)])
        assert first.exit_code == 1, first.output
        one_error_line(first.output)
        assert f"from {src} into {dest}" in first.output  # the summary of what was done before it stopped
        records = copies.load_records(ws, dest)
        assert 0 < len(records) < len(photos)
        on_disk = {p for p in dest.rglob("*.jpg") if not p.name.startswith(".")}
        assert on_disk == set(map(Path, records["dest_path"]))  # every copy is recorded
        for rec in records.itertuples():
            assert file_sha256(Path(rec.dest_path)) == file_sha256(Path(rec.source_path))
        assert not hidden_temps(dest)

        resize_disk(dest, "20m")  # the user freed space
        second = runner.invoke(app, ["sort", str(src), str(dest), "-w", str(ws.root)])
        assert second.exit_code == 0, second.output
        records = copies.load_records(ws, dest)
        assert sorted(records["source_path"]) == sorted(str(src / p.name) for p in photos)  # each once
        assert len({p for p in dest.rglob("*.jpg") if not p.name.startswith(".")}) == len(photos)
        # the review list survived the full disk: header first, one line per flagged copy
        lines = (dest / "_review.csv").read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("dest_path,") and len(lines) - 1 == int(records["flagged"].sum()) > 0


def test_ingest_into_a_full_workspace_stops_cleanly_and_resumes(tmp_path) -> None:
    photos = tmp_path / "photos"
    for i in range(12):
        make_image(photos / ("desk" if i % 2 else "bed") / f"p{i}.jpg", (20 * i, 100, 200 - 10 * i))
    with small_disk(tmp_path / "disk", "1m") as disk:
        ws = init_workspace(disk / "ws")
        filler = fill_disk(disk)
        result = runner.invoke(app, ["ingest", str(photos), "--labeled", "-w", str(ws.root)])
        assert result.exit_code == 1, result.output
        one_error_line(result.output)
        assert "12 files: 0 added" in result.output  # the summary
        assert manifest.load(ws).empty and manifest.history(ws).empty  # nothing half-written, no phantom
        assert not hidden_temps(ws.root) and not manifest.pending_path(ws).exists()

        filler.unlink()
        again = runner.invoke(app, ["ingest", str(photos), "--labeled", "-w", str(ws.root)])
        assert again.exit_code == 0, again.output
        assert len(manifest.load(ws)) == 12 and len(manifest.history(ws)) == 12


def test_a_label_write_on_a_full_workspace_changes_nothing(tmp_path) -> None:
    """What `review pull` and `scan` do (manifest.set_labels) when the workspace's disk is full."""
    photos = tmp_path / "photos"
    for i in range(6):
        make_image(photos / f"p{i}.jpg", (30 * i, 50, 80))
    with small_disk(tmp_path / "disk", "1m") as disk:
        ws = init_workspace(disk / "ws")
        assert runner.invoke(app, ["ingest", str(photos), "-w", str(ws.root)]).exit_code == 0
        ids = list(manifest.load(ws)["image_id"])
        before = manifest.load(ws)
        changes = [manifest.LabelChange(i, "chair", "review", "ana@example.com") for i in ids]
        filler = fill_disk(disk)
        try:
            manifest.set_labels(ws, changes)
            raise AssertionError("a write on a full disk succeeded")
        except DiskFullError as exc:
            assert "no space left" in str(exc)
        pd.testing.assert_frame_equal(manifest.load(ws), before)
        assert manifest.history(ws).empty
        assert not hidden_temps(ws.root)

        filler.unlink()
        assert manifest.set_labels(open_workspace(ws.root), changes) == 6
        assert len(manifest.history(ws)) == 6 and (manifest.load(ws)["label"] == "chair").all()


def test_a_full_dest_is_the_summary_once_and_one_line_in_a_real_terminal(ws, sort_model, shared_data,
                                                                          tmp_path) -> None:
    """What a person sees (stdout and stderr of real processes, logging included): no per-file line, the
    summary once, one error line, for `sortloop sort` and the standalone sorter."""
    from tests.helpers.faults import run_child

    deploy_copy(ws, sort_model)
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((shared_data / "ikea_products" / "chair").glob("*.jpg"))[:30]:
        shutil.copy2(p, src / p.name)
    with small_disk(tmp_path / "dest", "300k") as dest:
        runs = {
            "sort": run_child("import sys; from sortloop.cli import main; sys.argv[0] = 'sortloop'; main()",
                              "sort", str(src), str(dest / "ws"), "-w", str(ws.root)),
            "sorter": run_child("import sys; from sortloop.sorter import main; sys.exit(main(sys.argv[1:]))",
                                str(src), str(dest / "pc"), "--model", str(ws.models_dir / "v0001"), "--no-pause"),
        }
    for name, proc in runs.items():
        text = proc.stdout + proc.stderr
        assert proc.returncode in (1, 2), (name, text)
        assert "Traceback" not in text and "copy failed" not in text and "not sorted" not in text, (name, text)
        assert sum(line.startswith("sorted ") for line in text.splitlines()) == 1, (name, text)  # twice before
        assert sum(line.startswith("error:") for line in text.splitlines()) == 1, (name, text)
        assert "not copied yet (disk full)" in text, (name, text)
