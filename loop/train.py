"""Training: labeled manifest rows -> a candidate model version in the registry (never deployed here).

Read `train` top to bottom; each phase says why it is there. Two modes:

- "head" (default): a linear head on frozen, cached body features (image + mirror), StandardScaler +
  LogisticRegression with C chosen by group k-fold over item groups, then *folded into the network's own
  classifier layer*, so the artifact is a plain timm network like any other. Measured on ~400 real photos:
  as accurate as the best fine-tuning (0.70-0.73 on unseen items) and ~100x cheaper to retrain.
- "finetune" (`loop.finetune`): a fastai Learner over the SAME timm network, its classifier started from
  the head mode's linear probe: one-cycle `fine_tune`, fastai's default augmentations, body BatchNorm kept
  in eval mode and `train_bn=False` (letting the pretrained BatchNorm statistics move cost ~0.15 accuracy
  on this kind of data). fastai is imported only on this path.

Both read images from the resized cache and are scored on the user-photo validation set; the promotion
gate (`loop.gate`) decides which model ships.
Caveat: classes are the sorted labels present in the TRAIN split; a label seen only in validation cannot
be learned (it is logged, and counts as errors in the metrics).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from loop import manifest, registry
from loop.artifact import save_artifact
from loop.backbones import Backbone, create_network, get_backbone, weights_tag
from loop.errors import ModelError
from loop.evaluate import confusion_png, metrics_by_source, summary_line
from loop.features import cached_features, features_dir
from loop.progress import ProgressCallback, no_progress
from loop.resized import ensure_resized, load_resized, resized_path
from loop.workspace import Workspace

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MODES = ("head", "finetune")
HEAD_C_GRID = (0.3, 1.0, 3.0, 10.0)  # inverse L2 strength tried by group k-fold (measured best ~3)
HEAD_MAX_FOLDS = 5


@dataclass
class TrainResult:
    """What `train` produced: a candidate version (not deployed), its mode and its validation metrics."""

    version: str
    mode: str
    metrics: dict
    model_dir: Path
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"trained candidate {self.version} ({self.mode} mode, {self.seconds:.0f} s): "
                f"{summary_line(self.metrics)}")


def labeled_rows(ws: Workspace) -> pd.DataFrame:
    """Manifest rows that can train or validate: a label and a split (train/valid)."""
    df = manifest.load(ws)
    keep = df["label"].notna() & df["split"].isin(["train", "valid"])
    return df.loc[keep].reset_index(drop=True)


def labels_fingerprint(df: pd.DataFrame) -> str:
    """A short hash of (image_id, label, split) over labeled rows: equal fingerprints = same training data."""
    rows = df.loc[df["label"].notna(), ["image_id", "label", "split"]].astype(str)
    text = "\n".join(sorted("\t".join(r) for r in rows.itertuples(index=False, name=None)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train(
    ws: Workspace, *, mode: str | None = None, pretrained: bool = True, on_progress: ProgressCallback | None = None
) -> TrainResult:
    """Train a candidate model from the manifest and write it as a new registry version.

    Args:
        mode: "head" or "finetune" (default: `model.train_mode` in the settings).
        pretrained: False trains on a random-initialised body: the control showing the weights matter.
    Returns:
        TrainResult with the new version (a candidate; `loop.gate.deploy` decides whether it ships).
    Raises:
        ModelError: no labeled images, fewer than 2 classes in the train split, missing backbone weights.
    Example:
        >>> result = train(open_workspace("data"))            # doctest: +SKIP
        >>> print(result.summary())
    """
    settings = ws.settings.model
    on_progress = on_progress or no_progress
    mode = mode or settings.train_mode
    if mode not in MODES:
        raise ModelError(f"unknown training mode {mode!r}; valid: {', '.join(MODES)}")
    backbone = get_backbone(settings.backbone)
    size = settings.image_size
    started = time.monotonic()

    # 1. The data: labeled rows and their stable, item-grouped split (assigned at ingest), so metrics of
    #    successive versions are measured on the same held-out items.
    rows = labeled_rows(ws)
    if rows.empty:
        raise ModelError("no labeled images with a split in the manifest; run `sortloop ingest FOLDER --labeled`")

    # 2. The resized cache: decode each photo once (draft JPEG, EXIF upright) into a lossless PNG at the
    #    model's size; every epoch, feature pass and gate re-evaluation reads these instead of originals.
    skipped = ensure_resized(ws, rows["image_id"].tolist(), rows["path"].tolist(), size, on_progress=on_progress)
    if skipped:
        rows = rows[[resized_path(ws, i, size).exists() for i in rows["image_id"]]].reset_index(drop=True)
    train_rows = rows[rows["split"] == "train"].reset_index(drop=True)
    valid_rows = rows[rows["split"] == "valid"].reset_index(drop=True)
    classes = sorted(train_rows["label"].astype(str).unique())  # fastai's order; stored, never re-derived
    if len(classes) < 2:
        raise ModelError(f"the train split has {len(classes)} class(es) ({', '.join(classes) or 'none'}); "
                         "label photos of at least 2 categories")
    unlearnable = sorted(set(valid_rows["label"].astype(str)) - set(classes))
    if unlearnable:
        logger.warning("labels only in validation (cannot be learned yet): %s", ", ".join(unlearnable))
    logger.info("training %s on %d images (%d classes), validating on %d", mode, len(train_rows), len(classes),
                len(valid_rows))

    # 3. The network: timm architecture with the offline ImageNet body and a fresh classifier.
    net = create_network(ws, backbone.name, len(classes), pretrained=pretrained, seed=settings.seed)

    # 4. Fit. Both paths leave `net` a complete classifier and return validation probabilities computed
    #    the way the mode's own tooling computes them (in-memory torch head / fastai get_preds).
    if mode == "head":
        details, valid_probs = fit_head(ws, net, backbone, train_rows, valid_rows, classes,
                                        pretrained=pretrained, on_progress=on_progress)
    else:
        from loop.finetune import fit_finetune  # fastai is imported only on this path

        details, valid_probs = fit_finetune(ws, net, backbone, train_rows, valid_rows, classes,
                                            pretrained=pretrained, on_progress=on_progress)

    # 5. Evaluate on the user-photo validation set (and, separately, web images).
    metrics = metrics_by_source(valid_rows, valid_probs, classes)

    # 6. Write the candidate: extras first, `model.json` last (a folder without it is not a version).
    version, out = registry.new_version_dir(ws)
    try:
        for name, m in metrics.items():
            if m["n"]:
                confusion_png(m, out / f"confusion_{name}.png", title=f"{version} {name}")
        predictions_frame(valid_rows, valid_probs, classes).to_parquet(out / "valid_predictions.parquet")
        spec = {
            "version": version,
            "architecture": backbone.name,
            "classes": classes,
            "image_size": size,
            "mean": list(backbone.mean),
            "std": list(backbone.std),
            "drop_rate": backbone.drop_rate,
            "metrics": metrics,
            "train_mode": mode,
            "training": details,
            "pretrained": pretrained,
            "body_weights": weights_tag(ws, backbone.name, pretrained=pretrained, seed=settings.seed),
            "labels_fingerprint": labels_fingerprint(rows),
            "n_train": len(train_rows),
            "n_valid": len(valid_rows),
        }
        save_artifact(net, spec, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    result = TrainResult(version, mode, metrics, out, time.monotonic() - started, skipped)
    logger.info("%s", result.summary())
    return result


def predictions_frame(rows: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Validation predictions kept with the version (for audits and the portable-load check)."""
    best = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    return pd.DataFrame({
        "image_id": rows["image_id"].astype(str).to_numpy(),
        "source": rows["source"].astype(str).to_numpy(),
        "label": rows["label"].astype(str).to_numpy(),
        "pred_label": [classes[i] for i in best],
        "pred_conf": probs.max(axis=1) if len(probs) else np.zeros(0),
        "probs": list(probs.astype(np.float32)),
    })


# --- mode "head": linear head on frozen features ---------------------------------------------------------


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
    return cached_features(net, ids, lambda i: load_resized(ws, i, size), folder=folder, mean=backbone.mean,
                           std=backbone.std, batch_size=settings.batch_size, on_progress=on_progress)


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
