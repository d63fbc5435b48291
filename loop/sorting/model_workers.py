"""Decode workers that also run the model: each worker process decodes a chunk of photos and predicts it with
its own one-thread copy of the deployed model, so the main process only places, copies and records.

Why: with the model in the main process, a sort on 2 CPUs ran three busy threads on two CPUs (two decoders and
a one-thread forward pass), which also left the decoders idle-waiting or the model starved at the ends of a
run. Two workers that each decode then predict keep exactly two busy threads, and a one-thread forward pass
does more per CPU-second than a two-thread one (`bench/sort.py`). The workers load the model when they start
(`load_model`, the pool's initializer), while the main process lists the tree. The main process loads no model
of its own: a model that does not load in the workers is the run's error (`check_model`, raised at the first
read as the ModelError it is, before any copy).

The same predictions as the main process's model: the same `Predictor` on the same pixels
(`tests/unit/sorting/test_model_workers.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401 - imported here so a fork server that preloads this module shares it

from loop.data.decode import Decoded, decode_chunk
from loop.errors import ModelError
from loop.model.artifact import Prediction, Predictor

_model: Predictor | None = None  # this worker's copy (set by `load_model`)
_load_error: ModelError | None = None  # or why it did not load (raised by `check_model`)


@dataclass
class Predicted(Decoded):
    """A `Decoded` photo with the worker's prediction for it (its pixels are not sent back: 150 KB a photo
    the main process no longer needs)."""

    prediction: Prediction | None = None
    predict_s: float = 0.0  # worker seconds in the forward pass (the sort's profile)


def load_model(model_dir: str, runtime: str, precision: str) -> None:
    """Pool initializer: this worker's own model, on one thread (the workers are the parallelism). A ModelError
    is kept for `check_model`: raised here, it would only break the pool ("did not start")."""
    global _model, _load_error
    try:
        _model = Predictor(model_dir, runtime, precision=precision, threads=1)
    except ModelError as exc:
        _load_error = exc


def check_model() -> bool:
    """The pool's start check (`loop.data.decode.WorkerSetup.check`): raises the ModelError `load_model` met."""
    if _load_error is not None:
        raise _load_error
    if _model is None:
        raise RuntimeError("model workers run in a pool started with load_model as its initializer")
    return True


def decode_and_predict(paths: list[Path], size: int, describe: bool = True) -> list[Decoded]:
    """`decode_chunk`, then one forward pass over the chunk's readable photos. Needs `load_model` first."""
    check_model()
    assert _model is not None
    records = decode_chunk(paths, size, describe)
    ok = [i for i, rec in enumerate(records) if rec.ok]
    if not ok:
        return records
    started = time.perf_counter()
    prediction = _model.predict_with_familiarity(np.stack([records[i].pixels for i in ok]))
    seconds = (time.perf_counter() - started) / len(ok)
    out: list[Decoded] = list(records)
    for row, i in enumerate(ok):
        rec = records[i]
        out[i] = Predicted(**{**vars(rec), "pixels": None}, prediction=prediction.subset([row]), predict_s=seconds)
    return out
