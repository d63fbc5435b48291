"""Self-training: the shop's sorted, unreviewed photos train the head too, with its own sure guesses, weighted low.

A shop reviews a few dozen of the thousands of photos it sorts, and its photos look unlike the labeled set
(other rooms, light, clutter). A head fitted on the labels alone learns the shop's look only from those few
reviews. Here the head first fits the labels (the teacher); every sorted photo it is at least
SELF_TRAINING_CONFIDENCE sure of joins the fit with that guess and SELF_TRAINING_WEIGHT of a label's weight
(the student). Measured with `bench/domain_shift.py`, against the alternatives (EM class priors, per-domain
standardisation, an older teacher) with `bench/adaptation.py` (docs/training-and-gate.md). The teacher is the same
fit that the labels alone would give, never an older model: an older model's sure mistakes are exactly
what the newest reviews correct, and measured, an older teacher made round 1 worse than no self-training.

Inside the item-grouped folds the teacher is the fold's own fit, so out-of-fold predictions (metrics,
calibration, flags, the gate) never see a held-out label through a guess. Guesses are never labels: they
are not written anywhere, the flags and the unfamiliar score are sized on labeled photos only, and no photo
is a guess for more than one training.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from loop.flags import SELECTION_GUESS, UNFAMILIAR

SELF_TRAINING_CONFIDENCE = 0.8  # the teacher's (uncalibrated) probability a sorted photo needs to train
SELF_TRAINING_WEIGHT = 0.2  # its weight against a labeled photo's 1.0: a guess counts less than a person
SELF_TRAINING_MAX_PHOTOS = 2000  # a random sample beyond this: bounds the nightly cost at any archive size
SELF_TRAINING_MIN_PHOTOS = 20  # fewer sorted photos than this: not worth the second fit


def sorted_unlabeled_rows(df: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Manifest rows of photos a `sort` predicted and no person labeled: the shop's own, unreviewed photos.

    Left out: photos sent to the unfamiliar folder (no category to guess), photos only the review queue
    guessed at (no sort's unfamiliar score screened them: a truck photo would get a furniture guess), web
    images (not the shop's), photos without a path to read. At most SELF_TRAINING_MAX_PHOTOS, a random
    sample by `seed`; empty below SELF_TRAINING_MIN_PHOTOS.
    """
    keep = df["label"].isna() & df["pred_label"].notna() & df["path"].notna()
    keep &= df["pred_model"].notna() & df["pred_model"].astype(object).ne(SELECTION_GUESS)
    keep &= df["flag"].astype(object).ne(UNFAMILIAR) & df["source"].astype(object).ne("web")
    rows = df[keep.to_numpy(bool)]
    if len(rows) < SELF_TRAINING_MIN_PHOTOS:
        return rows.iloc[:0].reset_index(drop=True)
    if len(rows) > SELF_TRAINING_MAX_PHOTOS:
        rows = rows.sample(SELF_TRAINING_MAX_PHOTOS, random_state=seed)
    return rows.reset_index(drop=True)


def design_matrix(x: np.ndarray, rows: np.ndarray, unlabeled: np.ndarray | None) -> np.ndarray:
    """One (len(rows) + 2M, F) array: `x[rows]`, then the unlabeled photos' (M, 2, F) image and mirror rows.

    The teacher fits the leading rows (a view) and the student the whole array, and the caller scales it in
    place, so a fold holds its features once (at 50,000 labels each copy is ~0.5 GB)."""
    n, extra = len(rows), 0 if unlabeled is None else 2 * len(unlabeled)
    out = np.empty((n + extra, x.shape[1]), x.dtype)
    np.take(x, rows, axis=0, out=out[:n])
    if extra:
        out[n:] = unlabeled.reshape(extra, x.shape[1])
    return out


def scaled_design(x: np.ndarray, rows: np.ndarray, unlabeled: np.ndarray | None):
    """`design_matrix`, standardised in place by a StandardScaler fitted on its labeled rows only (so the
    guesses never move the scale the labels are fitted on); returns (scaler, array)."""
    from sklearn.preprocessing import StandardScaler

    out = design_matrix(x, rows, unlabeled)
    scaler = StandardScaler().fit(out[: len(rows)])
    return scaler, scaler.transform(out, copy=False)


def student(teacher, x: np.ndarray, y: np.ndarray, n_labeled: int):
    """A LogisticRegression like `teacher` (fitted on x[:n_labeled], y), refitted on all of `x`: the rows after
    n_labeled are image, mirror pairs of sorted photos, each with the teacher's guess, weighted
    SELF_TRAINING_WEIGHT where the teacher is sure and 0 elsewhere (a weight, not a row selection: no copy
    of `x`). `teacher` itself when it is sure of none. Warm-started from the teacher's weights; the
    student's `n_guesses_` says how many photos trained."""
    from sklearn.base import clone

    pairs = x[n_labeled:]
    if not len(pairs):
        return teacher
    probs = teacher.predict_proba(pairs[0::2])  # the image rows; the mirror shares its photo's guess
    sure = probs.max(axis=1) >= SELF_TRAINING_CONFIDENCE
    if not sure.any():
        return teacher
    guesses = np.repeat(teacher.classes_[probs.argmax(axis=1)], 2)
    weights = np.concatenate([np.ones(n_labeled), np.repeat(np.where(sure, SELF_TRAINING_WEIGHT, 0.0), 2)])
    model = clone(teacher).set_params(warm_start=True)
    model.coef_, model.intercept_ = teacher.coef_.copy(), teacher.intercept_.copy()
    model.fit(x, np.concatenate([y, guesses]), sample_weight=weights)
    model.n_guesses_ = int(sure.sum())
    return model
