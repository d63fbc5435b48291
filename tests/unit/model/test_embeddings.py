"""`loop.model.embeddings`: backbone features of manifest photos, computed once and then read from the cache."""

from __future__ import annotations

import shutil

import numpy as np


def test_embeddings_cached_and_missing_photos_masked(ws, shared_data, tmp_path, monkeypatch):
    import loop.model.embeddings
    from loop.data.ingest import ingest_folder
    from loop.data.manifest import load
    from loop.model.embeddings import embeddings

    src = tmp_path / "photos"
    for cls in ("chair", "sofa"):
        (src / cls).mkdir(parents=True)
        for path in sorted((shared_data / "ikea_products" / cls).glob("*.jpg"))[:2]:
            shutil.copy(path, src / cls / path.name)
    ingest_folder(ws, src, labeled=True)
    rows = load(ws)
    gone = rows["path"].iloc[0]
    (tmp_path / "photos" / gone.split("/photos/")[1]).unlink()  # vanished before its first use

    feats, ok = embeddings(ws, rows)
    assert ok.tolist() == [False, True, True, True]
    assert feats.shape == (4, 2, 1280) and not feats[0].any() and np.abs(feats[1:]).sum() > 0

    def no_network(*args, **kwargs):
        raise AssertionError("the backbone was loaded although every feature is cached")

    monkeypatch.setattr(loop.model.embeddings, "create_network", no_network)
    again, ok2 = embeddings(ws, rows)
    np.testing.assert_array_equal(again, feats)
    assert ok2.tolist() == ok.tolist()
