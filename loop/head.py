"""Mode "head": a linear head on frozen, cached body features, folded into the network's own classifier.

StandardScaler + LogisticRegression on (image, mirror) features, with C chosen by item-grouped k-fold, so
held-out folds are unseen items like the validation set. The fit is folded into `net.get_classifier()`, so
the artifact stays a plain timm network. Caveat: features are cached per body weights; a different backbone
or image size recomputes them (minutes for thousands of photos on 2 cores).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from loop.backbones import Backbone, weights_tag
from loop.features import cached_features, features_dir
from loop.progress import ProgressCallback, no_progress
from loop.ray_engine import ray_features
from loop.resized import load_resized
from loop.workspace import Workspace

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

HEAD_C_GRID = (0.3, 1.0, 3.0, 10.0)  # inverse L2 strength tried by group k-fold (measured best ~3)
HEAD_MAX_FOLDS = 5


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
) -> tuple[dict, np.ndarray]:
    """Fit StandardScaler + LogisticRegression on cached features and fold them into `net`'s classifier.

    Returns:
        (details for model.json, validation probs (N, K) from the in-memory torch head).
    """
    import torch

    details = linear_probe(ws, net, backbone, train_rows, classes, pretrained=pretrained, on_progress=on_progress)

    # Validation probabilities through the torch classifier itself (no mirror: the network sees one view).
    valid_feats = _features(ws, net, backbone, valid_rows["image_id"].tolist(), pretrained=pretrained,
                            on_progress=on_progress)
    probs = np.zeros((0, len(classes)), np.float32)
    if len(valid_feats):
        with torch.inference_mode():
            probs = torch.softmax(net.get_classifier()(torch.from_numpy(valid_feats[:, 0])), dim=1).numpy()
    return details, probs


def linear_probe(
    ws: Workspace,
    net: torch.nn.Module,
    backbone: Backbone,
    train_rows: pd.DataFrame,
    classes: list[str],
    *,
    pretrained: bool = True,
    on_progress: ProgressCallback = no_progress,
) -> dict:
    """Set `net`'s classifier to the best linear head on its frozen body's features; returns its details."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # Every training image contributes itself and its mirror (same item group, so CV never splits them).
    train_feats = _features(ws, net, backbone, train_rows["image_id"].tolist(), pretrained=pretrained,
                            on_progress=on_progress)
    x = train_feats.reshape(-1, train_feats.shape[-1])
    y = np.repeat(train_rows["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(), 2)
    groups = np.repeat(train_rows["item_id"].fillna(train_rows["image_id"]).astype(str).to_numpy(), 2)

    # C by group k-fold: held-out folds are unseen items, like the validation set. One BLAS thread:
    # these fits are tiny, and multi-threaded BLAS on a busy machine made them ~50x slower (measured).
    with threadpool_limits(1):
        c_value, cv_scores = choose_c(x, y, groups, seed=ws.settings.model.seed)
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(C=c_value, max_iter=3000).fit(scaler.transform(x), y)

    # Fold scaler + regression into one linear layer: W' = W / s, b' = b - W' m.
    coef, intercept = model.coef_, model.intercept_
    if len(classes) == 2:  # sklearn's binary form: one logit for class 1 against 0
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    head = net.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        head.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return {"head": "standard_scaler+logistic_regression", "C": c_value, "cv_accuracy": cv_scores,
            "mirror_augmented": True}


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


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, seed: int = 0) -> tuple[float, dict]:
    """The C of HEAD_C_GRID with the best group k-fold accuracy (1.0 when there are too few groups).

    Within a fold the grid is walked from strong to weak regularisation with warm starts, which cuts
    L-BFGS iterations several-fold compared with independent fits.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    n_groups = len(np.unique(groups))
    if n_groups < 3:
        return 1.0, {}
    folds = GroupKFold(n_splits=min(HEAD_MAX_FOLDS, n_groups), shuffle=True, random_state=seed)
    correct = dict.fromkeys(HEAD_C_GRID, 0)
    for fit_idx, held_idx in folds.split(x, y, groups):
        scaler = StandardScaler().fit(x[fit_idx])
        x_fit, x_held = scaler.transform(x[fit_idx]), scaler.transform(x[held_idx])
        model = LogisticRegression(max_iter=3000, warm_start=True)
        for c in sorted(HEAD_C_GRID):
            model.set_params(C=c).fit(x_fit, y[fit_idx])
            correct[c] += int((model.predict(x_held) == y[held_idx]).sum())
    scores = {str(c): n / len(y) for c, n in correct.items()}
    best = max(HEAD_C_GRID, key=lambda c: (correct[c], -abs(np.log(c))))
    logger.info("head C by group %d-fold: %s -> C=%s", folds.n_splits, scores, best)
    return best, scores
