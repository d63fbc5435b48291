"""Frozen-body features: the pooled output of a pretrained body, cached per image and per body weights.

Why: with a few hundred photos, a linear head on frozen pretrained features beats fine-tuning (measured
0.70-0.73 vs ~0.5 on unseen items) and retrains in seconds once the features exist. Each image gets two
rows: the features of the image and of its horizontal mirror (a free augmentation for the head).
Features are computed from the resized cache (`loop.data.images.load_model_input` output), so they are exactly
what the deployed network's body computes at sort time.
Missing features are computed here, or on a Ray cluster when the caller passes `remote` (`train --ray`,
see `loop.model.ray_features.ray_features`); either way this module writes the cache. Here, many images
go through ONNX Runtime (the body exported once per call, as `sortloop sort` runs it: ~4x torch's speed on
2 CPUs, the nightly's largest phase), a few through torch; both give the same features to ~1e-5.
Caveat: the cache is keyed by image_id (content hash), backbone, input size and a hash of the body
weights; a random-initialised body gets its own key. Delete `<workspace>/cache/features` to free space.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loop.atomic import atomic_write
from loop.data.images import normalise
from loop.errors import ModelError
from loop.model.artifact import FEATURES_OUTPUT, export_onnx
from loop.progress import ProgressCallback, no_progress

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ONNX_MIN_IMAGES = 64  # fewer: torch (exporting the body, ~3 s, costs more than ONNX Runtime's faster pass saves)


def features_dir(cache_dir: Path, backbone: str, size: int, tag: str) -> Path:
    return cache_dir / "features" / f"{backbone}-{size}-{tag}"


def body_features(net: torch.nn.Module, batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Pooled pre-classifier features of a timm network, for uint8 (N, H, W, 3) -> float32 (N, F)."""
    import torch

    x = torch.from_numpy(normalise(batch, tuple(mean), tuple(std))).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return net.forward_head(net.forward_features(x), pre_logits=True).float().numpy()


def mirrored(batch: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (2N, H, W, 3): the images, then their horizontal mirrors (width axis)."""
    return np.concatenate([batch, batch[:, :, ::-1, :]])


RemoteFeatures = Callable[[list[str]], Iterator[tuple[list[str], np.ndarray]]]


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
    remote: RemoteFeatures | None = None,
) -> np.ndarray:
    """Features of each image and of its mirror, computing only those not cached yet.

    Args:
        net: a timm network in eval mode (its body is used; the classifier is ignored).
        image_ids: the images, in the order wanted.
        load: `image_id -> uint8 (H, W, 3)` model input (from the resized cache).
        folder: the cache folder for this backbone/size/weights (see `features_dir`).
        remote: computes the missing ones elsewhere: `image_ids -> (image_ids, (n, 2, F))` batches in any
            order (e.g. `loop.model.ray_features.ray_features`); default: here, with `net`.
    Returns:
        float32 (N, 2, F): [:, 0] the image's features, [:, 1] its horizontal mirror's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in dict.fromkeys(image_ids) if not (folder / f"{i}.npy").exists()]
    total = len(todo)
    on_progress(0, total)
    net.eval()
    batches = remote(todo) if remote is not None and todo else _computed(net, todo, load, mean, std, batch_size,
                                                                        folder)
    done = 0
    for ids, feats in batches:
        for image_id, pair in zip(ids, feats, strict=True):
            _save_npy(folder / f"{image_id}.npy", pair)
        done += len(ids)
        on_progress(done, total)
    if total:
        logger.info("computed features of %d images into %s", total, folder)
    return np.stack([np.load(folder / f"{i}.npy") for i in image_ids]) if len(image_ids) else np.zeros((0, 2, 0))


def _computed(net: torch.nn.Module, image_ids: list[str], load: Callable[[str], np.ndarray], mean: Sequence[float],
              std: Sequence[float], batch_size: int, folder: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(image_ids, (n, 2, F)) batches computed here, in order."""
    onnx = None
    for start in range(0, len(image_ids), batch_size):
        chunk = image_ids[start : start + batch_size]
        pixels = np.stack([load(i) for i in chunk])
        if start == 0 and len(image_ids) >= ONNX_MIN_IMAGES:
            onnx = _onnx_body(net, pixels.shape[1], mean, std, folder)
        feats = onnx(mirrored(pixels)) if onnx is not None else body_features(net, mirrored(pixels), mean, std)
        yield chunk, np.stack([feats[: len(chunk)], feats[len(chunk) :]], axis=1)


def _onnx_body(net: torch.nn.Module, size: int, mean: Sequence[float], std: Sequence[float],
               folder: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    """`body_features` through ONNX Runtime: a copy of `net` exported as the artifact's graph is (in a temporary
    folder inside the cache `folder`: nothing is written outside the workspace); None (torch is used) if the
    network does not export."""
    import onnxruntime as ort

    try:
        with tempfile.TemporaryDirectory(prefix=".body-", dir=folder) as tmp:
            path = Path(tmp) / "body.onnx"
            export_onnx(copy.deepcopy(net), size, path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (ModelError, RuntimeError, ValueError, OSError) as exc:  # torch.onnx raises assorted types
        logger.warning("features computed with torch: the body does not export to ONNX (%s)", str(exc)[:200])
        return None
    return lambda batch: session.run([FEATURES_OUTPUT], {"input": normalise(batch, tuple(mean), tuple(std))})[0]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, durable=False) as fh:  # a cache: recomputed if lost
        np.save(fh, array.astype(np.float32))
