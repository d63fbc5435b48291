"""Evaluation: accuracy, per-class precision/recall and a confusion matrix, per image source.

Metrics that decide anything are computed on the **user-photo validation set** (`user_valid`): real
photos of items the model never saw. Web images are reported separately (`web_valid`) and never mixed in.
Caveat: a validation label the model has no class for counts as an error (its recall is 0), so adding
a class never makes an old model look better than it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from loop.progress import ProgressCallback, no_progress
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

SETS = {"user_valid": "user", "web_valid": "web"}


def classification_metrics(labels: Sequence[str], probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Metrics of (N, K) `probs` (columns in `classes` order) against true `labels` (N,).

    Returns:
        {"n", "accuracy" (None if n == 0), "per_class": {label: {precision (None if never predicted),
         recall (None if no photo), support}},
         "confusion": {"labels": [...], "matrix": rows = true label, columns = predicted}}.
        Labels outside `classes` appear in the confusion rows with recall 0.
    """
    labels = [str(v) for v in labels]
    classes = [str(c) for c in classes]
    n = len(labels)
    predicted = [classes[i] for i in np.asarray(probs).argmax(axis=1)] if n else []
    names = classes + sorted(set(labels) - set(classes))
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    for true, pred in zip(labels, predicted, strict=True):
        matrix[index[true], index[pred]] += 1
    per_class = {}
    for name, i in index.items():
        support = int(matrix[i].sum())
        called = int(matrix[:, i].sum())
        per_class[name] = {
            "precision": float(matrix[i, i] / called) if called else None,  # never predicted: undefined
            "recall": float(matrix[i, i] / support) if support else None,
            "support": support,
        }
    return {
        "n": n,
        "accuracy": float(np.trace(matrix) / n) if n else None,
        "per_class": per_class,
        "confusion": {"labels": names, "matrix": matrix.tolist()},
    }


def metrics_by_source(rows: pd.DataFrame, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """`{"user_valid": ..., "web_valid": ...}` for validation `rows` (columns label, source) and their probs."""
    out = {}
    for name, source in SETS.items():
        mask = (rows["source"] == source).to_numpy()
        out[name] = classification_metrics(rows.loc[mask, "label"].tolist(), probs[mask], classes)
    return out


def evaluate_predictor(
    ws: Workspace, predictor, rows: pd.DataFrame, *, batch_size: int = 32, on_progress: ProgressCallback = no_progress
) -> tuple[dict, np.ndarray]:
    """Run an artifact Predictor over validation `rows` (from the resized cache) and score it.

    Args:
        predictor: a `loop.model.artifact.Predictor`.
        rows: manifest rows with image_id, path, label, source (their resized cache is made if missing).
    Returns:
        (metrics by source, probs (N, K) in `predictor.classes` order).
    """
    from loop.data.resized import ensure_resized, load_resized

    size = predictor.image_size
    failed = ensure_resized(ws, rows["image_id"].tolist(), rows["path"].tolist(), size)
    if failed:
        bad = {path for path, _ in failed}
        rows = rows[~rows["path"].isin(bad)]
    ids = rows["image_id"].tolist()
    probs = np.zeros((len(ids), len(predictor.classes)), np.float32)
    on_progress(0, len(ids))
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        probs[start : start + len(chunk)] = predictor.predict(np.stack([load_resized(ws, i, size) for i in chunk]))
        on_progress(start + len(chunk), len(ids))
    return metrics_by_source(rows.reset_index(drop=True), probs, predictor.classes), probs


def confusion_png(metrics: dict, path: Path, *, title: str = "") -> Path:
    """Draw a confusion matrix (rows true, columns predicted) to a PNG; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metrics["confusion"]["labels"]
    matrix = np.asarray(metrics["confusion"]["matrix"])
    side = max(4.0, 0.55 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    accuracy = metrics.get("accuracy")
    ax.set_title(f"{title}  accuracy {accuracy:.3f}  n={metrics['n']}" if accuracy is not None else title)
    top = matrix.max() if matrix.size else 0
    for i in range(len(names)):
        for j in range(len(names)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                        color="white" if matrix[i, j] > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_line(metrics: dict) -> str:
    """One line: user-valid accuracy (and web-valid, when there are web images) with their sizes."""
    parts = []
    for name in SETS:
        m = metrics.get(name) or {}
        acc = m.get("accuracy")
        if acc is not None:
            parts.append(f"{name} accuracy {acc:.3f} (n={m['n']})")
        elif name == "user_valid":
            parts.append(f"{name}: no gate-set photos yet")  # web images are optional: unmentioned when absent
    return ", ".join(parts)
