"""Calibration: temperature scaling fitted on out-of-fold logits, folded into the network's classifier.

Why temperature scaling: one parameter cannot overfit a few hundred photos and never changes which class
wins (accuracy is untouched), yet it makes "90% sure" mean right about 9 times in 10, which is what the
flag threshold and a reviewer read. The temperature T is fitted on out-of-fold predictions (photos the
fold's model never trained on), then folded into the final Linear layer (W/T, b/T), so the ONNX graph,
the safetensors weights and therefore every runtime give the same calibrated probabilities; `model.json`
records T and the expected calibration error (ECE) before and after.
Caveat: the deployed model is refit on all training labels, so it is a little more confident than the
fold models T was fitted on; the gate-set ECE in model.json shows how well T carries over.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from loop.model.artifact import softmax

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T_BOUNDS = (0.05, 20.0)
ECE_BINS = 15


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer `labels` under softmax(logits / T)."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (1.0 when there is nothing to fit on)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, int)
    if len(labels) < 2 or logits.shape[1] < 2:
        return 1.0
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    found = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=(lo, hi),
                            method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE of the top-class confidence in `bins` equal-width bins (None for no photos).

    Labels outside the columns (a class the model lacks) count as wrong, like in the metrics.
    """
    probs = np.asarray(probs, np.float64)
    if not len(probs):
        return None
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == np.asarray(labels)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            gap += mask.sum() * abs(right[mask].mean() - conf[mask].mean())
    return float(gap / len(probs))


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) as float32 (N, K)."""
    return softmax(np.asarray(logits, np.float64) / temperature)


def fold_temperature(net: torch.nn.Module, temperature: float) -> None:
    """Divide the network's classifier (a Linear layer) by T in place: logits come out already scaled."""
    import torch

    head = net.get_classifier()
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
