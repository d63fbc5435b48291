"""The report's worst-mistakes grid, recall bars that show each class's photo count, legends beside the bars."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from loop.data import manifest
from loop.model.artifact import read_spec
from sortloop.mistakes import PREDICTIONS_FILE, worst_mistakes
from sortloop.report import PLOTS, _versions, label_rounds, plot_labels, plot_recall, write_report
from tests.helpers.serving import build


def _predictions(ws) -> list[str]:
    """v0002's stored validation predictions: two confident mistakes, one right, one since corrected."""
    df = manifest.load(ws)
    ids = df["image_id"].tolist()
    label = df.set_index("image_id")["label"]
    other = {"chair": "table", "table": "sofa", "sofa": "chair"}
    rows = [(ids[3], other[label[ids[3]]], 0.61), (ids[4], other[label[ids[4]]], 0.93),
            (ids[5], label[ids[5]], 0.99), (ids[0], "chair", 0.97)]  # ids[0] was relabeled sofa by review
    pd.DataFrame({"image_id": [r[0] for r in rows], "source": "user", "label": ["chair"] * 4,
                  "pred_label": [r[1] for r in rows], "pred_conf": [r[2] for r in rows]}
                 ).assign(label=lambda f: f["image_id"].map(label).where(f["image_id"] != ids[0], "chair")
                          ).to_parquet(ws.models_dir / "v0002" / PREDICTIONS_FILE)
    return ids


def test_worst_mistakes_are_the_most_confident_wrong_guesses_with_labels_as_now(ws, tmp_path):
    build(ws, tmp_path)
    ids = _predictions(ws)
    worst = worst_mistakes(ws, "v0002")
    # ids[0]: guessed chair, stored true label chair, but a reviewer relabeled it sofa since: a mistake now
    assert list(worst["image_id"]) == [ids[0], ids[4], ids[3]]
    assert list(worst["pred_conf"]) == [0.97, 0.93, 0.61]
    assert worst.loc[0, "label"] == "sofa" and worst["path"].notna().all()
    assert worst_mistakes(ws, "v0001").empty  # no stored predictions: nothing to show


def test_report_shows_the_mistakes_grid(ws, tmp_path):
    build(ws, tmp_path)
    _predictions(ws)
    text = write_report(ws).read_text()
    assert f'src="{PLOTS["mistakes"]}"' in text and "Most confident wrong predictions" in text
    with Image.open(ws.report_dir / PLOTS["mistakes"]) as img:
        assert img.width > 600 and img.height > 250  # a row of thumbnails, not the "no mistake" note


def test_recall_bars_show_photo_counts_and_legends_cover_no_bar(ws, tmp_path):
    build(ws, tmp_path)
    spec = read_spec(ws.models_dir / "v0002")
    fig = plot_recall(spec, tmp_path / "recall.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["chair (2)", "table (2)", "sofa (2)"]
    assert all(" of 2 photos" in t.get_text() for t in ax.texts)

    fig = plot_labels(label_rounds(manifest.history(ws), _versions(ws)), tmp_path / "labels.png")
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())
