"""`sortloop labels` (list / filter / export the manifest) and `sortloop history IMAGE` (one photo's changes)."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from loop.data import manifest as mf
from loop.data.ingest import ingest_folder
from loop.data.labels import filter_labels, image_history
from loop.errors import ManifestError, UnknownChoiceError
from sortloop.cli import app
from tests.conftest import make_image

runner = CliRunner()


@pytest.fixture
def labeled_ws(ws, tmp_path):
    folder = tmp_path / "labeled"
    for i, (cls, color) in enumerate([("chair", (200, 10, 10)), ("chair", (10, 200, 10)), ("sofa", (10, 10, 200)),
                                      ("sofa", (200, 200, 10))]):
        make_image(folder / cls / f"{i}.jpg", color, size=(64 + 16 * i, 48))
    make_image(tmp_path / "unlabeled" / "x.jpg", (90, 20, 160))
    ingest_folder(ws, folder, source="user", labeled=True)
    ingest_folder(ws, tmp_path / "unlabeled", source="web", labeled=False)
    return ws


def test_filters_select_matching_rows(labeled_ws):
    assert sorted(filter_labels(labeled_ws, label="chair")["label"]) == ["chair", "chair"]
    assert len(filter_labels(labeled_ws)) == 5
    assert list(filter_labels(labeled_ws, label="none")["source"]) == ["web"]
    assert set(filter_labels(labeled_ws, source="user")["label"]) == {"chair", "sofa"}
    assert len(filter_labels(labeled_ws, review="reviewed")) == 0
    with pytest.raises(ManifestError, match="unknown filter 'colour'; use one of label"):
        filter_labels(labeled_ws, colour="red")


def test_labels_command_exports_csv_and_json(labeled_ws):
    result = runner.invoke(app, ["-w", str(labeled_ws.root), "labels", "--label", "sofa", "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 2 and {r["label"] for r in rows} == {"sofa"} and len(rows[0]["image_id"]) == 64
    result = runner.invoke(app, ["-w", str(labeled_ws.root), "--json", "labels", "--source", "web"])
    data = json.loads(result.stdout)
    assert len(data) == 1 and data[0]["label"] is None
    text = runner.invoke(app, ["-w", str(labeled_ws.root), "labels", "--split", "train"]).output
    assert "photo(s)" in text


def test_history_shows_one_photos_changes_by_path_or_prefix(labeled_ws, tmp_path):
    df = mf.load(labeled_ws)
    row = df[df["label"] == "sofa"].iloc[0]
    mf.set_labels(labeled_ws, [mf.LabelChange(row["image_id"], "chair", "review", "ann@example.org")])

    found = image_history(labeled_ws, row["path"])
    assert list(found.changes["new_label"]) == ["sofa", "chair"]
    assert list(found.changes["source"]) == ["folder", "review"]
    result = runner.invoke(app, ["-w", str(labeled_ws.root), "history", row["image_id"][:8]])
    assert result.exit_code == 0, result.output
    assert "sofa (folder) -> chair (review) by ann@example.org" in result.output
    data = json.loads(runner.invoke(app, ["-w", str(labeled_ws.root), "history", row["image_id"][:8], "--json"]).stdout)
    assert data["image"]["label"] == "chair" and len(data["changes"]) == 2

    bad = runner.invoke(app, ["-w", str(labeled_ws.root), "history", "zzz"])
    assert bad.exit_code == 1 and "not a sha256 prefix" in bad.output
    missing = runner.invoke(app, ["-w", str(labeled_ws.root), "history", "abcdef0123"])
    assert missing.exit_code == 1 and "no photo in the manifest has a sha256 starting with abcdef0123" in missing.output


def test_every_flag_sort_sets_is_a_valid_filter(labeled_ws):
    """`labels --flag unfamiliar` was rejected as a typo until a photo had that flag: the known values lacked it."""
    assert len(filter_labels(labeled_ws, flag="unfamiliar")) == 0  # none yet, and no error
    with pytest.raises(UnknownChoiceError, match="unfamiliar"):  # a typo's message names it among the valid values
        filter_labels(labeled_ws, flag="unfamilar")
