"""A workspace whose photos have synthetic embeddings: selection and audit logic without a backbone."""

from __future__ import annotations

import numpy as np
import pandas as pd

from loop.data.ingest import ImageInfo, register_images


def synthetic_workspace(ws, monkeypatch, *, labels: list[str | None], items: list[str] | None = None,
                        centres: dict[str, np.ndarray], true: list[str], seed: int = 0) -> list[str]:
    """Register one fake photo per entry (label may be None = unlabeled); embeddings come from `true`'s
    centre plus noise. Returns the image ids in order."""
    import loop.review.audit
    import loop.review.queue

    rng = np.random.default_rng(seed)
    ids = [f"{i:064x}" for i in range(len(labels))]
    infos = [ImageInfo(i, f"/photos/{n}.jpg", label=lab, item_id=(items[n] if items else f"item{n}"))
             for n, (i, lab) in enumerate(zip(ids, labels, strict=True))]
    register_images(ws, infos)
    dims = len(next(iter(centres.values())))
    table = {i: centres[t] + rng.normal(scale=0.3, size=dims) for i, t in zip(ids, true, strict=True)}

    def fake_embeddings(_ws, rows: pd.DataFrame, *, on_progress=None):
        feats = np.stack([table[i] for i in rows["image_id"]])
        return np.stack([feats, feats], axis=1).astype(np.float32), np.ones(len(rows), bool)

    monkeypatch.setattr(loop.review.queue, "embeddings", fake_embeddings)
    monkeypatch.setattr(loop.review.audit, "embeddings", fake_embeddings)
    return ids


def centres_for(classes: list[str], dims: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.normal(scale=4.0, size=dims) for c in classes}
