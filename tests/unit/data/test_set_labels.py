"""Taking a label back (a review deleted in Label Studio) is a label change like any other: one history
line, a no-op when replayed, and settled like any label write interrupted after the manifest commit."""

from __future__ import annotations

import pandas as pd
import pytest

from loop.data import manifest
from loop.data.images import file_sha256
from loop.data.ingest import ImageInfo, register_images
from tests.conftest import make_image


def test_a_label_taken_back_is_logged_once_and_survives_an_interrupted_write(ws, tmp_path, monkeypatch) -> None:
    photo = make_image(tmp_path / "p" / "a.jpg", (200, 10, 10))
    image_id = file_sha256(photo)
    register_images(ws, [ImageInfo(image_id, str(photo))])
    assert manifest.set_labels(ws, [manifest.LabelChange(image_id, "sofa", "review", "r@x")]) == 1

    back = manifest.LabelChange(image_id, None, None, "labelstudio-delete", note="annotation 3 deleted")
    with monkeypatch.context() as m:  # killed after the manifest was replaced, before the history append
        m.setattr(manifest, "append_jsonl", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            manifest.set_labels(ws, [back])
    row = manifest.load(ws).set_index("image_id").loc[image_id]
    assert pd.isna(row["label"]) and pd.isna(row["label_source"]) and row["label_by"] == "labelstudio-delete"

    hist = manifest.history(ws)  # the interrupted write is settled: the committed change is in the history
    assert list(hist["new_label"].fillna("-")) == ["sofa", "-"] and hist.iloc[-1]["by"] == "labelstudio-delete"
    assert manifest.set_labels(ws, [back]) == 0 and len(manifest.history(ws)) == 2  # replay: no-op
