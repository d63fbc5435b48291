"""Frozen-body features: the pooled output of a pretrained body, cached per image and per body weights.

Why: with a few hundred photos, a linear head on frozen pretrained features beats fine-tuning (measured
0.70-0.73 vs ~0.5 on unseen items) and retrains in seconds once the features exist. Each image gets two
rows: the features of the image and of its horizontal mirror (a free augmentation for the head).
Features are computed from the resized cache (`loop.images.load_model_input` output), so they are exactly
what the deployed network's body computes at sort time.
Caveat: the cache is keyed by image_id (content hash), backbone, input size and a hash of the body
weights; a random-initialised body gets its own key. Delete `<workspace>/cache/features` to free space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loop.atomic import atomic_write
from loop.images import normalise
from loop.progress import ProgressCallback, no_progress

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def features_dir(cache_dir: Path, backbone: str, size: int, tag: str) -> Path:
    return cache_dir / "features" / f"{backbone}-{size}-{tag}"


def body_features(net: torch.nn.Module, batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Pooled pre-classifier features of a timm network, for uint8 (N, H, W, 3) -> float32 (N, F)."""
    import torch

    x = torch.from_numpy(normalise(batch, tuple(mean), tuple(std))).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return net.forward_head(net.forward_features(x), pre_logits=True).float().numpy()


def cached_features(
    net: torch.nn.Module,
    image_ids: Sequence[str],
    load: Callable[[str], np.ndarray],
    *,
    folder: Path,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 32,
    on_progress: ProgressCallback = no_progress,
) -> np.ndarray:
    """Features of each image and of its mirror, computing only those not cached yet.

    Args:
        net: a timm network in eval mode (its body is used; the classifier is ignored).
        image_ids: the images, in the order wanted.
        load: `image_id -> uint8 (H, W, 3)` model input (from the resized cache).
        folder: the cache folder for this backbone/size/weights (see `features_dir`).
    Returns:
        float32 (N, 2, F): [:, 0] the image's features, [:, 1] its horizontal mirror's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in dict.fromkeys(image_ids) if not (folder / f"{i}.npy").exists()]
    total = len(todo)
    on_progress(0, total)
    net.eval()
    for start in range(0, total, batch_size):
        chunk = todo[start : start + batch_size]
        batch = np.stack([load(i) for i in chunk])
        both = np.concatenate([batch, batch[:, :, ::-1, :]])  # mirror along the width axis
        feats = body_features(net, both, mean, std)
        for k, image_id in enumerate(chunk):
            _save_npy(folder / f"{image_id}.npy", np.stack([feats[k], feats[k + len(chunk)]]))
        on_progress(min(start + batch_size, total), total)
    if total:
        logger.info("computed features of %d images into %s", total, folder)
    return np.stack([np.load(folder / f"{i}.npy") for i in image_ids]) if len(image_ids) else np.zeros((0, 2, 0))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, durable=False) as fh:  # a cache: recomputed if lost
        np.save(fh, array.astype(np.float32))
