"""`write_report` / `sortloop report`: the HTML page and its PNGs, with the deployed version's numbers."""

from __future__ import annotations

import re

from PIL import Image
from typer.testing import CliRunner

from loop.data import manifest
from loop.model.artifact import read_spec
from loop.workspace import Workspace
from sortloop.cli import app
from sortloop.report import PLOTS, _versions, current_confusion, label_rounds, write_report
from tests.helpers.serving import build


def test_report_has_every_plot_and_the_deployed_versions_numbers(ws, tmp_path):
    built = build(ws, tmp_path)
    page = write_report(ws)
    assert page == ws.report_dir / "index.html"
    text = page.read_text()
    for name in PLOTS.values():
        path = ws.report_dir / name
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
        assert f'src="{name}"' in text
    assert "Deployed model <b>v0002</b>" in text
    assert f"<b>{built.accuracy['v0002']:.3f}</b>" in text
    for version, acc in built.accuracy.items():
        assert re.search(rf"<td>{version}( \(deployed\))?</td><td>[^<]*</td><td>head</td><td>{acc:.3f}</td>", text)
    for cls, recall in built.recall.items():
        assert re.search(rf"<td>{cls}</td><td>[0-9.]+</td><td>{recall:.3f}</td>", text)
    assert "refused" in text and "accuracy 0.750 &lt;= 0.812" in text  # the gate's reasons, escaped
    assert "expected to catch" in text and "0.200 &rarr; 0.050" in text  # flags' operating point, calibration


def test_labels_per_round_split_the_history_at_each_training(ws, tmp_path):
    build(ws, tmp_path)
    rounds = label_rounds(manifest.history(ws), _versions(ws))
    assert list(rounds.index) == ["→v0001", "→v0002", "→v0003", "pending"]
    assert rounds.loc["→v0001"].to_dict() == {"folder": 12, "review": 0, "user_move": 0}
    assert rounds.loc["→v0002"].to_dict() == {"folder": 0, "review": 2, "user_move": 0}
    assert rounds.loc["→v0003"].to_dict() == {"folder": 0, "review": 0, "user_move": 1}
    assert rounds.loc["pending"].to_dict() == {"folder": 0, "review": 1, "user_move": 0}


def test_confusion_matrix_comes_from_the_deployed_model_json(ws, tmp_path):
    build(ws, tmp_path)
    spec = read_spec(ws.models_dir / "v0002")
    confusion = current_confusion(spec)
    assert confusion["classes"] == ["chair", "table", "sofa"] and confusion["n"] == 6
    assert confusion["matrix"] == spec["metrics"]["user_valid"]["confusion"]["matrix"]
    spec["metrics"]["user_valid"].pop("confusion")
    assert current_confusion(spec) is None


def test_report_on_an_empty_workspace_says_so(ws):
    text = write_report(ws).read_text()
    assert "No model deployed yet." in text
    assert all((ws.report_dir / name).exists() for name in PLOTS.values())


def test_report_command(ws, tmp_path):
    build(ws, tmp_path)
    result = CliRunner().invoke(app, ["report", "--workspace", str(Workspace(ws.root).root)])
    assert result.exit_code == 0, result.output
    assert str(ws.report_dir / "index.html") in result.stdout.replace("\n", "")
