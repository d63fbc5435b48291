"""Active learning: which photos are most worth a human look, one by one (scores) and as a batch.

A strategy is a plain function over a probability matrix: `scores = margin(probs)` maps `probs`
(N, K) — each row a distribution over the K classes — to `scores` (N,) in [0, 1], where HIGHER means
LESS SURE, so more worth a look. Picking is kept apart (`top_k`). Strategies are looked up by name in
`STRATEGIES`; an unknown name is an error that lists the valid ones.

Which to use:
- `least_confidence` = 1 - max(p): simple, and with a threshold it reads as "confidence below x".
- `margin` = 1 - (p1 - p2): best for pairs the model confuses (console vs table); near-ties score ~1.
- `entropy` = H(p) / log(K): looks at the whole distribution; uniform rows score exactly 1.

Batch strategies (`BATCH_STRATEGIES`, used by `sortloop select` and `review push`) compose a score with
a picker from `loop.scoring.pickers`: `random` (the baseline), `least_confidence` / `margin` / `entropy` (top
scores), `hybrid` (margin + class-balanced candidates + k-means diversity), `badge` and `typiclust`;
the default, `margin`, is what bench/active_learning.py favours.
At cold start (few labels, or a class with none) every non-random strategy uses `typiclust` until the
model is trustworthy (`is_cold_start`).

Caveat: these scores measure the model's own uncertainty. A confidently wrong model (label noise,
a class it never saw) scores low everywhere; user moves (`corrections.scan`) catch those instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from loop.errors import ConfigError
from loop.scoring import pickers

T = TypeVar("T")

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


def _named(table: dict[str, T], name: str, where: str = "") -> T:
    """`table[name]`; a ConfigError listing the valid names (and where the name was set) if there is none."""
    try:
        return table[name]
    except KeyError:
        valid = ", ".join(sorted(table))
        raise ConfigError(f"unknown selection strategy {name!r}; valid: {valid}{where}") from None


def get_strategy(name: str) -> Strategy:
    """The strategy called `name`; raises ConfigError listing the valid names if there is none."""
    return _named(STRATEGIES, name)


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


# --- batch strategies: what a reviewer sees next -------------------------------------------------------

COLD_START_PER_CLASS = 3  # labels per class below which the model's uncertainty is not trusted yet


@dataclass(frozen=True)
class Pool:
    """What a batch strategy sees: the candidates and what is already labeled.

    probs: (N, K) the current head's probabilities for the N candidates (K = number of classes).
    embeddings: (N, F) the candidates' cached backbone features.
    labeled_embeddings: (M, F) and labels: (M,) class index in [0, K) of the photos already labeled.
    """

    probs: np.ndarray
    embeddings: np.ndarray
    labeled_embeddings: np.ndarray
    labels: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1]) if self.probs.ndim == 2 else 0


BatchStrategy = Callable[[Pool, int, int], np.ndarray]  # (pool, k, seed) -> up to k indices, best first


def _by_score(score_fn: Strategy) -> BatchStrategy:
    def pick(pool: Pool, k: int, seed: int) -> np.ndarray:
        return top_k(score_fn(pool.probs), k)

    pick.__doc__ = f"Top-k by `{score_fn.__name__}` (no diversity)."
    return pick


def random_batch(pool: Pool, k: int, seed: int) -> np.ndarray:
    """k candidates uniformly at random: the baseline every other strategy is measured against."""
    n = len(pool.embeddings)
    return np.random.default_rng(seed).permutation(n)[: max(0, min(k, n))]


def hybrid_batch(pool: Pool, k: int, seed: int) -> np.ndarray:
    """Margin scores, class-balanced candidates, one per k-means cluster (`pickers.diverse_top`)."""
    return pickers.diverse_top(margin(pool.probs), pool.embeddings, k, pred=pool.probs.argmax(axis=1),
                               labels=pool.labels, seed=seed)


def badge_batch(pool: Pool, k: int, seed: int) -> np.ndarray:
    """BADGE: k-means++ over gradient embeddings (`pickers.badge`)."""
    return pickers.badge(pool.probs, pool.embeddings, k, seed=seed)


def typiclust_batch(pool: Pool, k: int, seed: int) -> np.ndarray:
    """Representatives of uncovered clusters (`pickers.typiclust`); ignores the model."""
    return pickers.typiclust(pool.embeddings, pool.labeled_embeddings, k, seed=seed)


BATCH_STRATEGIES: dict[str, BatchStrategy] = {
    "random": random_batch,
    "least_confidence": _by_score(least_confidence),
    "margin": _by_score(margin),
    "entropy": _by_score(entropy),
    "hybrid": hybrid_batch,
    "badge": badge_batch,
    "typiclust": typiclust_batch,
}


def get_batch_strategy(name: str) -> BatchStrategy:
    """The batch strategy called `name`; raises ConfigError listing the valid names if there is none."""
    return _named(BATCH_STRATEGIES, name, " (review.strategy)")


def is_cold_start(labels: np.ndarray, n_classes: int, *, per_class: int = COLD_START_PER_CLASS) -> bool:
    """True while the model's uncertainty cannot be trusted: a class without labels, or few labels overall.

    Args:
        labels: (M,) class index of each labeled photo. n_classes: the classes there should be.
        per_class: cold until there are at least `per_class * n_classes` labels.
    """
    labels = np.asarray(labels)
    if n_classes < 2 or len(np.unique(labels)) < n_classes:
        return True
    return len(labels) < per_class * n_classes


def one_per_item(order: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """The first k of `order` taking each item's best photo before any item's second one.

    Why: the photos of one item (angles, stages, near-duplicates) are wrong or right together; a reviewer
    who labels two of them teaches the model little more than one, and a batch spread over items covers
    more of what the model has not seen.
    Args:
        order: candidate indices, most useful first. items: (N,) item key of every candidate.
    """
    order = np.asarray(order, dtype=np.int64)
    first = np.zeros(len(order), bool)
    first[np.unique(np.asarray(items)[order], return_index=True)[1]] = True  # each item's earliest rank
    return np.concatenate([order[first], order[~first]])[: max(0, k)]


def select_batch(pool: Pool, k: int, strategy: str, *, seed: int = 0,
                 cold_start: bool | None = None) -> tuple[np.ndarray, str]:
    """Up to k candidate indices, most useful first, and the strategy that actually chose them.

    Args:
        cold_start: None = decide with `is_cold_start`; at cold start every strategy but `random` becomes
            `typiclust` (uncertainty from a model trained on a handful of labels points nowhere useful).

    Example:
        >>> idx, used = select_batch(Pool(probs, emb, labeled_emb, labels), 20, "hybrid")   # doctest: +SKIP
    """
    get_batch_strategy(strategy)  # an unknown name fails even when there is nothing to pick
    n = len(pool.embeddings)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64), strategy
    if cold_start is None:
        cold_start = is_cold_start(pool.labels, pool.n_classes)
    used = "typiclust" if cold_start and strategy != "random" else strategy
    picks = np.asarray(BATCH_STRATEGIES[used](pool, k, seed), dtype=np.int64)
    return picks[: min(k, n)], used
