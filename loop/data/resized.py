"""The resized-image cache: each image's model input, decoded once and stored losslessly as PNG.

Why: decoding a 12 MP JPEG costs 50-200 ms, far more than the model needs; every epoch, every feature
pass and every re-evaluation by the promotion gate reads these small PNGs instead (see `bench/train.py`).
The pixels are exactly `loop.data.images.load_model_input(path, size)` (PNG is lossless), so training,
evaluation and sorting see identical inputs.
Caveat: keyed by image_id (content hash) and size; an original that has vanished since ingest is still
usable if its cache entry exists, and is reported as skipped otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from loop.atomic import atomic_write
from loop.data.images import load_model_input
from loop.errors import ImageError
from loop.progress import ProgressCallback, no_progress
from loop.workspace import Workspace, make_private

logger = logging.getLogger(__name__)


def resized_path(ws: Workspace, image_id: str, size: int) -> Path:
    return ws.cache_dir / "resized" / str(size) / image_id[:2] / f"{image_id}.png"


def has_resized(ws: Workspace, image_ids: Sequence[str], size: int) -> np.ndarray:
    """(N,) bool: which images have a cached model input (after `ensure_resized`, the ones that did not fail)."""
    return np.array([resized_path(ws, i, size).exists() for i in image_ids], dtype=bool)


def ensure_resized(
    ws: Workspace,
    image_ids: Sequence[str],
    paths: Sequence[str],
    size: int,
    *,
    threads: int = 2,
    on_progress: ProgressCallback = no_progress,
) -> list[tuple[str, str]]:
    """Make sure every image has a cached model input; returns [(path, reason)] for those that failed."""
    todo = [(i, p) for i, p in zip(image_ids, paths, strict=True) if not resized_path(ws, i, size).exists()]
    if todo:
        make_private(ws.cache_dir)  # resized copies of owner-only photos must stay owner-only
    failed: list[tuple[str, str]] = []
    on_progress(0, len(todo))

    def one(pair: tuple[str, str]) -> tuple[str, str] | None:
        image_id, path = pair
        try:
            array = load_model_input(Path(path), size)
        except ImageError as exc:
            return (str(path), exc.reason)
        except FileNotFoundError:
            return (str(path), "file not found")
        _save_png(resized_path(ws, image_id, size), array)
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, result in enumerate(pool.map(one, todo), start=1):
            if result is not None:
                failed.append(result)
            on_progress(done, len(todo))
    for path, reason in failed:
        logger.warning("skipped %s: %s", path, reason)
    return failed


def load_resized(ws: Workspace, image_id: str, size: int) -> np.ndarray:
    """The cached model input of one image: uint8 (size, size, 3)."""
    return read_resized(resized_path(ws, image_id, size))


def read_resized(path: Path) -> np.ndarray:
    """One resized-cache file as uint8 (size, size, 3) (also read by Ray workers, given the path)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, durable=False) as fh:  # a cache: recomputed if lost
        Image.fromarray(array).save(fh, "PNG", compress_level=1)
