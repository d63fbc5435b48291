"""Decode workers that predict (`loop.sorting.model_workers`): the main process's predictions, and a worker
that dies takes no photo but its own with it (the restarted pool loads the model again)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from loop.data.decode import WorkerSetup, decode_stream
from loop.data.images import load_model_input
from loop.model.artifact import Predictor
from loop.sorting import model_workers
from tests.helpers.sorting import sample_ikea


def crash_on_poison(paths: list[Path], size: int, describe: bool = True):
    """`decode_and_predict`, except that the process dies (like a segfaulting codec) on files named poison*."""
    for p in paths:
        if Path(p).name.startswith("poison"):
            os._exit(3)
    return model_workers.decode_and_predict(paths, size, describe)


def setup_for(model_dir: Path) -> WorkerSetup:
    return WorkerSetup(model_workers.load_model, (str(model_dir), "onnx", "float"), preload=(model_workers.__name__,))


def test_the_workers_predict_what_the_main_process_model_does(sort_model: Path, shared_data: Path,
                                                              tmp_path: Path) -> None:
    photos = sample_ikea(shared_data, tmp_path / "inbox", per_class=2, classes=5)
    main = Predictor(sort_model, "onnx")
    expected = main.predict(np.stack([load_model_input(p, main.image_size) for p in photos]))
    with decode_stream(photos, main.image_size, workers=2, chunk=3, decode_fn=model_workers.decode_and_predict,
                       setup=setup_for(sort_model)) as stream:
        results = list(stream)
    assert [r.path for r in results] == photos
    assert all(isinstance(r, model_workers.Predicted) and r.pixels is None for r in results)  # no pixels sent back
    got = np.concatenate([r.prediction.probs for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert all(r.predict_s > 0 and r.image_id and r.phash for r in results)


def test_a_worker_that_dies_fails_only_its_photo_and_the_new_workers_predict(sort_model: Path, shared_data: Path,
                                                                            tmp_path: Path) -> None:
    photos = sample_ikea(shared_data, tmp_path / "inbox", per_class=1, classes=6)
    poison = tmp_path / "poison.jpg"
    shutil.copy2(photos[0], poison)
    paths = [*photos[:2], poison, *photos[2:]]
    setup = setup_for(sort_model)
    with decode_stream(paths, 224, workers=2, chunk=2, decode_fn=crash_on_poison, setup=setup) as stream:
        results = list(stream)
    assert [r.path for r in results] == paths
    assert [r.ok for r in results] == [True, True, False, True, True, True, True]
    assert "crashed" in (results[2].error or "")
    assert all(isinstance(r, model_workers.Predicted) for i, r in enumerate(results) if i != 2)


def test_a_model_that_does_not_load_in_the_workers_is_the_runs_error_before_any_copy(ws, sort_model: Path,
                                                                                    shared_data: Path,
                                                                                    tmp_path: Path) -> None:
    """The main process loads no model when workers predict: the workers' ModelError is raised as it is (not
    "worker processes did not start"), and nothing is copied or recorded."""
    import pytest

    from loop.errors import ModelError
    from loop.model.artifact import ONNX_FILE
    from loop.sorting import copies
    from loop.sorting.folder import sort_folder
    from tests.helpers.sorting import deploy_copy

    assert ws.settings.sort.workers > 0
    deploy_copy(ws, sort_model)
    onnx = ws.models_dir / "v0001" / ONNX_FILE
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    sample_ikea(shared_data, tmp_path / "inbox", per_class=1, classes=3)
    with pytest.raises(ModelError, match="damaged") as raised:
        sort_folder(ws, tmp_path / "inbox", tmp_path / "sorted")
    assert "did not start" not in str(raised.value)
    assert not [p for p in (tmp_path / "sorted").rglob("*.jpg")]
    assert copies.load_records(ws).empty
