"""Batch strategies and pickers: known answers on small synthetic embeddings and probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from loop.errors import ConfigError
from loop.scoring import pickers
from loop.scoring.strategies import BATCH_STRATEGIES, Pool, get_batch_strategy, is_cold_start, margin, select_batch


def blobs(n_classes: int = 4, per_class: int = 30, dims: int = 16, spread: float = 0.3, seed: int = 0):
    """Well separated Gaussian blobs: (N, dims) embeddings and (N,) true class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(n_classes, dims))
    x = np.concatenate([c + rng.normal(scale=spread, size=(per_class, dims)) for c in centres])
    return x, np.repeat(np.arange(n_classes), per_class)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def warm_pool(x: np.ndarray, y: np.ndarray, probs: np.ndarray, per_class: int = 5) -> Pool:
    """Labeled photos far beyond cold start (per_class labels of every class)."""
    k = int(y.max()) + 1
    lab = np.concatenate([np.flatnonzero(y == j)[:per_class] for j in range(k)])
    return Pool(probs, x, x[lab], y[lab])


@pytest.mark.parametrize("name", sorted(BATCH_STRATEGIES))
def test_every_strategy_returns_distinct_valid_indices(name: str) -> None:
    x, y = blobs()
    probs = softmax(np.random.default_rng(1).normal(size=(len(x), 4)))
    picks, used = select_batch(warm_pool(x, y, probs), 10, name, seed=0)
    assert used == name
    assert len(picks) == 10 and len(set(picks.tolist())) == 10
    assert picks.min() >= 0 and picks.max() < len(x)


@pytest.mark.parametrize("name", sorted(BATCH_STRATEGIES))
def test_budget_larger_than_pool_and_empty_pool(name: str) -> None:
    x, y = blobs(per_class=3)
    probs = softmax(np.random.default_rng(1).normal(size=(len(x), 4)))
    picks, _ = select_batch(warm_pool(x, y, probs, per_class=3), 100, name, cold_start=False)
    assert sorted(picks.tolist()) == list(range(len(x)))
    empty = Pool(np.zeros((0, 4)), np.zeros((0, 16)), x[:8], y[:8])
    assert len(select_batch(empty, 5, name)[0]) == 0


def test_margin_strategy_picks_the_near_ties() -> None:
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(scale=0.5, size=(50, 3)) + np.array([4.0, 0.0, 0.0]))  # confident class 0
    ties = [7, 21, 33]
    probs[ties] = [[0.45, 0.44, 0.11], [0.30, 0.31, 0.39], [0.40, 0.02, 0.39]]
    x, _ = blobs(n_classes=1, per_class=50, dims=4)
    pool = Pool(probs, x, x[:9], np.repeat(np.arange(3), 3))
    picks, used = select_batch(pool, 3, "margin", cold_start=False)
    assert used == "margin" and sorted(picks.tolist()) == ties


def test_hybrid_skips_near_duplicates_and_covers_every_class() -> None:
    # 4 classes in separate blobs; class 0's blob holds 12 near-duplicates that are the most uncertain of
    # all. Top-k by margin takes only those; the hybrid takes one of them and covers every class.
    x, y = blobs(n_classes=4, per_class=25)
    rng = np.random.default_rng(3)
    logits = np.eye(4)[y] * 3.0 + rng.normal(scale=0.3, size=(len(x), 4))
    dupes = np.arange(12)
    x[dupes] = x[0] + rng.normal(scale=1e-3, size=(12, x.shape[1]))
    logits[dupes] = [2.0, 1.98, 0.0, 0.0]
    probs = softmax(logits)
    pool = warm_pool(x, y, probs)
    top, _ = select_batch(pool, 8, "margin", cold_start=False)
    assert set(top.tolist()) <= set(dupes.tolist())  # the naive strategy: all near-duplicates
    picks, used = select_batch(pool, 8, "hybrid", cold_start=False)
    assert used == "hybrid"
    assert len(set(picks.tolist()) & set(dupes.tolist())) == 1
    assert set(y[picks].tolist()) == {0, 1, 2, 3}
    assert picks[0] in dupes  # most uncertain first


def test_hybrid_covers_a_class_the_scores_ignore() -> None:
    # Class 3 is predicted confidently everywhere (low margin); class balance still gives it a candidate.
    x, y = blobs(n_classes=4, per_class=25)
    logits = np.where(np.eye(4)[y] > 0, 1.0, 0.9)
    logits[y == 3] = np.eye(4)[3] * 8.0
    pool = warm_pool(x, y, softmax(logits), per_class=2)
    picks, _ = select_batch(pool, 4, "hybrid", cold_start=False)
    assert set(y[picks].tolist()) == {0, 1, 2, 3}


def test_cold_start_picks_representatives() -> None:
    # Three dense clusters plus scattered outliers; nothing labeled. TypiClust picks one photo near each
    # cluster's centre (the most typical), never an outlier, whatever the (uninformative) model says.
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    dense = np.concatenate([c + rng.normal(scale=0.5, size=(40, 2)) for c in centres])
    outliers = rng.uniform(-20, 30, size=(6, 2)) + 40.0
    x = np.concatenate([dense, outliers])
    probs = softmax(rng.normal(size=(len(x), 3)))
    pool = Pool(probs, x, np.zeros((0, 2)), np.zeros(0, np.int64))
    picks, used = select_batch(pool, 3, "hybrid")
    assert used == "typiclust"
    assert all(p < len(dense) for p in picks)
    hit = {int(np.argmin(np.linalg.norm(centres - x[p], axis=1))) for p in picks}
    assert hit == {0, 1, 2}
    for p in picks:
        assert np.min(np.linalg.norm(centres - x[p], axis=1)) < 0.6


def test_cold_start_skips_covered_clusters() -> None:
    x, y = blobs(n_classes=3, per_class=30, dims=8)
    labeled = x[[0, 1]]  # class 0's blob is covered already
    picks = pickers.typiclust(x, labeled, 2, seed=0)
    assert set(y[picks].tolist()) == {1, 2}


def test_is_cold_start() -> None:
    assert is_cold_start(np.array([0, 0, 1]), 2)  # 3 labels < 3 per class x 2 classes
    assert is_cold_start(np.array([0] * 10), 2)  # a class has none
    assert is_cold_start(np.zeros(0), 0)
    assert not is_cold_start(np.array([0, 0, 0, 1, 1, 1]), 2)


def test_random_is_seeded_and_not_cold_started() -> None:
    x, y = blobs()
    pool = Pool(softmax(np.zeros((len(x), 4))), x, x[:0], y[:0])
    a, used = select_batch(pool, 10, "random", seed=5)
    b, _ = select_batch(pool, 10, "random", seed=5)
    assert used == "random" and a.tolist() == b.tolist()


def test_badge_starts_from_the_longest_gradient() -> None:
    x, y = blobs()
    logits = np.eye(4)[y] * 10.0
    logits[40] = 0.0  # the one photo the model has no idea about
    picks = pickers.badge(softmax(logits), x, 3, seed=0)
    assert picks[0] == 40 and len(set(picks.tolist())) == 3


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_batch_strategy("nope")
    for name in BATCH_STRATEGIES:
        assert name in str(info.value)


def test_margin_scores_unchanged_for_flags() -> None:
    assert margin(np.array([[0.5, 0.5]]))[0] == pytest.approx(1.0)


def test_one_per_item_takes_each_items_best_photo_first():
    from loop.scoring.strategies import one_per_item

    items = np.array(["a", "a", "b", "a", "c", "b"])
    order = np.array([0, 1, 3, 2, 5, 4])  # most useful first: three photos of item a lead
    assert one_per_item(order, items, 3).tolist() == [0, 2, 4]  # one of a, b, c, in rank order
    assert one_per_item(order, items, 5).tolist() == [0, 2, 4, 1, 3]  # then the seconds, in rank order
    assert one_per_item(order, items, 0).tolist() == []
