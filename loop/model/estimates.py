"""Out-of-fold estimates of a candidate: accuracy, calibration error and flag curves, before it ships.

The out-of-fold predictions (`loop.model.head.OutOfFold`: every training photo scored by a fold model that never
saw its item) use every training label as a test label once, so these numbers rest on far more photos
than the small gate set. `train` stores them in model.json (`metrics.cv_user`, `calibration`,
`flagging`), where `sort`, `status` and the report read them.
Caveat: fold models train on (k-1)/k of the labels, so out-of-fold accuracy slightly understates the
refit model's.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from loop.data.items import item_keys
from loop.data.label_sources import labeled_after_sorting
from loop.model.calibration import calibrated, expected_calibration_error
from loop.model.evaluate import classification_metrics
from loop.model.head import OutOfFold
from loop.scoring.flagging import describe, estimate, settings_point
from loop.workspace import Workspace

logger = logging.getLogger(__name__)


def class_indices(labels: pd.Series, classes: list[str]) -> np.ndarray:
    """Column index of each label in `classes` (-1 for a label the model has no class for)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(str(v), -1) for v in labels], dtype=int)


def learning_estimates(train_rows: pd.DataFrame, valid_rows: pd.DataFrame, valid_probs: np.ndarray,
                       oof: OutOfFold | None, classes: list[str], temperature: float) -> dict:
    """{"metrics": {"cv_user", "cv_web"}, "calibration": {...}, "flagging": {...}} for model.json.

    `valid_probs` are the shipped (calibrated) model's gate-set probabilities; the uncalibrated ones are
    recovered as softmax(T * log p). Without out-of-fold predictions (finetune mode, < 3 item groups) the
    flag curves come from the gate set instead, and say so.
    """
    valid_labels = class_indices(valid_rows["label"], classes)
    user = (valid_rows["source"] == "user").to_numpy()
    out: dict = {"metrics": {}}
    gate_raw = calibrated(np.log(np.clip(valid_probs, 1e-12, 1.0)) * temperature, 1.0) if len(valid_probs) \
        else valid_probs
    calibration = {"temperature": temperature, "fitted_on": "out-of-fold" if oof is not None else None,
                   "ece_gate_before": expected_calibration_error(gate_raw[user], valid_labels[user]),
                   "ece_gate_after": expected_calibration_error(valid_probs[user], valid_labels[user]),
                   "n_gate": int(user.sum())}
    if oof is not None:
        probs = calibrated(oof.logits, temperature)
        sources = train_rows["source"].astype(str).to_numpy()
        for name, source in (("cv_user", "user"), ("cv_web", "web")):
            mask = sources == source
            out["metrics"][name] = classification_metrics(train_rows.loc[mask, "label"].tolist(), probs[mask], classes)
        calibration.update(ece_oof_before=expected_calibration_error(calibrated(oof.logits, 1.0), oof.labels),
                           ece_oof_after=expected_calibration_error(probs, oof.labels), n_oof=len(oof.labels),
                           folds=oof.folds)
        shop = labeled_after_sorting(train_rows)
        flagging = estimate(probs, oof.labels, item_keys(train_rows), focus=shop)
        on = f"out-of-fold ({oof.folds} item-grouped folds)"
        if "focus" in flagging:
            on += f"; capped by your {flagging['focus']['n']} photos labeled after sorting"
        flagging["estimated_on"] = on
    else:
        flagging = {**estimate(valid_probs, valid_labels, item_keys(valid_rows)),
                    "estimated_on": "gate set"}
    out["calibration"] = calibration
    out["flagging"] = flagging
    return out


def oof_frame(train_rows: pd.DataFrame, oof: OutOfFold, classes: list[str], temperature: float) -> pd.DataFrame:
    """Out-of-fold predictions kept with the version (calibrated probabilities), for audits and benches."""
    probs = calibrated(oof.logits, temperature)
    best = probs.argmax(axis=1)
    return pd.DataFrame({
        "image_id": oof.image_ids,
        "item_id": train_rows["item_id"].astype(str).to_numpy(),
        "source": train_rows["source"].astype(str).to_numpy(),
        "label": train_rows["label"].astype(str).to_numpy(),
        "pred_label": [classes[i] for i in best],
        "pred_conf": probs.max(axis=1),
        "probs": list(probs.astype(np.float32)),
    })


def describe_learning(spec: dict, ws: Workspace) -> str:
    """One line in plain words: out-of-fold accuracy, whether confidence was calibrated, the flags' operating point."""
    parts = []
    cv = (spec.get("metrics") or {}).get("cv_user") or {}
    if cv.get("accuracy") is not None:
        parts.append(f"out-of-fold accuracy {cv['accuracy']:.3f} (n={cv['n']})")
    cal = spec.get("calibration") or {}
    if cal.get("ece_oof_before") is not None:  # the numbers (T, ECE) are in model.json and the report
        better = cal["ece_oof_after"] < cal["ece_oof_before"]
        parts.append("confidence calibrated" + (" (its stated confidence now matches how often it is right more "
                                                "closely)" if better else ""))
    guessed = ((spec.get("training") or {}).get("self_training") or {})
    if guessed.get("trained_on"):
        parts.append(f"also learned from {guessed['trained_on']} of {guessed['sorted_photos']} sorted, unreviewed "
                     f"photos it was sure of (each counts {guessed['weight']:g} of a label)")
    parts.append(describe(settings_point(spec, ws.settings.sort)))
    return "; ".join(parts)
