"""Sort writes only inside DEST: a category folder (or a kept sub-folder) that is a symlink, or resolves
outside DEST, is refused, and nothing lands outside."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.errors import SortloopError
from loop.sorting.folder import sort_folder
from sortloop.cli import app
from tests.helpers.sorting import deploy_copy, files_under, ikea_classes, sample_ikea


@pytest.fixture
def deployed(ws, sort_model):
    deploy_copy(ws, sort_model)
    return ws


def test_a_symlinked_category_folder_is_refused_before_any_copy(deployed, shared_data, tmp_path) -> None:
    src, dest, elsewhere = tmp_path / "inbox", tmp_path / "sorted", tmp_path / "elsewhere"
    sample_ikea(shared_data, src, per_class=2, classes=2)
    elsewhere.mkdir()
    dest.mkdir()
    (dest / ikea_classes(shared_data)[0]).symlink_to(elsewhere)

    with pytest.raises(SortloopError, match="category folder refused: .* is a symlink"):
        sort_folder(deployed, src, dest)
    assert files_under(elsewhere) == [] and files_under(dest) == []

    result = CliRunner().invoke(app, ["sort", str(src), str(dest), "-w", str(deployed.root)])
    assert result.exit_code != 0 and "symlink" in result.output and "Traceback" not in result.output
    assert files_under(elsewhere) == []


def test_a_symlinked_sub_folder_fails_its_files_only(deployed, shared_data, tmp_path) -> None:
    src, dest, elsewhere = tmp_path / "inbox", tmp_path / "sorted", tmp_path / "elsewhere"
    sample_ikea(shared_data, src / "proj", per_class=2, classes=2)
    sample_ikea(shared_data, src / "other", per_class=1, classes=1)
    elsewhere.mkdir()
    for cls in ikea_classes(shared_data):  # DEST/<class>/proj -> elsewhere, whatever the model guesses
        (dest / cls).mkdir(parents=True)
        (dest / cls / "proj").symlink_to(elsewhere, target_is_directory=True)

    report = sort_folder(deployed, src, dest)
    in_proj = [p for p, _ in report.failed if "/proj/" in p]
    assert len(in_proj) == len(files_under(src / "proj")) == len(report.failed)
    assert all("symlink" in reason for _, reason in report.failed)
    assert report.copied == len(files_under(src / "other"))
    assert files_under(elsewhere) == []
    shutil.rmtree(elsewhere)


def test_apply_does_not_move_a_copy_into_a_symlinked_category(deployed, shared_data, tmp_path) -> None:
    from loop.data import manifest
    from loop.folders.apply import apply_labels
    from loop.sorting import copies

    src, dest, elsewhere = tmp_path / "inbox", tmp_path / "sorted", tmp_path / "elsewhere"
    sample_ikea(shared_data, src, per_class=1, classes=1)
    assert sort_folder(deployed, src, dest).ok
    rec = copies.load_records(deployed, dest).iloc[0]
    other = next(c for c in ikea_classes(shared_data) if not (dest / c).exists())
    elsewhere.mkdir()
    (dest / other).symlink_to(elsewhere)
    manifest.set_labels(deployed, [manifest.LabelChange(rec.image_id, other, "review", "r@example.org")])

    applied = apply_labels(deployed)
    assert not applied.moved and len(applied.failed) == 1 and "symlink" in applied.failed[0][1]
    assert files_under(elsewhere) == [] and Path(rec.dest_path).exists()
