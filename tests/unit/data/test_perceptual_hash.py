"""`perceptual_hash` is imagehash's pHash without scipy: the same 64 bits, or old manifests' item groups break."""

from __future__ import annotations

import random
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from loop.data.images import open_image, perceptual_hash


def sample(folder: Path, n: int, seed: int = 0) -> list[Path]:
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(seed).shuffle(photos)
    return photos[:n]


@pytest.mark.parametrize("dataset", ["ikea_products", "eth80", "rooms"])
def test_the_hash_of_real_photos_is_imagehashs_phash(shared_data: Path, dataset: str) -> None:
    photos = sample(shared_data / dataset, 120)
    assert len(photos) == 120
    for path in photos:
        img = open_image(path, draft_size=224)  # what the sort's decode workers hash
        assert perceptual_hash(img) == str(imagehash.phash(img)), path


def test_flat_and_striped_images_hash_as_imagehash_does() -> None:
    """Their DCTs are exact zeros in an FFT: a matrix product's +-1e-13 must not pick the bits."""
    rng = np.random.default_rng(0)
    images = [np.full((64, 48, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(20)]
    images += [np.tile(rng.integers(0, 256, (1, 90, 3)).astype(np.uint8), (40, 1, 1)) for _ in range(20)]
    images += [np.tile(rng.integers(0, 256, (70, 1, 3)).astype(np.uint8), (1, 30, 1)) for _ in range(20)]
    images += [rng.integers(0, 256, (50, 80, 3)).astype(np.uint8) for _ in range(20)]
    for arr in images:
        img = Image.fromarray(arr)
        assert perceptual_hash(img) == str(imagehash.phash(img))
    assert perceptual_hash(Image.fromarray(images[0])) == "8000000000000000"  # only the mean is above the median
