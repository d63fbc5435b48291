"""The model artifact is checked whole where it is used: train, deploy, sort, bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.errors import ModelError
from loop.model.artifact import ONNX_FILE, Predictor, check_artifact
from sortloop.cli import app
from tests.conftest import make_image
from tests.helpers.sorting import deploy_copy


def copy_model(sort_model: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(sort_model, out)
    return out


def test_a_class_list_that_does_not_match_the_outputs_is_refused_not_an_index_error(ws, sort_model, tmp_path) -> None:
    deploy_copy(ws, sort_model)
    spec_path = ws.models_dir / "v0001" / "model.json"
    spec = json.loads(spec_path.read_text())
    spec["classes"] = spec["classes"][:3]  # 3 classes for an 11-output network
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="11 outputs but model.json lists 3 classes"):
        Predictor(ws.models_dir / "v0001")
    make_image(tmp_path / "inbox" / "a.jpg", (200, 10, 10))
    result = CliRunner().invoke(app, ["sort", str(tmp_path / "inbox"), str(tmp_path / "sorted"),
                                      "--workspace", str(ws.root)])
    assert result.exit_code != 0 and "outputs but model.json lists 3 classes" in result.output  # IndexError before
    assert result.exception is None or isinstance(result.exception, SystemExit)
    from loop.learning.deployment import deploy

    shutil.copytree(ws.models_dir / "v0001", ws.models_dir / "v0002")  # as a candidate: deploy checks it whole
    with pytest.raises(ModelError, match="outputs"):
        deploy(ws, "v0002", force=True)


def test_a_truncated_model_file_is_refused_by_sort_deploy_and_bundle(ws, sort_model, tmp_path) -> None:
    from loop.errors import SortloopError
    from sortloop.bundle import build_bundle

    deploy_copy(ws, sort_model)
    onnx = ws.models_dir / "v0001" / ONNX_FILE
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    with pytest.raises(ModelError, match="damaged"):
        check_artifact(ws.models_dir / "v0001")
    with pytest.raises(ModelError, match="damaged"):
        Predictor(ws.models_dir / "v0001")
    fake_sorter = tmp_path / "sorter"  # no PyInstaller run: the model is checked before the sorter is needed
    fake_sorter.mkdir()
    with pytest.raises(SortloopError, match="damaged"):  # "wrote ...", exit 0 before
        build_bundle(ws, tmp_path / "bundle", sorter=fake_sorter)
    assert not (tmp_path / "bundle").exists()


def test_a_bundle_whose_copied_model_is_damaged_is_refused(ws, sort_model, tmp_path, monkeypatch) -> None:
    """The copy as it landed is checked too (a truncated copy on a full or failing disk)."""
    from sortloop import bundle

    deploy_copy(ws, sort_model)
    real_copy = shutil.copy2

    def truncating_copy(src, dst, *args, **kwargs):
        out = real_copy(src, dst, *args, **kwargs)
        if str(dst).endswith(ONNX_FILE):
            Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        return out

    monkeypatch.setattr(bundle.shutil, "copy2", truncating_copy)
    target = tmp_path / "model-out"
    with pytest.raises(bundle.BundleError, match="not usable"):
        bundle._write_model(ws, ws.models_dir / "v0001", json.loads((ws.models_dir / "v0001" / "model.json")
                                                                    .read_text()), target, "2026-01-01T00:00:00")
