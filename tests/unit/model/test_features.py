"""Body features: many images go through ONNX Runtime, a few through torch, and both give the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from loop.model import features as feats_mod
from loop.model.features import ONNX_MIN_IMAGES, body_features, cached_features

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SIZE = 64


@pytest.fixture(scope="module")
def net():
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).eval()


def _images(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"img{i}": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(n)}


def test_many_images_go_through_onnx_runtime_with_torchs_features(net, tmp_path, monkeypatch):
    images = _images(ONNX_MIN_IMAGES)
    exported = []
    real = feats_mod._onnx_body
    monkeypatch.setattr(feats_mod, "_onnx_body", lambda *a: exported.append(1) or real(*a))
    got = cached_features(net, list(images), images.__getitem__, folder=tmp_path, mean=MEAN, std=STD)
    assert exported == [1]  # the body was exported once for the call, not per batch
    batch = np.stack(list(images.values()))
    want = body_features(net, batch, MEAN, STD)
    mirror = body_features(net, batch[:, :, ::-1, :].copy(), MEAN, STD)
    assert got.shape == (len(images), 2, want.shape[1])
    np.testing.assert_allclose(got[:, 0], want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[:, 1], mirror, atol=1e-4, rtol=1e-4)


def test_a_few_images_or_a_body_that_does_not_export_use_torch(net, tmp_path, monkeypatch):
    few = _images(3)
    monkeypatch.setattr(feats_mod, "_onnx_body", lambda *a: pytest.fail("exported for 3 images"))
    cached_features(net, list(few), few.__getitem__, folder=tmp_path / "few", mean=MEAN, std=STD)

    def no_export(*_args):
        raise RuntimeError("unsupported operator")

    monkeypatch.undo()
    monkeypatch.setattr(feats_mod, "export_onnx", no_export)
    many = _images(ONNX_MIN_IMAGES)
    got = cached_features(net, list(many), many.__getitem__, folder=tmp_path / "many", mean=MEAN, std=STD)
    want = body_features(net, np.stack(list(many.values())), MEAN, STD)
    np.testing.assert_allclose(got[:, 0], want, atol=1e-6)  # torch itself: the same numbers exactly
