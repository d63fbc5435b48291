"""INT8 artifact: a statically quantised copy of `model.onnx`, used by `sort` only when it passes its own gate.

On 2 cores the forward pass, not JPEG decoding, bounds sorting speed; ONNX Runtime's INT8 kernels (uint8
activations, int8 per-channel weights, QDQ format) run EfficientNet-Lite 1.5-2x faster than float.
The weights use 7 bits (`reduce_range`, INT8_WEIGHT_BITS): on x86 CPUs without VNNI (AVX2 only, as many office
PCs) ONNX Runtime multiplies uint8 by int8 and adds pairs into int16, which saturates with 8-bit weights
(255 * 127 * 2 > 32767); with 7 bits no pair sum can (255 * 64 * 2 < 32767), so CPUs with and without VNNI compute
the same integer sums and the gate's verdict, taken where the model trained, holds on the PC that sorts (ONNX
Runtime's quantization guide advises reduce_range on non-VNNI CPUs). Measured by bench/sort.py's INT8 gate line
(its model is seeded: the same file every run): 8-bit weights agreed with float on 62 of 64 photos on the machines
of waves 10-14 and on 50 of 64 on an AVX2-only AMD EPYC; 7-bit weights there: see docs/benchmarks.md.
Calibration uses training photos (activation ranges by MinMax). The layers that quantisation hurts most stay
in float: the first `FLOAT_STEM_CONVS` convolutions (the stem's BatchNorm has near-zero-variance channels
that amplify small input changes), the last 1x1 convolution and the classifier (the folded StandardScaler
makes its weights large, so it amplifies feature errors). Measured on ikea_products' validation photos:
quantising everything agreed with float on 69.5% of photos; this recipe on 98.4-99.5%.

The gate then judges INT8 the way `loop.learning.gate` judges a candidate, against the labels of the validation
photos (`loop.scoring.paired`): refused if it is significantly less accurate than the float model (one-sided exact
McNemar on the photos exactly one of them gets right) or significantly worse on a class (one-sided
binomial per class, Holm-corrected), or if its confidences move by more than `MEAN_PROB_DIFF` on average
(the flags' thresholds are sized on the float model's confidences), or, for a model with the unfamiliar
score, if it sends significantly more of the validation photos (all in scope) to `_other` than float does
(one-sided binomial on the photos only one of them sends there; the threshold was calibrated on float
features). Not a fixed agreement share: with
187 validation photos 99.5% agreement fails on a single photo, which is noise, not a loss. The verdict and
its numbers go into `model.json["int8"]`; the Predictor loads the INT8 file only when `passed` is true and its
`weight_bits` are INT8_WEIGHT_BITS, so a model that quantises badly simply keeps sorting in float (and
`sortloop status` says why).

Caveat: quantisation needs the `train` extra's `onnx` package and costs ~15-60 s per version on 2 cores;
`model.int8 = false` turns it off. Without labels (`bench/sort.py`) the float model's own guesses stand in
for them, so every disagreement counts as an INT8 mistake.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loop.atomic import write_json_atomic
from loop.data.images import file_sha256, normalise
from loop.model.artifact import (
    FEATURES_OUTPUT,
    INT8_FILE,
    INT8_WEIGHT_BITS,
    ONNX_FILE,
    SPEC_FILE,
    read_spec,
    softmax,
)
from loop.scoring.paired import Paired, binomial_p, class_tests, holm, loss_test
from loop.scoring.unfamiliar import Familiarity, load_familiarity

logger = logging.getLogger(__name__)

# mean |confidence_int8 - confidence_float| over validation photos: the flags' thresholds are sized on float
# confidences (the recipe measured 0.033 on ikea_products' 73 validation photos: tests/unit/test_quantize.py)
MEAN_PROB_DIFF = 0.05
DEFAULT_ALPHA = 0.05  # significance of the paired tests (train passes `gate.alpha`)
FLOAT_STEM_CONVS = 6  # the first convolutions kept in float (measured: fewer lost agreement)
CALIBRATION_BATCH = 16
GATE_BATCH = 64  # validation photos per forward pass of the gate (memory stays flat however many there are)
CALIBRATION_PHOTOS = 128  # training photos whose activation ranges set the INT8 scales
JUDGE_PHOTOS = 256  # without validation photos: training photos outside the calibration sample it is judged on
# validation photos INT8 is judged on at most (a uniform sample beyond): the paired test on 2,000 photos already
# detects a loss of about one point, and judging 10,000 (50,000 labeled photos) took minutes and 1.5 GB a night
JUDGE_MAX_PHOTOS = 2000


def quantize_artifact(model_dir: Path | str, calibration: np.ndarray, validation: np.ndarray,
                      labels: np.ndarray | None = None, *, alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """Write `model.int8.onnx` next to `model.onnx`, gate it against the float model, record the verdict.

    Args:
        model_dir: a version folder written by `save_artifact` (its `model.onnx` is the float reference).
        calibration: uint8 (N, H, W, 3) training photos, as `load_model_input` returns; N >= 1.
        validation: uint8 (M, H, W, 3) photos the gate compares on (validation photos; M may be 0).
        labels: (M,) class indices of the validation photos (-1: a label the model has no class for);
            None: judged against the float model's own guesses.
        alpha: significance of the paired tests.
    Returns:
        The `int8` entry now in model.json: passed, n, gained, lost, p, agreement, mean_prob_diff, reason.
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
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,  # INT8_WEIGHT_BITS
                        weight_type=QuantType.QInt8, nodes_to_exclude=sensitive_nodes(prepared))
        (Path(tmp) / INT8_FILE).replace(model_dir / INT8_FILE)

    verdict = int8_gate(model_dir, validation, labels, classes=spec["classes"], mean=mean, std=std, alpha=alpha,
                        familiarity=load_familiarity(model_dir, spec)) | {"weight_bits": INT8_WEIGHT_BITS}
    spec["int8"] = verdict
    spec.setdefault("checksums", {})[INT8_FILE] = file_sha256(model_dir / INT8_FILE)  # checked where it is loaded
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


def int8_gate(model_dir: Path, validation: np.ndarray, labels: np.ndarray | None, *, classes: list[str],
              mean: tuple, std: tuple, alpha: float = DEFAULT_ALPHA,
              familiarity: Familiarity | None = None) -> dict[str, Any]:
    """Judge the INT8 model against the float one on `validation`; the verdict `quantize_artifact` records.

    `familiarity`: the version's unfamiliar score, if it has one (then `_other` decisions are compared too)."""
    base = {"file": INT8_FILE, "alpha": alpha, "mean_prob_diff_allowed": MEAN_PROB_DIFF, "n": int(len(validation))}
    if len(validation) == 0:
        return {**base, "passed": False, "agreement": None, "mean_prob_diff": None,
                "reason": "no validation photos to check the INT8 model against; sorting stays in float"}
    (p_float, off_float), (p_int8, off_int8) = (_outputs(_session(model_dir / name), validation, mean, std, familiarity)
                                                for name in (ONNX_FILE, INT8_FILE))
    judged = "labels" if labels is not None else "float model's own guesses (no labels)"
    truth = np.asarray(labels) if labels is not None else p_float.argmax(1)
    names = np.array([classes[i] if 0 <= i < len(classes) else "(no class)" for i in truth])
    paired = Paired(names, p_int8.argmax(1) == truth, p_float.argmax(1) == truth, names=("INT8", "float"))
    where = "validation photos"
    overall = holm([loss_test(paired, where)], alpha)[0]
    per_class = holm(class_tests(paired, where), alpha)
    worse = [t for t in per_class if t.significant]
    agreeing = int((p_float.argmax(1) == p_int8.argmax(1)).sum())
    mean_diff = float(np.abs(p_float.max(1) - p_int8.max(1)).mean())
    other = _other_test(off_float, off_int8, alpha)
    passed = not overall.significant and not worse and mean_diff <= MEAN_PROB_DIFF and not other["significant"]
    classes_text = ("class significantly worse: " + "; ".join(t.describe() for t in worse) if worse
                    else f"no class significantly worse ({len(per_class)} class tests, Holm-corrected at {alpha})")
    reason = (f"against the {judged}, INT8 vs float {overall.describe()}; {classes_text}; top-1 agrees with float "
              f"on {agreeing} of {len(validation)}; confidence differs by {mean_diff:.3f} on average "
              f"(allowed {MEAN_PROB_DIFF}){other['text']}")
    return {**base, "passed": passed, "gained": overall.gained, "lost": overall.lost, "p": overall.p,
            "agreement": agreeing / len(validation), "mean_prob_diff": mean_diff,
            **({"other": {k: v for k, v in other.items() if k != "text"}} if familiarity is not None else {}),
            "reason": reason if passed else f"kept float: {reason}"}


def record_failure(model_dir: Path | str, reason: str) -> None:
    """Record in model.json that no INT8 model is available, and why (status shows it)."""
    spec = read_spec(model_dir)
    spec["int8"] = {"file": INT8_FILE, "passed": False, "reason": reason}
    write_json_atomic(Path(model_dir) / SPEC_FILE, spec, indent=2, default=str)


def _outputs(session: Any, photos: np.ndarray, mean: tuple, std: tuple,
             familiarity: Familiarity | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(softmax outputs, which photos the unfamiliar score sends to `_other` or None) of `session` on uint8
    photos, GATE_BATCH at a time: measured on 400 photos, one batch of them all took peak RSS from 1.0 to
    4.8 GB (ONNX Runtime's activations grow with the batch), batches of 64 to 1.7 GB."""
    names = ["logits", FEATURES_OUTPUT] if familiarity is not None else ["logits"]
    probs, other = [], []
    for i in range(0, len(photos), GATE_BATCH):
        out = session.run(names, {"input": normalise(photos[i:i + GATE_BATCH], mean, std)})
        probs.append(softmax(out[0]))
        if familiarity is not None:
            other.append(familiarity.decide(out[1], out[0])[1])
    return np.concatenate(probs), (np.concatenate(other) if familiarity is not None else None)


def _other_test(off_float: np.ndarray | None, off_int8: np.ndarray | None, alpha: float) -> dict[str, Any]:
    """Does INT8 send significantly more validation photos (all in scope) to `_other` than float does?"""
    if off_float is None or off_int8 is None:
        return {"significant": False, "text": ""}
    only_int8, only_float = int((off_int8 & ~off_float).sum()), int((off_float & ~off_int8).sum())
    p = binomial_p(only_int8, only_int8 + only_float)
    significant = p < alpha
    return {"significant": significant, "int8": int(off_int8.sum()), "float": int(off_float.sum()),
            "only_int8": only_int8, "only_float": only_float, "p": p,
            "text": f"; sends {int(off_int8.sum())} of {len(off_int8)} to _other vs {int(off_float.sum())} for float "
                    f"(only INT8 {only_int8}, only float {only_float}; one-sided binomial p={p:.3g} "
                    f"{'<' if significant else '>='} {alpha})"}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
