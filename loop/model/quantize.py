"""INT8 artifact: a statically quantised copy of `model.onnx`, used by `sort` only when it passes its own gate.

On 2 cores the forward pass, not JPEG decoding, bounds sorting speed; ONNX Runtime's INT8 kernels (uint8
activations, int8 per-channel weights, QDQ format) run EfficientNet-Lite about 2x faster than float.
Calibration uses training photos (activation ranges by MinMax). The layers that quantisation hurts most stay
in float: the first `FLOAT_STEM_CONVS` convolutions (the stem's BatchNorm has near-zero-variance channels
that amplify small input changes), the last 1x1 convolution and the classifier (the folded StandardScaler
makes its weights large, so it amplifies feature errors). Measured on ikea_products' validation photos:
quantising everything agreed with float on 69.5% of photos; this recipe on 98.4-99.5%.

The gate then compares INT8 with the float model on validation photos: top-1 agreement >= `MIN_AGREEMENT`,
mean |confidence difference| <= `MEAN_PROB_DIFF` and every probability within `MAX_PROB_DIFF`. The verdict
and its numbers go into `model.json["int8"]`; the Predictor loads the INT8 file only when `passed` is true,
so a model that quantises badly simply keeps sorting in float (and `sortloop status` says why).

Caveat: quantisation needs the `train` extra's `onnx` package and costs ~15-60 s per version on 2 cores;
`model.int8 = false` turns it off. The gate is measured on the validation photos of the day it was trained;
with few validation photos one disagreement is already more than 0.5%, so small sets rarely pass.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loop.atomic import write_json_atomic
from loop.data.images import normalise
from loop.model.artifact import INT8_FILE, ONNX_FILE, SPEC_FILE, read_spec, softmax

logger = logging.getLogger(__name__)

MIN_AGREEMENT = 0.995  # share of validation photos whose top-1 class must not change
MEAN_PROB_DIFF = 0.02  # mean |confidence_int8 - confidence_float| over validation photos
MAX_PROB_DIFF = 0.10  # largest allowed |p_int8 - p_float| of any class probability on any validation photo
FLOAT_STEM_CONVS = 6  # the first convolutions kept in float (measured: fewer lost agreement)
CALIBRATION_BATCH = 16
CALIBRATION_PHOTOS = 128  # training photos whose activation ranges set the INT8 scales


def quantize_artifact(model_dir: Path | str, calibration: np.ndarray, validation: np.ndarray) -> dict[str, Any]:
    """Write `model.int8.onnx` next to `model.onnx`, gate it against the float model, record the verdict.

    Args:
        model_dir: a version folder written by `save_artifact` (its `model.onnx` is the float reference).
        calibration: uint8 (N, H, W, 3) training photos, as `load_model_input` returns; N >= 1.
        validation: uint8 (M, H, W, 3) photos the gate compares on (validation photos; M may be 0).
    Returns:
        The `int8` entry now in model.json: passed, agreement, max_prob_diff, n, thresholds, reason.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    mean, std = tuple(spec["mean"]), tuple(spec["std"])

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = (
                normalise(calibration[i:i + CALIBRATION_BATCH], mean, std)
                for i in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_dir / ONNX_FILE), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(Path(tmp) / INT8_FILE), _Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=sensitive_nodes(prepared))
        (Path(tmp) / INT8_FILE).replace(model_dir / INT8_FILE)

    verdict = int8_gate(model_dir, validation, mean=mean, std=std)
    spec["int8"] = verdict
    write_json_atomic(model_dir / SPEC_FILE, spec, indent=2, default=str)
    logger.info("INT8 %s: %s", "passed" if verdict["passed"] else "refused", verdict["reason"])
    return verdict


def sensitive_nodes(onnx_path: Path) -> list[str]:
    """Names of the nodes kept in float: the first FLOAT_STEM_CONVS convs, the last conv, the classifier."""
    import onnx

    nodes = onnx.load(str(onnx_path)).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return [*convs[:FLOAT_STEM_CONVS], *convs[-1:], *heads]


def int8_gate(model_dir: Path, validation: np.ndarray, *, mean: tuple, std: tuple) -> dict[str, Any]:
    """Compare the INT8 and float ONNX models on `validation`; the verdict `quantize_artifact` records."""
    base = {"file": INT8_FILE, "min_agreement": MIN_AGREEMENT, "mean_prob_diff_allowed": MEAN_PROB_DIFF,
            "max_prob_diff_allowed": MAX_PROB_DIFF, "n": int(len(validation))}
    if len(validation) == 0:
        return {**base, "passed": False, "agreement": None, "mean_prob_diff": None, "max_prob_diff": None,
                "reason": "no validation photos to check the INT8 model against; sorting stays in float"}
    x = normalise(validation, mean, std)
    p_float, p_int8 = (softmax(_session(model_dir / name).run(None, {"input": x})[0])
                       for name in (ONNX_FILE, INT8_FILE))
    agreement = float((p_float.argmax(1) == p_int8.argmax(1)).mean())
    mean_diff = float(np.abs(p_float.max(1) - p_int8.max(1)).mean())
    max_diff = float(np.abs(p_float - p_int8).max())
    passed = agreement >= MIN_AGREEMENT and mean_diff <= MEAN_PROB_DIFF and max_diff <= MAX_PROB_DIFF
    agreeing = int((p_float.argmax(1) == p_int8.argmax(1)).sum())
    reason = (f"top-1 agrees with float on {agreeing} of {len(x)} validation photos ({agreement:.2%}; "
              f"needs >= {MIN_AGREEMENT:.1%}); confidence differs by {mean_diff:.3f} on average "
              f"(allowed {MEAN_PROB_DIFF}), any probability by at most {max_diff:.3f} (allowed {MAX_PROB_DIFF})")
    return {**base, "passed": passed, "agreement": agreement, "mean_prob_diff": mean_diff,
            "max_prob_diff": max_diff, "reason": reason if passed else f"kept float: {reason}"}


def record_failure(model_dir: Path | str, reason: str) -> None:
    """Record in model.json that no INT8 model is available, and why (status shows it)."""
    spec = read_spec(model_dir)
    spec["int8"] = {"file": INT8_FILE, "passed": False, "reason": reason}
    write_json_atomic(Path(model_dir) / SPEC_FILE, spec, indent=2, default=str)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
