"""Self-training (`loop.model.self_training`): sure guesses on the shop's sorted photos move the head towards
them; unsure ones and unfamiliar, web or labeled photos never train; out-of-fold logits stay honest."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from loop.flags import SELECTION_GUESS
from loop.model.head import choose_c
from loop.model.self_training import (
    SELF_TRAINING_MAX_PHOTOS,
    SELF_TRAINING_MIN_PHOTOS,
    design_matrix,
    sorted_unlabeled_rows,
    student,
)


def _shifted_problem(seed: int = 0, n_lab: int = 40, n_shop: int = 400):
    """Two classes apart along feature 0; the shop's photos form tighter clusters whose midpoint is shifted
    from the labeled photos' (the cluster assumption self-training relies on). The labels alone put the
    boundary in the shop's class-1 tail; the teacher's sure guesses sit in the clusters' cores."""
    rng = np.random.default_rng(seed)
    y_lab, y_shop = rng.integers(0, 2, n_lab), rng.integers(0, 2, n_shop)
    x_lab = rng.normal(size=(n_lab, 8))
    x_lab[:, 0] += 3.0 * y_lab
    x_shop = rng.normal(size=(n_shop, 8))
    x_shop[:, 0] = rng.normal(size=n_shop) * 0.6 - 1.0 + 3.0 * y_shop
    return x_lab.astype(np.float32), y_lab, x_shop.astype(np.float32), y_shop


def test_design_matrix_holds_the_rows_then_both_views_of_each_unlabeled_photo():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    unl = np.arange(100, 108, dtype=np.float32).reshape(2, 2, 2)
    out = design_matrix(x, np.array([4, 1]), unl)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.vstack([x[4], x[1], unl[0, 0], unl[0, 1], unl[1, 0], unl[1, 1]]))
    np.testing.assert_array_equal(design_matrix(x, np.array([2]), None), x[[2]])


def test_student_follows_its_sure_guesses_and_ignores_the_rest():
    x_lab, y_lab, x_shop, y_shop = _shifted_problem()
    teacher = LogisticRegression(C=1.0, max_iter=1000).fit(x_lab, y_lab)
    pairs = np.stack([x_shop, x_shop], axis=1)  # (M, 2, F): image and "mirror"
    x_all = design_matrix(x_lab, np.arange(len(x_lab)), pairs)
    model = student(teacher, x_all, y_lab, len(x_lab))
    sure = teacher.predict_proba(x_shop).max(axis=1) >= 0.8
    assert model is not teacher and model.n_guesses_ == int(sure.sum()) > 0
    assert not np.allclose(model.coef_, teacher.coef_)
    # The teacher is untouched (its weights seeded the student, as copies)
    np.testing.assert_allclose(teacher.coef_, LogisticRegression(C=1.0, max_iter=1000).fit(x_lab, y_lab).coef_)
    # Nothing to learn from: no sorted photos, or none the teacher is sure of
    assert student(teacher, x_lab, y_lab, len(x_lab)) is teacher
    far = np.zeros((3, 2, x_lab.shape[1]), np.float32)
    far[:, :, 0] = 1.5  # on the decision boundary: probability ~0.5
    assert student(teacher, design_matrix(x_lab, np.arange(len(x_lab)), far), y_lab, len(x_lab)) is teacher


def test_self_training_learns_the_shifted_photos_over_seeds():
    """Accuracy on held-out shop photos, labels alone vs self-trained, over several draws: it must help on
    average (the shift is what the labels never show) and never collapse."""
    gains = []
    for seed in range(8):
        x_lab, y_lab, x_shop, y_shop = _shifted_problem(seed)
        pool, test = x_shop[:200], slice(200, None)
        teacher = LogisticRegression(C=1.0, max_iter=1000).fit(x_lab, y_lab)
        x_all = design_matrix(x_lab, np.arange(len(x_lab)), np.stack([pool, pool], axis=1))
        model = student(teacher, x_all, y_lab, len(x_lab))
        gains.append((model.predict(x_shop[test]) == y_shop[test]).mean()
                     - (teacher.predict(x_shop[test]) == y_shop[test]).mean())
    assert np.mean(gains) > 0.003, gains
    assert min(gains) >= -0.01, gains


def test_out_of_fold_logits_never_see_the_held_fold_through_a_guess():
    """The unlabeled photos ARE the held-out photos here (copies of them): if the student's teacher had seen
    their labels, out-of-fold accuracy would jump to ~1. With each fold's own teacher it stays near the
    labels-alone value."""
    rng = np.random.default_rng(1)
    n, d = 120, 6
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, d)) + 1.2 * np.eye(3, d)[y]).astype(np.float32)
    groups = np.arange(n).astype(str)
    _, _, alone, _ = choose_c(x, y, groups, n_classes=3, folds=5)
    _, _, selfed, _ = choose_c(x, y, groups, n_classes=3, folds=5, unlabeled=np.stack([x, x], axis=1))
    acc_alone = (alone.argmax(1) == y).mean()
    acc_self = (selfed.argmax(1) == y).mean()
    assert acc_self < acc_alone + 0.1 < 0.95, (acc_alone, acc_self)


def _manifest(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": [f"i{k}" for k in range(n)], "path": [f"/p/{k}.jpg" for k in range(n)],
        "label": pd.array([None] * n, dtype="string"), "pred_label": ["chair"] * n, "pred_model": ["v0001"] * n,
        "flag": pd.array([None] * n, dtype="string"), "source": ["user"] * n})


def test_sorted_unlabeled_rows_are_the_shops_own_unreviewed_predicted_photos():
    df = _manifest(40)
    df.loc[0, "label"] = "chair"  # labeled: trains as a label
    df.loc[1, "flag"] = "unfamiliar"  # in _other: no category to guess
    df.loc[2, "source"] = "web"  # not the shop's
    df.loc[3, "pred_label"] = None  # never sorted
    df.loc[4, "path"] = None  # nothing to read
    df.loc[5, "flag"] = "low_confidence"  # unsure photos may still train if the NEW head is sure
    df.loc[6, "pred_model"] = SELECTION_GUESS  # only the review queue guessed: never screened by a sort
    ids = set(sorted_unlabeled_rows(df)["image_id"])
    assert ids == {f"i{k}" for k in (5, *range(7, 40))}
    assert sorted_unlabeled_rows(_manifest(SELF_TRAINING_MIN_PHOTOS - 1)).empty
    many = sorted_unlabeled_rows(_manifest(SELF_TRAINING_MAX_PHOTOS + 50), seed=3)
    assert len(many) == SELF_TRAINING_MAX_PHOTOS
    assert list(many["image_id"]) == list(sorted_unlabeled_rows(_manifest(SELF_TRAINING_MAX_PHOTOS + 50),
                                                                seed=3)["image_id"])
