"""A small workspace with a known history, shared by the status and report tests.

Timeline (T0 = ingest): 12 labeled user photos ingested at T0 (label source "folder"); v0001 trained at
T0+1h; 2 reviews at T0+2h; v0002 trained at T0+3h and deployed; 1 user move at T0+4h; v0003 trained at
T0+5h and refused by the gate (a candidate); 1 more review at T0+6h. Flags: 3 low_confidence (1 queued,
2 pushed), 1 user_moved (reviewed). Model metrics are written into model.json as `train` does; status and
report only read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from loop.data import manifest
from loop.data.ingest import ingest_folder
from loop.data.manifest import LabelChange, set_labels
from loop.learning import registry
from loop.workspace import Workspace
from tests.conftest import make_image

CLASSES = ["chair", "table", "sofa"]


@dataclass
class Built:
    t0: pd.Timestamp
    accuracy: dict[str, float]  # version -> user-valid accuracy
    recall: dict[str, float]  # class -> recall of the deployed version


def user_valid_metrics(accuracy: float, recall: dict[str, float], n: int = 6) -> dict:
    per_class = {c: {"precision": round(r * 0.9, 3), "recall": r, "support": 2} for c, r in recall.items()}
    matrix = [[2, 0, 0], [1, 1, 0], [0, 0, 2]]
    return {"n": n, "accuracy": accuracy, "per_class": per_class, "confusion": {"labels": CLASSES, "matrix": matrix}}


def write_version(ws: Workspace, version: str, created_at: pd.Timestamp, accuracy: float, recall: dict[str, float]):
    folder = ws.models_dir / version
    folder.mkdir(parents=True)
    spec = {
        "version": version, "architecture": "tf_efficientnet_lite0", "classes": CLASSES, "image_size": 224,
        "mean": [0.5] * 3, "std": [0.5] * 3, "train_mode": "head", "labels_fingerprint": f"fp-{version}",
        "created_at": created_at.isoformat(),
        "metrics": {"user_valid": user_valid_metrics(accuracy, recall), "web_valid": {"n": 0, "accuracy": None}},
        "flagging": synthetic_flagging(accuracy),
        "calibration": {"temperature": 1.5, "ece_oof_before": 0.2, "ece_oof_after": 0.05},
    }
    (folder / "model.json").write_text(json.dumps(spec))


def synthetic_flagging(accuracy: float, n: int = 200) -> dict:
    """Catch curves as `train` stores them, from out-of-fold-like predictions right `accuracy` of the time."""
    from loop.scoring.flagging import estimate

    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), n)
    right = rng.random(n) < accuracy
    guess = np.where(right, labels, (labels + 1) % len(CLASSES))
    conf = np.where(right, rng.uniform(0.5, 1.0, n), rng.uniform(0.34, 0.9, n))
    probs = np.full((n, len(CLASSES)), 0.0)
    probs[np.arange(n), guess] = conf
    probs[np.arange(n), (guess + 2) % len(CLASSES)] = 1 - conf
    return estimate(probs, labels)


def build(ws: Workspace, tmp_path: Path) -> Built:
    photos = tmp_path / "photos"
    for i in range(12):
        cls = CLASSES[i % 3]
        make_image(photos / cls / f"{i}.jpg", (20 * i, 255 - 20 * i, (97 * i) % 256))
    ingest_folder(ws, photos, source="user", labeled=True)
    # a gate set big enough to show: two of each class's four photos (the default 20% would take none)
    manifest.update(ws, lambda d: d.assign(split=np.where(d.groupby("label").cumcount() < 2, "valid", "train")))
    t0 = manifest.history(ws)["at"].max()
    accuracy = {"v0001": 0.5, "v0002": 0.8125, "v0003": 0.75}
    recall = {"chair": 1.0, "table": 0.5, "sofa": 0.875}
    write_version(ws, "v0001", t0 + timedelta(hours=1), accuracy["v0001"], {"chair": 0.5, "table": 0.5, "sofa": 0.5})
    df = manifest.load(ws)
    ids = df["image_id"].tolist()
    set_labels(ws, [LabelChange(ids[0], "sofa", "review", "ann@example.com", at=t0 + timedelta(hours=2)),
                    LabelChange(ids[1], "chair", "review", "ann@example.com", at=t0 + timedelta(hours=2))])
    write_version(ws, "v0002", t0 + timedelta(hours=3), accuracy["v0002"], recall)
    registry.set_current(ws, "v0002")
    registry.append_log(ws, {"event": "promoted", "version": "v0002", "reasons": []})
    set_labels(ws, [LabelChange(ids[2], "table", "user_move", "scan", at=t0 + timedelta(hours=4))])
    write_version(ws, "v0003", t0 + timedelta(hours=5), accuracy["v0003"], recall)
    registry.append_log(ws, {"event": "refused", "version": "v0003", "reasons": ["accuracy 0.750 <= 0.812"]})
    set_labels(ws, [LabelChange(ids[7], "chair", "review", "bob@example.com", at=t0 + timedelta(hours=6))])

    def flag(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame.loc[frame.index[3:6], "flag"] = "low_confidence"
        frame.loc[frame.index[3], "review_status"] = "queued"
        frame.loc[frame.index[4:6], "review_status"] = "pushed"
        frame.loc[frame.index[4:6], "review_task"] = [11, 12]  # pushed: Label Studio gave them tasks
        frame.loc[frame.index[6], "flag"] = "user_moved"
        frame.loc[frame.index[6], "review_status"] = "reviewed"
        return frame

    manifest.update(ws, flag)
    return Built(t0=t0, accuracy=accuracy, recall=recall)
