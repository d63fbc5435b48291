"""Flags sized by what they catch, and calibration: properties on synthetic predictions (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from loop.config import SortConfig
from loop.model.calibration import calibrated, expected_calibration_error, fit_temperature
from loop.scoring.flagging import catch_curve, describe, estimate, flags, operating_point, settings_point
from loop.scoring.strategies import least_confidence


def overconfident(n: int = 2000, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model right ~75% of the time but far too sure of itself, and the true labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += rng.normal(2.0, 1.5, n)
    return logits * 4.0, labels


def test_the_threshold_follows_the_target():
    logits, labels = overconfident()
    probs = calibrated(logits, 1.0)
    flagging = estimate(probs, labels)
    wrong = probs.argmax(1) != labels
    scores = least_confidence(probs)
    caught, shares = [], []
    for target in (0.5, 0.7, 0.8, 0.9, 0.95):
        point = operating_point(flagging, strategy="least_confidence", target=target)
        flagged = flags(scores, point["threshold"])
        caught.append((flagged & wrong).sum() / wrong.sum())
        shares.append(flagged.mean())
        assert caught[-1] >= target  # on the photos it was estimated on, the target is met...
        assert point["expected_catch"] >= target and abs(point["expected_share"] - flagged.mean()) <= 0.011
    assert shares == sorted(shares) and shares[0] < shares[-1]  # ...and a higher target flags more
    # a budget caps the share flagged instead
    point = operating_point(flagging, strategy="least_confidence", budget=0.1)
    assert flags(scores, point["threshold"]).mean() <= 0.1 + 1e-9 and "budget" in point["goal"]


def test_auto_picks_the_strategy_that_needs_the_fewest_flags():
    logits, labels = overconfident(seed=1)
    flagging = estimate(calibrated(logits, 1.0), labels)
    auto = operating_point(flagging, strategy="auto", target=0.8)
    for name in flagging["curves"]:
        assert auto["expected_share"] <= operating_point(flagging, strategy=name, target=0.8)["expected_share"]
    assert describe(auto).startswith(f"flags {auto['expected_share']:.0%} of photos, expected to catch")


def test_fixed_threshold_and_models_without_curves():
    assert operating_point(None)["threshold"] == 0.5  # an older model.json: the old default
    perfect = np.eye(3)[np.arange(30) % 3]
    assert estimate(perfect, np.arange(30) % 3)["curves"] == {}  # no mistake to size on...
    assert operating_point(estimate(perfect, np.arange(30) % 3))["threshold"] == 0.5  # ...the fixed default
    spec = {"flagging": estimate(*(lambda lg, y: (calibrated(lg, 1.0), y))(*overconfident()))}
    point = settings_point(spec, SortConfig(flag_threshold=0.3, flag_strategy="margin"))
    assert point["threshold"] == 0.3 and point["strategy"] == "margin" and point["expected_share"] is not None
    assert settings_point(spec, SortConfig(flag_target=0.9))["expected_catch"] >= 0.9


def test_thin_evidence_flags_more_and_the_bound_is_below_the_estimate():
    logits, labels = overconfident(n=400, seed=2)
    probs = calibrated(logits, 1.0)
    wrong = probs.argmax(1) != labels
    photos = estimate(probs, labels)  # every mistake its own item

    def from_items(n_items: int) -> dict:  # the same mistakes, made on n_items items
        return estimate(probs, labels, np.where(wrong, np.arange(len(labels)) % n_items, np.arange(len(labels)) + 100))

    six, two = from_items(6), from_items(2)
    assert photos["mistaken_items"] == wrong.sum() and six["mistaken_items"] == 6
    for flagging in (photos, six):
        curve = flagging["curves"]["least_confidence"]
        assert all(lo <= c + 1e-9 for lo, c in zip(curve["catch_low"], curve["catch"], strict=True))
    narrow, wide, widest = (operating_point(f, strategy="least_confidence", target=0.8) for f in (photos, six, two))
    assert narrow["assured_catch"] >= 0.8 and narrow["expected_catch"] > narrow["assured_catch"]
    assert narrow["expected_share"] < wide["expected_share"] < widest["expected_share"]  # thinner: more flags
    assert wide["assured_catch"] >= 0.8
    # mistakes from 2 items cannot assure 80% at all: the flags stop where every mistake seen is caught
    assert widest["assured_catch"] < 0.8 and widest["expected_catch"] == 1.0
    assert widest["expected_share"] < 1.0
    assert "with 80% confidence" in describe(narrow)
    # a model.json written before the bounds: sized on the estimate, as then
    old = {**photos, "curves": {k: {kk: v for kk, v in c.items() if kk != "catch_low"}
                                for k, c in photos["curves"].items()}}
    point = operating_point(old, strategy="least_confidence", target=0.8)
    assert point["assured_catch"] is None and 0.8 <= point["expected_catch"] < narrow["expected_catch"]


def test_catch_curve_ends_and_no_mistakes():
    curve = catch_curve(np.array([0.9, 0.1, 0.5, 0.2]), np.array([True, False, False, True]))
    assert curve["catch"][0] == 0.0 and curve["catch"][-1] == 1.0 and curve["threshold"][0] is None
    assert curve["catch"][25] == 0.5 and curve["threshold"][25] == 0.9  # 1 of 4 photos: the surest mistake
    assert catch_curve(np.array([0.1, 0.2]), np.array([False, False]))["catch"][0] == 1.0


def test_temperature_scaling_lowers_the_calibration_error_and_keeps_the_argmax():
    logits, labels = overconfident()
    t = fit_temperature(logits[:1000], labels[:1000])
    assert t > 1.5  # the synthetic model is overconfident: it must be cooled
    before = expected_calibration_error(calibrated(logits[1000:], 1.0), labels[1000:])
    after = expected_calibration_error(calibrated(logits[1000:], t), labels[1000:])
    assert after < before / 2, (before, after)
    assert (calibrated(logits, t).argmax(1) == logits.argmax(1)).all()
    assert fit_temperature(logits[:1], labels[:1]) == 1.0


@pytest.mark.parametrize("bad", [{"flag_target": 0.0}, {"flag_budget": 1.5}, {"flag_strategy": "magic"}])
def test_bad_flag_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SortConfig(**bad)


def test_the_shops_own_photos_cap_the_curve_so_the_goal_holds_on_them_too():
    """Mistakes the labeled set does not show (confident ones, on the shop's photos) make the flags reach deeper."""
    logits, labels = overconfident(n=1200, seed=3)
    probs = calibrated(logits, 1.0)
    shop = np.zeros(len(labels), bool)
    shop[:200] = True
    # on the shop's photos the model is confidently wrong: its surest guesses there are mistakes
    wrong_label = (probs[:200].argmax(1) + 1) % probs.shape[1]
    labels = labels.copy()
    labels[:200] = np.where(probs[:200].max(1) > np.quantile(probs[:200].max(1), 0.5), wrong_label, labels[:200])
    plain = estimate(probs, labels)
    capped = estimate(probs, labels, focus=shop)
    assert "focus" not in plain and capped["focus"]["n"] == 200
    assert capped["focus"]["mistakes"] == int((probs[:200].argmax(1) != labels[:200]).sum())
    name = "least_confidence"
    assert all(c <= p + 1e-12 for c, p in zip(capped["curves"][name]["catch"], plain["curves"][name]["catch"],
                                              strict=True))
    target = 0.8
    plain_point = operating_point(plain, strategy=name, target=target)
    capped_point = operating_point(capped, strategy=name, target=target)
    assert capped_point["expected_share"] > plain_point["expected_share"]  # flags more...
    flagged = flags(least_confidence(probs[:200]), capped_point["threshold"])
    wrong = probs[:200].argmax(1) != labels[:200]
    assert (flagged & wrong).sum() / wrong.sum() >= target  # ...and so catches the goal on the shop's photos
    too_few = shop.copy()
    too_few[19:] = False  # fewer than MIN_PHOTOS shop photos: nothing to size on, the curve is the plain one
    assert estimate(probs, labels, focus=too_few)["curves"] == plain["curves"]
