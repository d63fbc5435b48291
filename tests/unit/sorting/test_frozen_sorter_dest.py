"""The standalone sorter follows the main sort's rules inside DEST: no writing through links, one sorter per
DEST, `_review.csv` rebuilt whole from all records (the PC's and the workspace's)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.errors import SortloopError
from loop.sorting import dest_copies, dest_record
from loop.sorting.folder import sort_folder
from sortloop.cli import app
from sortloop.sorter import main as sorter_main
from sortloop.sorter import sort_standalone
from tests.conftest import make_image
from tests.helpers.faults import small_disk
from tests.helpers.sorting import deploy_copy, sample_ikea


@pytest.fixture
def flag_all_model(sort_model: Path, tmp_path: Path) -> Path:
    """The session's sort model as a bundle's model folder that flags every photo."""
    model = tmp_path / "bundle-model"
    shutil.copytree(sort_model, model)
    spec = json.loads((model / "model.json").read_text())
    spec["sorting"] = {"flag_threshold": 0.0, "workers": 1}
    (model / "model.json").write_text(json.dumps(spec))
    return model


@pytest.fixture
def photos(shared_data: Path, tmp_path: Path) -> Path:
    sample_ikea(shared_data, tmp_path / "inbox", per_class=2, classes=2)
    return tmp_path / "inbox"


def review_rows(dest: Path) -> list[dict]:
    with open(dest / "_review.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_a_symlinked_record_folder_or_review_list_in_dest_is_refused(flag_all_model, photos, tmp_path) -> None:
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    dest = tmp_path / "sorted"
    dest.mkdir()
    (dest / ".sortloop").symlink_to(foreign, target_is_directory=True)
    with pytest.raises(SortloopError, match="symlink"):
        sort_standalone(photos, dest, flag_all_model)
    assert list(foreign.iterdir()) == []  # copies.csv and sorter.json went into the link's target before
    (dest / ".sortloop").unlink()
    victim = foreign / "notes.csv"
    victim.write_text("someone else's file\n")
    (dest / "_review.csv").symlink_to(victim)
    with pytest.raises(SortloopError, match="symlink"):
        sort_standalone(photos, dest, flag_all_model)
    assert victim.read_text() == "someone else's file\n"  # it was appended to before


def test_one_sorter_per_dest_and_the_review_list_is_rebuilt_without_doubles(flag_all_model, photos,
                                                                            tmp_path) -> None:
    dest = tmp_path / "sorted"
    # another sorter holds DEST (a separate open file: an OS lock conflict, as between two processes)
    with dest_record.sorter_lock(dest), pytest.raises(SortloopError, match="another sorter is writing"):
        sort_standalone(photos, dest, flag_all_model)
    first = sort_standalone(photos, dest, flag_all_model)
    assert first.copied == 4
    rows = review_rows(dest)
    with open(dest / "_review.csv", "a", newline="", encoding="utf-8") as fh:  # a double an old version wrote
        csv.DictWriter(fh, fieldnames=list(rows[0])).writerow(rows[0])
    make_image(photos / "new.jpg", (30, 60, 90))
    sort_standalone(photos, dest, flag_all_model)
    again = review_rows(dest)
    assert len(again) == 5 and len({r["dest_path"] for r in again}) == 5  # each flagged copy once
    assert len(dest_copies.read_rows(dest)) == 5


def test_a_workspace_sort_into_a_pc_sorted_dest_keeps_the_pcs_review_rows(ws, sort_model, flag_all_model, photos,
                                                                          tmp_path, monkeypatch) -> None:
    dest = tmp_path / "sorted"
    sort_standalone(photos, dest, flag_all_model)
    pc_rows = {r["dest_path"] for r in review_rows(dest)}
    assert len(pc_rows) == 4
    deploy_copy(ws, sort_model)
    more = tmp_path / "more"
    make_image(more / "x.jpg", (200, 100, 50))
    monkeypatch.setenv("SORTLOOP_SORT__FLAG_THRESHOLD", "0.0")
    from loop.workspace import Workspace

    report = sort_folder(Workspace(ws.root), more, dest)
    assert report.copied == 1
    listed = {r["dest_path"] for r in review_rows(dest)}
    assert pc_rows <= listed and len(listed) == 5  # the PC's 4 were dropped until the next apply, before


def test_a_read_only_dest_is_one_line_for_both_sorters(ws, sort_model, flag_all_model, photos, tmp_path,
                                                       capsys) -> None:
    import subprocess

    with small_disk(tmp_path / "ro", "4m") as disk:
        dest = disk / "sorted"
        dest.mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        args = [str(photos), str(dest), "--model", str(flag_all_model), "--no-pause"]
        assert sorter_main(args) == 2  # a traceback (EROFS) before
        err = capsys.readouterr().err
        assert "cannot write into" in err and "Traceback" not in err
        deploy_copy(ws, sort_model)
        result = CliRunner().invoke(app, ["sort", str(photos), str(dest), "--workspace", str(ws.root)])
        assert result.exit_code != 0 and "cannot write into" in result.output
        assert "copy failed" not in result.output and "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
