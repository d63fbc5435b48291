"""Backbone embeddings of any manifest photo, labeled or not, from the same caches training uses.

Selection and the audit need features of photos the model never trained on (sorted, unlabeled ones).
This reads the resized cache and the features cache keyed by backbone, size and body weights
(`loop.model.features`), exactly the files `loop.model.head` reads, and computes only what is missing.
Caveat: the first call on thousands of never-featurised photos runs the backbone on each (about 30 s
per 500 photos on 2 cores); later calls read the cache in a fraction of a second.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from loop.data.resized import ensure_resized, has_resized, load_resized
from loop.model.backbones import create_network, get_backbone, weights_tag
from loop.model.features import cached_features, features_dir
from loop.progress import ProgressCallback, no_progress
from loop.workspace import Workspace

logger = logging.getLogger(__name__)


def embeddings(ws: Workspace, rows: pd.DataFrame, *, on_progress: ProgressCallback | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, F) image + mirror features of `rows` (manifest rows), and an (N,) mask of the usable ones.

    Photos whose original is gone (and not cached) or unreadable are masked out (their rows are zeros),
    never a reason to fail the whole call.

    Raises:
        ModelError: unknown backbone or missing weights (`model.backbone`).
    """
    on_progress = on_progress or no_progress
    settings = ws.settings.model
    backbone = get_backbone(settings.backbone)
    size = settings.image_size
    ids = rows["image_id"].astype(str).tolist()
    ensure_resized(ws, ids, rows["path"].astype(str).tolist(), size, on_progress=on_progress)
    ok = has_resized(ws, ids, size)
    usable = [i for i, good in zip(ids, ok, strict=True) if good]
    folder = features_dir(ws.cache_dir, backbone.name, size, weights_tag(ws, backbone.name, seed=settings.seed))
    missing = [i for i in usable if not (folder / f"{i}.npy").exists()]
    if not usable:
        return np.zeros((len(ids), 2, 0), np.float32), ok
    if missing:  # only then is the network worth loading
        net = create_network(ws, backbone.name, 2, seed=settings.seed)
        feats = cached_features(net, usable, lambda i: load_resized(ws, i, size), folder=folder,
                                mean=backbone.mean, std=backbone.std, batch_size=settings.batch_size,
                                on_progress=on_progress)
    else:
        feats = np.stack([np.load(folder / f"{i}.npy") for i in usable])
    out = np.zeros((len(ids), *feats.shape[1:]), np.float32)
    out[ok] = feats
    return out, ok
