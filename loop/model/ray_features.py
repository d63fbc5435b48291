"""Feature extraction on a Ray cluster (`sortloop train --ray`, the optional extra `sortloop[ray]`).

The same pool shape as the Ray sort (`loop.cluster`) over a torch body built from shipped weights; the
actors read the resized cache and return features; the driver writes the feature cache.
Caveat: the workspace's cache must be mounted at the same path on every node (NFS/SMB).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loop.cluster import connected, pooled, results
from loop.data.resized import read_resized, resized_path
from loop.model.backbones import Backbone
from loop.model.features import RemoteFeatures, body_features, mirrored
from loop.workspace import Workspace

if TYPE_CHECKING:
    import torch


class _FeatureActor:
    """One torch body per actor, rebuilt from the shipped weights; per batch: the features of each image
    and of its mirror, from the resized cache (exactly `loop.model.features.cached_features`' computation)."""

    def __init__(self, weights: list, architecture: str, num_classes: int, mean: list[float], std: list[float]) -> None:
        import ray
        import timm
        import torch
        from safetensors.torch import load

        torch.set_num_threads(1)
        data: bytes = ray.get(weights[0])
        self.net = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
        self.net.load_state_dict(load(data), strict=True)
        self.net.eval()
        self.mean, self.std = mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([read_resized(Path(p)) for p in batch["file"]])
        feats = body_features(self.net, mirrored(images), self.mean, self.std)
        n = len(images)
        return {"image_id": batch["image_id"], "features": np.stack([feats[:n], feats[n:]], axis=1)}


def ray_features(ws: Workspace, net: torch.nn.Module, backbone: Backbone) -> RemoteFeatures:
    """`loop.model.features.cached_features(remote=...)` on the cluster of `[ray]`: actors read the resized cache
    files (the workspace must be mounted at the same path on every node) and return (image, mirror) features.

    `net`'s weights are shipped once to each actor through the object store.
    """
    size, batch_size = ws.settings.model.image_size, ws.settings.model.batch_size
    address, actors = ws.settings.ray.address, ws.settings.ray.actors

    def compute(image_ids: list[str]) -> Iterator[tuple[list[str], np.ndarray]]:
        with connected(address):
            import ray
            import ray.data
            from safetensors.torch import save

            weights = ray.put(save({k: v.contiguous() for k, v in net.state_dict().items()}))
            rows = [{"image_id": i, "file": str(resized_path(ws, i, size))} for i in image_ids]
            dataset = pooled(rows, _FeatureActor, {
                "weights": [weights], "architecture": backbone.name, "num_classes": int(net.num_classes),
                "mean": list(backbone.mean), "std": list(backbone.std)}, batch_size, actors)
            for out in results(dataset, "feature extraction"):
                yield [str(i) for i in out["image_id"]], np.asarray(out["features"], np.float32)

    return compute
