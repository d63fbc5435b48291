"""Uncertainty scores for active learning: which photos are most worth a human look.

A strategy is a plain function over a probability matrix: `scores = margin(probs)` maps `probs`
(N, K) — each row a distribution over the K classes — to `scores` (N,) in [0, 1], where HIGHER means
LESS SURE, so more worth a look. Picking is kept apart (`top_k`). Strategies are looked up by name in
`STRATEGIES`; an unknown name is an error that lists the valid ones.

Which to use:
- `least_confidence` = 1 - max(p): simple, and with a threshold it reads as "confidence below x".
- `margin` = 1 - (p1 - p2): best for pairs the model confuses (console vs table); near-ties score ~1.
- `entropy` = H(p) / log(K): looks at the whole distribution; uniform rows score exactly 1.

Caveat: these scores measure the model's own uncertainty. A confidently wrong model (label noise,
a class it never saw) scores low everywhere; user moves (`corrections.scan`) catch those instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loop.errors import ConfigError

Strategy = Callable[[np.ndarray], np.ndarray]


def _as_probs(probs: np.ndarray) -> np.ndarray:
    """Check shape and range; returns float64 (N, K). Raises ValueError on bad input."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"probs must have shape (N, K) with K >= 1, got {p.shape}")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < -1e-6 or p.max() > 1 + 1e-6):
        raise ValueError("probs must be finite and within [0, 1] (pass softmax outputs, not logits)")
    return np.clip(p, 0.0, 1.0)


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """1 - max class probability: (N, K) -> (N,) in [0, 1 - 1/K]; higher = less sure."""
    p = _as_probs(probs)
    if p.shape[0] == 0:
        return np.zeros(0)
    return 1.0 - p.max(axis=1)


def margin(probs: np.ndarray) -> np.ndarray:
    """1 - (top1 - top2): (N, K) -> (N,) in [0, 1]; a near-tie between two classes scores ~1.

    With a single class there is no runner-up; the margin is the top probability itself.
    """
    p = _as_probs(probs)
    if p.shape[0] == 0:
        return np.zeros(0)
    if p.shape[1] == 1:
        return 1.0 - p[:, 0]
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    return np.clip(1.0 - (top2[:, 1] - top2[:, 0]), 0.0, 1.0)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy divided by log(K): (N, K) -> (N,) in [0, 1]; uniform rows score 1, one-hot 0."""
    p = _as_probs(probs)
    if p.shape[0] == 0:
        return np.zeros(0)
    k = p.shape[1]
    if k == 1:
        return np.zeros(p.shape[0])
    total = p.sum(axis=1, keepdims=True)
    q = p / np.where(total > 0, total, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)
    return np.clip(h / np.log(k), 0.0, 1.0)


STRATEGIES: dict[str, Strategy] = {
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
}


def get_strategy(name: str) -> Strategy:
    """The strategy called `name`; raises ConfigError listing the valid names if there is none."""
    try:
        return STRATEGIES[name]
    except KeyError:
        valid = ", ".join(sorted(STRATEGIES))
        raise ConfigError(f"unknown selection strategy {name!r}; valid: {valid}") from None


def score(probs: np.ndarray, strategy: str = "least_confidence") -> np.ndarray:
    """`STRATEGIES[strategy](probs)`: (N, K) -> (N,) in [0, 1], higher = more worth a look."""
    return get_strategy(strategy)(probs)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest scores, highest first; ties keep the original order (stable).

    Example:
        >>> top_k(margin(probs), 50)   # doctest: +SKIP
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-s, kind="stable")
    return order[: min(k, len(s))]
