"""Selection strategies: properties on synthetic probability matrices."""

from __future__ import annotations

import numpy as np
import pytest

from loop.errors import ConfigError
from loop.scoring.strategies import STRATEGIES, entropy, get_strategy, least_confidence, margin, score, top_k


def random_probs(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_shape_and_range(name: str) -> None:
    probs = random_probs(500, 7)
    scores = STRATEGIES[name](probs)
    assert scores.shape == (500,)
    assert scores.min() >= 0.0 and scores.max() <= 1.0


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_one_hot_scores_lowest_and_uniform_highest(name: str) -> None:
    k = 5
    probs = np.vstack([np.eye(k)[2], np.full(k, 1 / k), random_probs(20, k, seed=3)])
    scores = STRATEGIES[name](probs)
    assert scores[0] == pytest.approx(0.0, abs=1e-12)
    assert scores[1] == pytest.approx(scores.max())
    assert np.argmin(scores) == 0


def test_uniform_is_maximal_entropy() -> None:
    for k in (2, 3, 11):
        assert entropy(np.full((1, k), 1 / k))[0] == pytest.approx(1.0)


def test_near_tie_has_highest_margin_score() -> None:
    probs = np.array([[0.49, 0.48, 0.03], [0.7, 0.2, 0.1], [0.4, 0.3, 0.3]])
    scores = margin(probs)
    assert np.argmax(scores) == 0
    assert scores[0] == pytest.approx(0.99)
    # least confidence prefers the flattest top instead: the strategies really differ
    assert np.argmax(least_confidence(probs)) == 2


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_monotone_in_confidence_for_two_classes(name: str) -> None:
    top = np.linspace(0.5, 1.0, 11)
    probs = np.stack([top, 1 - top], axis=1)
    scores = STRATEGIES[name](probs)
    assert np.all(np.diff(scores) <= 1e-12)
    assert scores[0] > scores[-1]


def test_least_confidence_values() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    np.testing.assert_allclose(least_confidence(probs), [0.1, 0.4])


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        margin(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="logits"):
        entropy(np.array([[3.0, -1.0]]))
    with pytest.raises(ValueError, match="finite"):
        least_confidence(np.array([[np.nan, 1.0]]))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_empty_input(name: str) -> None:
    assert STRATEGIES[name](np.zeros((0, 4))).shape == (0,)


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_strategy("random")
    for name in STRATEGIES:
        assert name in str(info.value)
    with pytest.raises(ConfigError):
        score(random_probs(2, 3), "nope")


def test_top_k() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.0])
    assert top_k(scores, 3).tolist() == [1, 3, 2]
    assert top_k(scores, 10).tolist() == [1, 3, 2, 0, 4]
    assert top_k(scores, 0).tolist() == []
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 2)), 1)
