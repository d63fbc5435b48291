"""The unfamiliar score itself (`loop.scoring.unfamiliar`): kNN distance, leave-one-item-out calibration, the
bounded reference set, "none of these" rows, and the reference file's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loop.errors import ModelError
from loop.scoring.flagging import wilson_lower
from loop.scoring.unfamiliar import (
    REFERENCE_FILE,
    bounded_threshold,
    choose_reference,
    fit_familiarity,
    knn_scores,
    leave_item_out_scores,
    load_familiarity,
    on_scale,
    save_familiarity,
)


def _clusters(rng: np.random.Generator, n_items: int = 12, per_item: int = 4, dim: int = 16):
    """Photos of items around 3 class directions (positive features, like pooled ReLU outputs)."""
    centres = np.eye(3, dim) * 5 + 1
    feats, labels, items = [], [], []
    for item in range(n_items):
        cls = item % 3
        item_centre = centres[cls] + rng.normal(0, 0.3, dim)
        for _ in range(per_item):
            feats.append(np.abs(item_centre + rng.normal(0, 0.1, dim)))
            labels.append(f"c{cls}")
            items.append(f"i{item}")
    return np.array(feats), np.array(labels), np.array(items)


def test_knn_score_is_zero_on_a_reference_photo_and_grows_with_the_angle() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    scores = knn_scores(np.array([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]), ref, k=1)
    assert scores == pytest.approx([0.0, 1 - np.sqrt(0.5), 1.0], abs=1e-6)
    assert knn_scores(np.array([[2.0, 0.0]]), ref, k=2) == pytest.approx([1.0])  # the 2nd nearest


def test_leave_item_out_ignores_the_photos_own_item() -> None:
    feats = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    items = np.array(["a", "a", "b"])
    scores = leave_item_out_scores(feats, items, np.arange(3), k=1)
    # photo 0's twin (same item) is not its neighbour: its nearest other item is b, at 90 degrees
    assert scores[0] == pytest.approx(1.0, abs=1e-3) and scores[2] == pytest.approx(1.0, abs=1e-2)


def test_threshold_bounds_the_share_of_in_scope_photos_sent_and_far_photos_are_unfamiliar() -> None:
    rng = np.random.default_rng(0)
    feats, labels, items = _clusters(rng, n_items=60, per_item=2)
    familiarity, summary, _ = fit_familiarity(feats, labels, items, max_share=0.2)
    oof = leave_item_out_scores(feats, items, np.arange(len(feats)))
    sent = float((oof >= summary["threshold"]).mean())
    assert summary["oof_in_scope_sent"] == pytest.approx(sent)
    assert 0.05 < sent < 0.2  # within the goal by a margin: the bound's, for 60 items
    assert wilson_lower((1 - sent) * 60, 60) >= 0.8  # its upper bound is within 0.2
    assert bounded_threshold(oof, items, 0.2) == summary["threshold"]
    assert bounded_threshold(oof, items, 0.01) > oof.max()  # no share assured with 60 items: nothing sent
    new_item, _, _ = _clusters(np.random.default_rng(1), n_items=30, per_item=1)
    far = np.abs(rng.normal(0, 1, (5, feats.shape[1]))) + np.eye(5, feats.shape[1], 8) * 9
    _, unfamiliar_new = familiarity.decide(new_item)
    _, unfamiliar_far = familiarity.decide(far)
    assert unfamiliar_far.all() and unfamiliar_new.mean() <= 0.3


def test_reference_set_is_bounded_and_spread_over_classes() -> None:
    labels = np.array(["a"] * 900 + ["b"] * 100)
    rows = choose_reference(labels, 100, seed=0)
    assert len(rows) <= 100 and len(set(rows)) == len(rows)
    assert 85 <= (labels[rows] == "a").sum() <= 92 and (labels[rows] == "b").sum() >= 8
    assert len(choose_reference(labels[:50], 100)) == 50


def test_none_of_these_rows_make_photos_like_them_unfamiliar() -> None:
    rng = np.random.default_rng(0)
    feats, labels, items = _clusters(rng)
    odd = np.abs(rng.normal(0, 0.1, (4, feats.shape[1]))) + np.eye(4, feats.shape[1], 10) * 5
    plain, _, _ = fit_familiarity(feats, labels, items, max_share=0.01)  # above every out-of-fold score
    taught, summary, _ = fit_familiarity(feats, labels, items, max_share=0.01, negatives=odd[:2])
    near_odd = odd[2:] * 0.3 + feats[:2] * 0.05  # closer to the "none of these" photos than to in-scope ones
    assert summary["negative_rows"] == 2
    assert taught.decide(near_odd)[1].all()
    assert not taught.decide(feats[:4])[1].any()  # in-scope photos stay
    assert (taught.decide(near_odd)[0] == plain.decide(near_odd)[0]).all()  # the score itself is unchanged


def test_reference_file_round_trip_and_its_checks(tmp_path) -> None:
    rng = np.random.default_rng(0)
    feats, labels, items = _clusters(rng)
    familiarity, summary, _ = fit_familiarity(feats, labels, items, max_share=0.05)
    section = save_familiarity(familiarity, summary, tmp_path)
    with_logits, summary_logits, _ = fit_familiarity(feats, labels, items, max_share=0.05,
                                                  oof_logits=rng.normal(0, 1, (len(feats), 3)))
    sub = tmp_path / "with_logits"
    sub.mkdir()
    reloaded = load_familiarity(sub, {"unfamiliar": save_familiarity(with_logits, summary_logits, sub)})
    logits = rng.normal(0, 1, (len(feats), 3))
    np.testing.assert_allclose(reloaded.scores(feats, logits), with_logits.scores(feats, logits), atol=1e-5)
    spec = {"unfamiliar": section}
    json.dumps(spec)  # the section is plain JSON
    loaded = load_familiarity(tmp_path, spec)
    assert loaded is not None and loaded.threshold == familiarity.threshold
    np.testing.assert_allclose(loaded.scores(feats), familiarity.scores(feats), atol=1e-6)
    assert load_familiarity(tmp_path, {}) is None  # a model from before the score: no decision, sorts as before

    data = bytearray((tmp_path / REFERENCE_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / REFERENCE_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_familiarity(tmp_path, spec)
    (tmp_path / REFERENCE_FILE).unlink()
    with pytest.raises(ModelError, match="not found"):
        load_familiarity(tmp_path, spec)


def test_with_out_of_fold_logits_the_score_also_catches_photos_no_class_fits() -> None:
    """Near a labeled photo in feature space but fitting no class (flat logits): kNN alone keeps it, the
    combined score (kNN or energy, on the in-scope scale) sends it; confident in-scope photos stay."""
    rng = np.random.default_rng(0)
    feats, labels, items = _clusters(rng, n_items=60, per_item=2)
    classes = np.unique(labels)
    sure = np.where(labels[:, None] == classes[None, :], 8.0, 0.0) + rng.normal(0, 0.5, (len(labels), 3))
    knn_only, _, _ = fit_familiarity(feats, labels, items, max_share=0.05)
    both, summary, _ = fit_familiarity(feats, labels, items, max_share=0.05, oof_logits=sure)
    assert summary["score"] == "max(knn_cosine, energy)" and len(both.knn_points) == 101
    near = feats[:5] * 1.001  # next to labeled photos...
    flat = np.full((5, 3), -5.0)  # ...that no class fits
    assert not knn_only.decide(near)[1].any()
    assert both.decide(near, flat)[1].all()
    assert not both.decide(feats[:10], sure[:10])[1].any()
    with pytest.raises(ModelError, match="logits"):
        both.decide(near)
    np.testing.assert_allclose(on_scale(np.linspace(0, 1, 101), np.array([0.5, 1.0, 1.5])), [0.5, 1.0, 2.0])


def _shop_photos(rng: np.random.Generator, n: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The shop's own photos: the same 3 classes, but every photo also shows the same kind of scene (a shared
    direction the labeled set lacks, like a room around the furniture) and varies more."""
    centres = np.eye(3, dim) * 5 + 1 + np.eye(1, dim, 6)[0] * 4
    labels = np.arange(n) % 3
    return np.abs(centres[labels] + rng.normal(0, 0.9, (n, dim))), np.array([f"c{c}" for c in labels])


def test_the_shop_photos_people_labeled_bound_the_share_of_their_kind_sent_to_other() -> None:
    rng = np.random.default_rng(0)
    feats, labels, items = _clusters(rng, n_items=60, per_item=3)
    shop, shop_labels = _shop_photos(rng, 40)
    x, y = np.concatenate([feats, shop]), np.concatenate([labels, shop_labels])
    ids = np.concatenate([items, [f"shop{i}" for i in range(len(shop))]])
    focus = np.r_[np.zeros(len(feats), bool), np.ones(len(shop), bool)]
    pooled, pooled_summary, _ = fit_familiarity(x, y, ids, max_share=0.05)
    bounded, summary, oof = fit_familiarity(x, y, ids, max_share=0.05, focus=focus)
    few, few_summary, _ = fit_familiarity(x, y, ids, max_share=0.05, focus=focus & (np.arange(len(x)) < len(feats) + 5))

    assert pooled_summary["threshold_shop_photos"] is None and pooled_summary["shop_photos"] == 0
    assert few_summary["threshold_shop_photos"] is None  # 5 photos: too few to bound anything on
    assert few.threshold == pooled.threshold == summary["threshold_all_photos"]
    assert summary["shop_photos"] == 40 and bounded.threshold == summary["threshold_shop_photos"] > pooled.threshold
    sent = (oof[focus] >= bounded.threshold).mean()
    assert 1 - wilson_lower((1 - sent) * 40, 40) <= 0.05  # the bound holds on the shop's photos alone
    new_shop, _ = _shop_photos(np.random.default_rng(1), 300)
    far = np.abs(rng.normal(0, 1, (20, feats.shape[1]))) + np.eye(20, feats.shape[1], 8) * 9
    assert pooled.decide(new_shop)[1].mean() > 0.1  # sized on the labeled set, its own kind: many sent
    assert bounded.decide(new_shop)[1].mean() <= 0.05
    assert bounded.decide(far)[1].all()  # what fits no category still goes
