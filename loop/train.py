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
from loop.backbones import create_network, get_backbone, weights_tag
from loop.classnames import class_name_problem
from loop.errors import ModelError
from loop.evaluate import confusion_png, metrics_by_source, summary_line
from loop.head import fit_head
from loop.progress import ProgressCallback, no_progress
from loop.resized import ensure_resized, load_resized, resized_path
from loop.workspace import Workspace

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

MODES = ("head", "finetune")


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
    for name in classes:  # a manifest written before names were checked where they enter
        problem = class_name_problem(name)
        if problem is not None:
            raise ModelError(f"label {name!r} cannot be a class ({problem}); relabel those photos "
                             "(e.g. in Label Studio) before training")
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

    # 7. A faster INT8 copy for sorting: calibrated on training photos, used only if it agrees with the
    #    float model on the validation photos (its verdict lands in model.json; `status` shows it).
    if settings.int8:
        write_int8(ws, out, train_rows, valid_rows)
    result = TrainResult(version, mode, metrics, out, time.monotonic() - started, skipped)
    logger.info("%s", result.summary())
    return result


def write_int8(ws: Workspace, model_dir: Path, train_rows: pd.DataFrame, valid_rows: pd.DataFrame) -> None:
    """`loop.quantize.quantize_artifact` on resized photos; a failure keeps the float model and is recorded."""
    from loop.quantize import CALIBRATION_PHOTOS, quantize_artifact, record_failure

    size = ws.settings.model.image_size
    calibration_ids = train_rows["image_id"].sample(frac=1.0, random_state=ws.settings.model.seed)
    calibration_ids = calibration_ids.head(CALIBRATION_PHOTOS)

    def load(ids: pd.Series) -> np.ndarray:
        return np.stack([load_resized(ws, i, size) for i in ids] or [np.zeros((size, size, 3), np.uint8)])[:len(ids)]

    try:
        quantize_artifact(model_dir, load(calibration_ids), load(valid_rows["image_id"]))
    except Exception as exc:  # onnxruntime's quantiser raises assorted types; float sorting is unaffected
        logger.warning("INT8 export failed, sorting stays in float: %s", exc)
        record_failure(model_dir, f"INT8 export failed ({type(exc).__name__}: {str(exc)[:200]})")


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
