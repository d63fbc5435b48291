"""Audit: find labels that are probably wrong, including the confident mistakes no uncertainty flag catches.

A photo labeled "cabinet" that the model, *never having trained on it*, firmly calls "wardrobe" is a
suspect. Two parts:

1. Out-of-fold probabilities: the linear head is refit k times on the cached backbone features, each time
   without one fold of *items* (all photos of an item leave together, or a near-duplicate would vouch for
   its own label), and predicts the held-out fold. Seconds on cached features.
2. Confident learning (Northcutt et al., 2021; cleanlab's `confident_learning` filter): per-class
   thresholds t_j = the mean probability of class j over the photos labeled j. A photo labeled y is a
   suspect when some other class j reaches its own threshold and is the most probable such class; j is
   the model's alternative. Per-class thresholds matter: a hard class whose own photos average 0.4
   would otherwise look mislabeled everywhere.

`audit(ws)` flags suspects `suspected_mislabel` in the manifest with the alternative as the prediction,
so `review push` sends them like any flag. Caveat: a class with very few labels gets a noisy threshold,
and a systematic confusion learned from many wrong labels looks "right"; the audit finds the stray
mistakes, not a whole mislabeled folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loop.data import manifest as mf
from loop.data.classnames import OTHER_LABEL
from loop.data.label_sources import REVIEW
from loop.errors import ConfigError, ModelError
from loop.flags import SUSPECTED_MISLABEL, USER_MOVED
from loop.model.embeddings import embeddings
from loop.review.probe import fit_probe, probe_probs
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

AUDIT_MODEL = "audit"
DEFAULT_FOLDS = 5
TRUSTED_SOURCES = (REVIEW,)  # labels a reviewer gave: trusted, never flagged again by the audit


def out_of_fold_probs(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_classes: int, *,
    folds: int = DEFAULT_FOLDS, c: float = 1.0, seed: int = 0,
) -> np.ndarray:
    """Each photo's class probabilities from a head that never saw its item: (N, V, F) -> (N, K).

    Args:
        features: (N, V, F) V views per photo (image, mirror); the head trains on every view and predicts
            from the first (what the network sees at sort time).
        labels: (N,) class index in [0, n_classes). groups: (N,) item id per photo.
        folds: item-grouped folds (fewer when there are fewer items).
    """
    from sklearn.model_selection import GroupKFold

    feats = np.asarray(features)
    if feats.ndim == 2:
        feats = feats[:, None, :]
    labels, groups = np.asarray(labels), np.asarray(groups)
    n, views = feats.shape[:2]
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ModelError(f"the audit needs photos of at least 2 items, got {n_groups}; label more photos")
    probs = np.zeros((n, n_classes))
    splitter = GroupKFold(n_splits=min(folds, n_groups), shuffle=True, random_state=seed)
    for fit_idx, held_idx in splitter.split(feats[:, 0], labels, groups):
        y_fit = labels[fit_idx]
        if len(np.unique(y_fit)) < 2:  # nothing to learn: the held-out fold keeps the label prior
            probs[held_idx] = np.bincount(y_fit, minlength=n_classes) / len(y_fit)
            continue
        model = fit_probe(feats[fit_idx].reshape(-1, feats.shape[-1]), np.repeat(y_fit, views), c=c)
        probs[held_idx] = probe_probs(model, feats[held_idx, 0], n_classes)
    return probs


@dataclass(frozen=True)
class Suspects:
    """Result of `find_label_issues`: which photos look mislabeled, and as what.

    is_issue: (N,) bool. alternative: (N,) the likelier class index (-1 where none). score: (N,) in [0, 1],
    higher = more surely wrong (1 - p[given label]; 0 for non-suspects). thresholds: (K,) per-class thresholds.
    """

    is_issue: np.ndarray
    alternative: np.ndarray
    score: np.ndarray
    thresholds: np.ndarray = field(repr=False)

    def ranked(self) -> np.ndarray:
        """Indices of the suspects, most surely wrong first."""
        idx = np.flatnonzero(self.is_issue)
        return idx[np.argsort(-self.score[idx], kind="stable")]


def _thresholds(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(K,) per-class thresholds t_j = mean p_j over photos labeled j (inf for a class with none)."""
    t = np.full(p.shape[1], np.inf)
    for j in range(p.shape[1]):
        if (y == j).any():
            t[j] = p[y == j, j].mean()
    return t


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(K, K) counts: [given, likely true] over photos whose likeliest class reaching its own threshold is it.

    Calibrated so that row i sums to the number of photos labeled i (Northcutt et al., eq. 2-3).
    """
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    k = p.shape[1]
    confident = np.where(p >= _thresholds(y, p)[None, :] - 1e-12, p, -1.0)
    best, has = confident.argmax(axis=1), confident.max(axis=1) >= 0
    joint = np.zeros((k, k))
    np.add.at(joint, (y[has], best[has]), 1.0)
    rows = joint.sum(axis=1, keepdims=True)
    counts = np.bincount(y, minlength=k)[:, None].astype(float)
    return np.where(rows > 0, joint / np.where(rows > 0, rows, 1.0) * counts, 0.0)


def _by_confident_learning(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Issues = off-diagonal photos of the confident joint (each counted where it is confidently)."""
    confident = np.where(p >= _thresholds(y, p)[None, :] - 1e-12, p, -1.0)
    return (confident.max(axis=1) >= 0) & (confident.argmax(axis=1) != y)


def _by_noise_rate(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """cleanlab's default: for each (given i, true j) cell, the estimated count of photos labeled i with the
    largest margin p_j - p_i. Fewer, surer suspects than `confident_learning`."""
    joint = confident_joint(y, p)
    issue = np.zeros(len(y), bool)
    for i in range(p.shape[1]):
        idx = np.flatnonzero(y == i)
        for j in range(p.shape[1]):
            n_ij = int(round(joint[i, j])) if i != j else 0
            if n_ij and len(idx):
                margin_ij = p[idx, j] - p[idx, i]
                issue[idx[np.argsort(-margin_ij, kind="stable")[:n_ij]]] = True
    return issue


ISSUE_METHODS = {"prune_by_noise_rate": _by_noise_rate, "confident_learning": _by_confident_learning}


def find_label_issues(labels: np.ndarray, probs: np.ndarray, *, method: str = "prune_by_noise_rate") -> Suspects:
    """Confident learning with per-class thresholds: (N,) labels and (N, K) out-of-fold probs -> Suspects.

    Methods (`ISSUE_METHODS`): "confident_learning" flags every photo whose likeliest class among those
    reaching their own threshold t_j = mean(p_j | labeled j) is not its label (high recall);
    "prune_by_noise_rate" (default, as cleanlab) estimates how many photos of each (given, true) pair are
    wrong from the calibrated confident joint and flags that many, largest margin first (higher
    precision). Either way a photo whose label is already the model's top class is never a suspect.
    """
    try:
        rule = ISSUE_METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown audit method {method!r}; valid: {', '.join(sorted(ISSUE_METHODS))}") from None
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, k = p.shape
    if n == 0:
        return Suspects(np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0), np.zeros(k))
    is_issue = rule(y, p) & (p.argmax(axis=1) != y)
    others = p.copy()
    others[np.arange(n), y] = -1.0
    alternative = np.where(is_issue, others.argmax(axis=1), -1)
    # Ranked by self-confidence (cleanlab's default): on ikea_products with 10% flips, the top-n by
    # 1 - p[label] held ~0.6 flips against ~0.4 when ranked by the margin to the alternative.
    score = np.where(is_issue, 1.0 - p[np.arange(n), y], 0.0)
    return Suspects(is_issue, alternative, score, _thresholds(y, p))


@dataclass(frozen=True)
class AuditReport:
    """What `audit` found and flagged."""

    checked: int  # labeled photos audited
    suspects: pd.DataFrame  # image_id, path, label, alternative, p_label, p_alternative, score
    flagged: int  # newly flagged suspected_mislabel in the manifest
    folds: int

    def summary(self) -> str:
        return (f"audited {self.checked} labeled photo(s) ({self.folds}-fold, item-grouped): "
                f"{len(self.suspects)} suspect(s), {self.flagged} newly flagged {SUSPECTED_MISLABEL}")


def audit(ws: Workspace, *, folds: int = DEFAULT_FOLDS, flag: bool = True, on_progress=None) -> AuditReport:
    """Find likely wrong labels among the manifest's labeled photos and flag them for review.

    Every labeled photo (train and valid: a wrong label hurts the gate as much as training) is scored out
    of fold; suspects get `flag = suspected_mislabel`, `pred_label` = the model's alternative and
    `pred_conf` = its out-of-fold probability, so `review push` shows the alternative pre-filled. Photos a
    reviewer already labeled are left alone.

    Raises:
        ModelError: fewer than 2 classes or 2 items labeled, or missing backbone weights.

    Example:
        >>> print(audit(open_workspace("data")).summary())   # doctest: +SKIP
    """
    df = mf.load(ws)
    rows = df[df["label"].notna() & (df["label"] != OTHER_LABEL)].reset_index(drop=True)  # "none of these": no class
    classes = sorted(rows["label"].astype(str).unique())
    if len(classes) < 2:
        raise ModelError(f"the audit needs labels of at least 2 classes, found {len(classes)}; label more photos")
    feats, ok = embeddings(ws, rows, on_progress=on_progress)
    rows, feats = rows[ok].reset_index(drop=True), feats[ok]
    y = rows["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    groups = rows["item_id"].fillna(rows["image_id"]).astype(str).to_numpy()
    n_folds = min(folds, len(np.unique(groups)))
    probs = out_of_fold_probs(feats, y, groups, len(classes), folds=folds, seed=ws.settings.model.seed)
    found = find_label_issues(y, probs)
    human = rows["label_source"].astype(object).isin(TRUSTED_SOURCES).to_numpy(bool)
    order = [i for i in found.ranked() if not human[i]]
    suspects = pd.DataFrame({
        "image_id": rows["image_id"].to_numpy()[order],
        "path": rows["path"].to_numpy()[order],
        "label": rows["label"].astype(str).to_numpy()[order],
        "alternative": [classes[found.alternative[i]] for i in order],
        "p_label": probs[order, y[order]] if order else np.zeros(0),
        "p_alternative": probs[order, found.alternative[order]] if order else np.zeros(0),
        "score": found.score[order],
    })
    flagged = _flag(ws, suspects) if flag else 0
    report = AuditReport(len(rows), suspects, flagged, n_folds)
    logger.info("%s", report.summary())
    return report


def _flag(ws: Workspace, suspects: pd.DataFrame) -> int:
    """Mark suspects in one manifest write; a user_moved flag is never replaced. Returns how many are new."""
    if suspects.empty:
        return 0
    by_id = suspects.set_index("image_id")
    newly = 0

    def change(df: pd.DataFrame) -> pd.DataFrame:
        nonlocal newly
        hit = df["image_id"].isin(by_id.index) & (df["flag"].astype(object) != USER_MOVED).to_numpy(bool)
        ids = df.loc[hit, "image_id"]
        newly = int((df.loc[hit, "flag"].astype(object) != SUSPECTED_MISLABEL).sum())
        df.loc[hit, "flag"] = SUSPECTED_MISLABEL
        df.loc[hit, "pred_label"] = ids.map(by_id["alternative"]).to_numpy()
        df.loc[hit, "pred_conf"] = ids.map(by_id["p_alternative"]).to_numpy()
        df.loc[hit, "pred_score"] = ids.map(by_id["score"]).to_numpy()
        df.loc[hit, "pred_model"] = AUDIT_MODEL
        return df

    mf.update(ws, change)
    return newly
