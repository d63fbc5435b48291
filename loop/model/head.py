"""Mode "head": a linear head on frozen, cached body features, folded into the network's own classifier.

StandardScaler + LogisticRegression on (image, mirror) features, with C chosen by item-grouped k-fold, so
held-out folds are unseen items like the validation set. The same folds yield out-of-fold predictions of
every training photo, which the metrics, the calibration (`loop.model.calibration`) and the flag curves
(`loop.scoring.flagging`) use; then the head is refit on all training photos. The fit is folded into
`net.get_classifier()`, so the artifact stays a plain timm network. Caveat: features are cached per body
weights; a different backbone or image size recomputes them (minutes for thousands of photos on 2 cores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from loop.data.resized import load_resized
from loop.model.backbones import Backbone, weights_tag
from loop.model.features import cached_features, features_dir
from loop.model.ray_features import ray_features
from loop.model.self_training import SELF_TRAINING_CONFIDENCE, SELF_TRAINING_WEIGHT, scaled_design, student
from loop.phases import PhaseClock
from loop.progress import ProgressCallback, no_progress
from loop.workspace import Workspace

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

HEAD_C_GRID = (0.3, 1.0, 3.0, 10.0)  # inverse L2 strength tried by group k-fold (measured best ~3)
MISSING_CLASS_BIAS = -30.0  # logit of a class a fold never saw: it never wins


@dataclass
class OutOfFold:
    """Out-of-fold predictions over the training photos: each photo scored by a model that never saw its item.

    `logits` are uncalibrated (N, K) in `classes` order; `labels` are class indices (N,).
    """

    image_ids: list[str]
    logits: np.ndarray
    labels: np.ndarray
    folds: int


def fit_head(
    ws: Workspace,
    net: torch.nn.Module,
    backbone: Backbone,
    train_rows: pd.DataFrame,
    valid_rows: pd.DataFrame,
    classes: list[str],
    *,
    pretrained: bool = True,
    on_progress: ProgressCallback = no_progress,
    clock: PhaseClock | None = None,
    unlabeled_rows: pd.DataFrame | None = None,
) -> tuple[dict, np.ndarray, OutOfFold | None]:
    """Fit StandardScaler + LogisticRegression on cached features and fold them into `net`'s classifier.

    With `model.calibrate`, the temperature fitted on the out-of-fold logits is folded in as well;
    `unlabeled_rows` self-train the head (`linear_probe`).
    Returns:
        (details for model.json, validation probs (N, K) from the in-memory torch head, out-of-fold
        predictions of the training photos, or None with fewer than 3 item groups).
    """
    import torch

    from loop.model.calibration import fit_temperature, fold_temperature

    clock = clock or PhaseClock()
    details, oof = linear_probe(ws, net, backbone, train_rows, classes, pretrained=pretrained,
                                on_progress=on_progress, clock=clock, unlabeled_rows=unlabeled_rows)
    temperature = 1.0
    if oof is not None and ws.settings.model.calibrate:
        temperature = fit_temperature(oof.logits, oof.labels)
        fold_temperature(net, temperature)
    details["temperature"] = temperature
    clock.lap("calibration")

    # Validation probabilities through the torch classifier itself (no mirror: the network sees one view).
    valid_feats = _features(ws, net, backbone, valid_rows["image_id"].tolist(), pretrained=pretrained,
                            on_progress=on_progress)
    probs = np.zeros((0, len(classes)), np.float32)
    if len(valid_feats):
        with torch.inference_mode():
            probs = torch.softmax(net.get_classifier()(torch.from_numpy(valid_feats[:, 0])), dim=1).numpy()
    clock.lap("features")
    return details, probs, oof


def linear_probe(
    ws: Workspace,
    net: torch.nn.Module,
    backbone: Backbone,
    train_rows: pd.DataFrame,
    classes: list[str],
    *,
    pretrained: bool = True,
    on_progress: ProgressCallback = no_progress,
    clock: PhaseClock | None = None,
    unlabeled_rows: pd.DataFrame | None = None,
) -> tuple[dict, OutOfFold | None]:
    """Set `net`'s classifier to the best linear head on its frozen body's features.

    `unlabeled_rows`: sorted, unreviewed photos (resized cache filled) that self-train the head
    (`loop.model.self_training`); None or empty: the labels alone.
    Returns:
        (details, out-of-fold predictions of the chosen C, or None with fewer than 3 item groups).
    """
    import torch
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    # Every training image contributes itself and its mirror (same item group, so CV never splits them).
    train_feats = _features(ws, net, backbone, train_rows["image_id"].tolist(), pretrained=pretrained,
                            on_progress=on_progress)
    x = train_feats.reshape(-1, train_feats.shape[-1])
    y = np.repeat(train_rows["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(), 2)
    groups = np.repeat(train_rows["item_id"].fillna(train_rows["image_id"]).astype(str).to_numpy(), 2)
    unlabeled = None
    if unlabeled_rows is not None and len(unlabeled_rows):
        unlabeled = _features(ws, net, backbone, unlabeled_rows["image_id"].tolist(), pretrained=pretrained,
                              on_progress=on_progress)
    clock = clock or PhaseClock()
    clock.lap("features")

    # C by group k-fold: held-out folds are unseen items, like the validation set. One BLAS thread:
    # these fits are tiny, and multi-threaded BLAS on a busy machine made them ~50x slower (measured).
    with threadpool_limits(1):
        c_value, cv_scores, oof_logits, n_folds = choose_c(x, y, groups, n_classes=len(classes),
                                                           folds=ws.settings.model.cv_folds,
                                                           seed=ws.settings.model.seed, unlabeled=unlabeled)
        clock.lap("cv")
        scaler, x_all = scaled_design(x, np.arange(len(x)), unlabeled)
        model = student(LogisticRegression(C=c_value, max_iter=3000).fit(x_all[: len(x)], y), x_all, y, len(x))
        del x_all
        clock.lap("fit")

    # Fold scaler + regression into one linear layer: W' = W / s, b' = b - W' m.
    coef, intercept = _full_coef(model, len(classes))
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    head = net.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        head.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    oof = None
    if oof_logits is not None:  # the image rows only (even indices): the network sees no mirror at sort time
        oof = OutOfFold(train_rows["image_id"].astype(str).tolist(), oof_logits[0::2], y[0::2], n_folds)
    self_training = {"sorted_photos": 0 if unlabeled is None else len(unlabeled),
                     "trained_on": int(getattr(model, "n_guesses_", 0)), "confidence": SELF_TRAINING_CONFIDENCE,
                     "weight": SELF_TRAINING_WEIGHT}
    return {"head": "standard_scaler+logistic_regression", "C": c_value, "cv_accuracy": cv_scores,
            "cv_folds": n_folds, "mirror_augmented": True, "self_training": self_training}, oof


def backbone_cv_accuracy(ws: Workspace, name: str, train_rows: pd.DataFrame, classes: list[str], *,
                         on_progress: ProgressCallback = no_progress) -> float:
    """Item-grouped CV accuracy of the head recipe on backbone `name`'s features (for choosing a backbone)."""
    from threadpoolctl import threadpool_limits

    from loop.model.backbones import create_network, get_backbone

    settings = ws.settings.model
    backbone = get_backbone(name, settings.backbone_weights_file)
    net = create_network(ws, name, len(classes), seed=settings.seed)
    feats = _features(ws, net, backbone, train_rows["image_id"].tolist(), pretrained=True, on_progress=on_progress)
    x = feats.reshape(-1, feats.shape[-1])
    y = np.repeat(train_rows["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(), 2)
    groups = np.repeat(train_rows["item_id"].fillna(train_rows["image_id"]).astype(str).to_numpy(), 2)
    with threadpool_limits(1):
        _, scores, _, _ = choose_c(x, y, groups, n_classes=len(classes), folds=settings.cv_folds, seed=settings.seed)
    return max(scores.values()) if scores else 0.0


def _full_coef(model, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, F) weights and (K,) biases of a fitted LogisticRegression, with every class a row.

    sklearn's binary form is one logit for class 1 against 0; a class absent from a fold gets a row that
    never wins (zero weights, a very negative bias).
    """
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    if len(model.classes_) == n_classes:
        return coef, intercept
    full_coef = np.zeros((n_classes, coef.shape[1]))
    full_bias = np.full(n_classes, MISSING_CLASS_BIAS)
    full_coef[model.classes_], full_bias[model.classes_] = coef, intercept
    return full_coef, full_bias


def head_features(ws: Workspace, net: torch.nn.Module, backbone: Backbone, ids: list[str], *,
                  pretrained: bool = True) -> np.ndarray:
    """(N, F) cached frozen-body features of `ids` (the image rows, no mirror): what the shipped network's
    body computes for them in head mode."""
    return _features(ws, net, backbone, ids, pretrained=pretrained, on_progress=no_progress)[:, 0]


def _features(ws: Workspace, net: torch.nn.Module, backbone: Backbone, ids: list[str], *, pretrained: bool,
              on_progress: ProgressCallback) -> np.ndarray:
    """(N, 2, F) cached body features (image, mirror) of `ids`, keyed by the body's weights."""
    settings = ws.settings.model
    size = settings.image_size
    folder = features_dir(ws.cache_dir, backbone.name, size,
                          weights_tag(ws, backbone.name, pretrained=pretrained, seed=settings.seed))
    remote = ray_features(ws, net, backbone) if settings.feature_engine == "ray" else None  # train --ray
    return cached_features(net, ids, lambda i: load_resized(ws, i, size), folder=folder, mean=backbone.mean,
                           std=backbone.std, batch_size=settings.batch_size, on_progress=on_progress, remote=remote)


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, n_classes: int | None = None, folds: int = 5,
             seed: int = 0, unlabeled: np.ndarray | None = None) -> tuple[float, dict, np.ndarray | None, int]:
    """The C of HEAD_C_GRID with the best group k-fold accuracy, and its out-of-fold logits.

    Within a fold the grid is walked from strong to weak regularisation with warm starts, which cuts
    L-BFGS iterations several-fold compared with independent fits. The same folds give the out-of-fold
    logits (N, K) of every row for the chosen C: the metrics, calibration and flag curves all use them.
    `unlabeled` (M, 2, F): sorted photos for self-training (`loop.model.self_training`); each fold's fit at
    each C is the teacher of that fold's student, and the student's logits are the out-of-fold ones.
    Returns:
        (C, {C: accuracy}, out-of-fold logits or None, number of folds); (1.0, {}, None, 0) with fewer
        than 3 item groups.
    """
    from sklearn.linear_model import LogisticRegression

    n_classes = n_classes or int(y.max()) + 1
    n_groups = len(np.unique(groups))
    if n_groups < 3:
        return 1.0, {}, None, 0
    splits = item_folds(groups, min(folds, n_groups), seed=seed)
    logits = {c: np.zeros((len(y), n_classes)) for c in HEAD_C_GRID}
    for fit_idx, held_idx in splits + class_rescues(splits, y, groups):  # rescues overwrite their rows
        (scaler, x_all), n_fit = scaled_design(x, fit_idx, unlabeled), len(fit_idx)
        x_held = scaler.transform(x[held_idx])
        if len(np.unique(y[fit_idx])) < 2:  # a fold with one class: it can only guess that class
            for c in HEAD_C_GRID:
                logits[c][held_idx] = MISSING_CLASS_BIAS
                logits[c][held_idx, y[fit_idx][0]] = 0.0
            continue
        model = LogisticRegression(max_iter=3000, warm_start=True)
        for c in sorted(HEAD_C_GRID):
            model.set_params(C=c).fit(x_all[:n_fit], y[fit_idx])
            coef, intercept = _full_coef(student(model, x_all, y[fit_idx], n_fit), n_classes)
            logits[c][held_idx] = x_held @ coef.T + intercept
    correct = {c: int((logits[c].argmax(axis=1) == y).sum()) for c in HEAD_C_GRID}
    scores = {str(c): n / len(y) for c, n in correct.items()}
    best = max(HEAD_C_GRID, key=lambda c: (correct[c], -abs(np.log(c))))
    logger.info("head C by group %d-fold: %s -> C=%s", len(splits), scores, best)
    return best, scores, logits[best], len(splits)


def item_folds(groups: np.ndarray, folds: int, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, held-out rows) per fold, each item in the fold its hash names.

    Why a hash, not a shuffled GroupKFold: an item keeps its fold when other items arrive, so two versions'
    out-of-fold predictions of a photo come from fold models that held out the same items; the gate can
    then compare them photo by photo (`loop.learning.gate.out_of_fold_evidence`) and see the new labels' effect,
    not a reshuffle's. Falls back to GroupKFold when the hash leaves fewer than two folds (a handful of items).
    """
    import hashlib

    from sklearn.model_selection import GroupKFold

    keys = np.asarray(groups).astype(str)
    fold_of = {g: int(hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(), 16) % folds for g in np.unique(keys)}
    fold = np.array([fold_of[g] for g in keys])
    used = np.unique(fold)
    if len(used) < 2:
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(keys, groups=keys))
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in used]


def class_rescues(splits: list[tuple[np.ndarray, np.ndarray]], y: np.ndarray, groups: np.ndarray
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-item-out splits for the held-out items whose class their fold's model never saw.

    With ~3 items per class, the hash sometimes puts all of a class's items in one fold; their out-of-fold
    predictions would then be certain mistakes that say nothing about the model (and drag the calibration
    temperature to ~10). Each such item is instead predicted by a model trained on every other item: still
    out of fold (it never saw the item), and still stable (it depends on the item alone, not on a reshuffle).
    """
    keys = np.asarray(groups).astype(str)
    rescues = []
    for fit_idx, held_idx in splits:
        absent = ~np.isin(y[held_idx], y[fit_idx])
        for g in np.unique(keys[held_idx][absent]):
            others = keys != g
            if np.isin(y[keys == g], y[others]).all():  # the class has other items to learn from
                rescues.append((np.flatnonzero(others), np.flatnonzero(~others)))
    return rescues
