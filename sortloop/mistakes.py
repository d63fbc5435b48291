"""The model's worst mistakes: its most confident wrong predictions on validation photos, as a thumbnail grid.

Like fastai's `plot_top_losses`, but read from what `train` stored (`valid_predictions.parquet` in the
version folder: true label, guess, confidence per validation photo), so `report` needs no model runtime.
A confident mistake is the most useful thing to look at: a wrong label in the data, a class that needs
more examples, or two classes a person would also confuse.
Caveat: the predictions are those of the version when it was trained, on the photos labeled then; a label
corrected since is shown with its label *now* (and such a photo is then no longer a mistake).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from loop.workspace import Workspace

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "valid_predictions.parquet"
THUMB_PX = 160


def worst_mistakes(ws: Workspace, version: str, k: int = 12) -> pd.DataFrame:
    """The `k` most confident wrong predictions of `version` on its validation photos, most confident first.

    Returns:
        Columns image_id, path, source, label (true, as labeled now), pred_label, pred_conf; empty if the
        version stored no predictions or made no mistake.
    """
    from loop.data import manifest

    path = ws.models_dir / version / PREDICTIONS_FILE
    columns = ["image_id", "path", "source", "label", "pred_label", "pred_conf"]
    if not path.exists():
        return pd.DataFrame(columns=columns)
    preds = pd.read_parquet(path, columns=["image_id", "source", "label", "pred_label", "pred_conf"])
    now = manifest.load(ws).set_index("image_id")
    preds["label"] = preds["image_id"].map(now["label"]).fillna(preds["label"])  # corrected since: label now
    preds["path"] = preds["image_id"].map(now["path"])
    wrong = preds[preds["label"].astype(str) != preds["pred_label"].astype(str)]
    wrong = wrong.sort_values(["pred_conf", "image_id"], ascending=[False, True]).head(k)
    return wrong[columns].reset_index(drop=True)


def plot_mistakes(rows: pd.DataFrame, version: str | None, out: Path, *, columns: int = 4) -> None:
    """A grid of thumbnails, each titled with the guess, its probability and the true label."""
    from matplotlib.figure import Figure

    from loop.data.images import open_image

    if rows.empty:
        fig = Figure(figsize=(7, 2.2), dpi=110, layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        text = "no deployed model" if version is None else f"{version} made no mistake on its validation photos"
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="0.4")
        fig.savefig(out)
        return
    n_rows = -(-len(rows) // columns)
    fig = Figure(figsize=(2.3 * columns, 2.6 * n_rows), dpi=110, layout="constrained")
    axes = fig.subplots(n_rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows.itertuples(), strict=False):
        ax.imshow(_thumbnail(open_image, row.path))
        ax.set_title(f"guess {row.pred_label} ({row.pred_conf:.2f})\ntrue {row.label}", fontsize=8,
                     color="tab:red")
    fig.suptitle(f"Most confident mistakes of {version} on validation photos", fontsize=10)
    fig.savefig(out)


def _thumbnail(open_image: Any, path: object) -> Any:
    """The photo as a small RGB image, or a grey square if it can no longer be read."""
    from PIL import Image

    try:
        img = open_image(Path(str(path)), draft_size=THUMB_PX)
        img.thumbnail((THUMB_PX, THUMB_PX))
        return img
    except Exception as exc:  # noqa: BLE001  (a moved or deleted photo must not break the report)
        logger.info("no thumbnail for %s: %s", path, exc)
        return Image.new("RGB", (THUMB_PX, THUMB_PX), (200, 200, 200))
