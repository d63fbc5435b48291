"""Training on real photos: pretrained weights matter, metrics are stored, the artifact loads without fastai.

The ikea workspace is trained once per session (`trained_ikea` in tests/conftest.py); fine-tuning runs on
a tiny copy of a few photos for one epoch, enough to check the plumbing and the portable load.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from loop.data import manifest
from loop.errors import ModelError
from loop.learning import registry
from loop.learning.train import labeled_rows, labels_fingerprint, train
from loop.model.artifact import read_spec
from sortloop.cli import app
from tests.helpers.models import PREDICT_CODE, copy_workspace, run_without_fastai, tiny_ikea_folder

MIN_ACCURACY = 0.6  # 11 classes: chance is ~0.09


def test_pretrained_head_is_far_above_chance_and_deployed(trained_ikea):
    ws, result, decision = trained_ikea
    user = result.metrics["user_valid"]
    assert 50 <= user["n"] <= 120  # the gate set: ~20% of the items
    cv = result.metrics["cv_user"]  # out of fold: every training photo scored by a model that never saw it
    assert cv["n"] == result.n_trained >= 250 and cv["accuracy"] >= MIN_ACCURACY
    assert user["accuracy"] >= MIN_ACCURACY, user["accuracy"]
    assert decision.promoted and registry.current_version(ws) == result.version
    spec = read_spec(result.model_dir)
    assert spec["metrics"]["user_valid"]["accuracy"] == user["accuracy"]
    assert spec["train_mode"] == "head" and spec["pretrained"] is True
    assert spec["classes"] == sorted(spec["classes"]) and len(spec["classes"]) == 11
    assert set(spec["metrics"]["user_valid"]["per_class"]) == set(spec["classes"])
    assert spec["labels_fingerprint"] == labels_fingerprint(labeled_rows(ws))
    assert (result.model_dir / "confusion_user_valid.png").stat().st_size > 1000
    assert spec["metrics"]["web_valid"]["n"] == 0  # ingested as user photos only


def test_random_init_body_does_not_reach_the_bar(trained_ikea, tmp_path):
    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    result = train(ws, mode="head", pretrained=False)
    assert read_spec(result.model_dir)["pretrained"] is False
    assert result.metrics["user_valid"]["accuracy"] < MIN_ACCURACY, result.metrics["user_valid"]["accuracy"]


def test_head_artifact_loads_without_fastai_and_matches_the_torch_model(trained_ikea):
    """Calibration survives the export: the temperature is folded in, torch and ONNX Runtime agree."""
    ws, result, _ = trained_ikea
    spec = read_spec(result.model_dir)
    assert spec["temperature"] == spec["calibration"]["temperature"] and abs(spec["temperature"] - 1) > 0.05
    stored = pd.read_parquet(result.model_dir / "valid_predictions.parquet")  # in-memory torch probs at train
    ids = stored["image_id"].tolist()[:48]
    out = run_without_fastai(PREDICT_CODE, str(result.model_dir), str(ws.root), ",".join(ids))
    assert out["fastai_loaded"] is False
    expected = np.stack(stored["probs"].to_numpy()[:48])  # calibrated: softmax(logits / T)
    for runtime in ("onnx", "torch"):
        np.testing.assert_allclose(np.array(out[runtime]), expected, atol=1e-4)
    assert out["classes"] == read_spec(result.model_dir)["classes"]


def test_cli_models_lists_versions_with_metrics(trained_ikea):
    ws, result, _ = trained_ikea
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "--json", "-w", str(ws.root)])
    assert listed.exit_code == 0, listed.output
    assert f'"{result.version}"' in listed.output and '"deployed": true' in listed.output
    text = runner.invoke(app, ["models", "-w", str(ws.root)])
    assert f"* {result.version}" in text.output


def test_retrain_reuses_caches_and_gives_the_same_model(trained_ikea, tmp_path):
    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    resized = sorted((ws.cache_dir / "resized").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in resized]
    unchanged = train(ws, mode="head")  # nothing new: no identical version, and it says so
    assert unchanged.unchanged and unchanged.version == trained_ikea[1].version
    assert "nothing to train" in unchanged.summary()
    again = train(ws, mode="head", force=True)
    assert again.version != trained_ikea[1].version
    assert [p.stat().st_mtime_ns for p in resized] == stamps  # nothing decoded again
    assert again.metrics["user_valid"]["accuracy"] == trained_ikea[1].metrics["user_valid"]["accuracy"]


def test_a_version_with_8_bit_int8_weights_is_retrained_without_new_labels(trained_ikea, tmp_path):
    """After an upgrade to 7-bit INT8 weights, the newest version's INT8 sorts in float; the next nightly train
    must not answer "nothing to train" for want of new labels, or the shop sorts slower until labels arrive."""
    from loop.atomic import write_json_atomic
    from loop.model.artifact import SPEC_FILE, int8_passed

    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    ws.settings.model.cv_folds = 2  # the retrain is under test, not its metrics: keep it short
    spec = read_spec(trained_ikea[1].model_dir)
    spec["recipe"]["cv_folds"] = 2
    old_dir = ws.models_dir / trained_ikea[1].version
    old = {**spec, "recipe": {k: v for k, v in spec["recipe"].items() if k != "int8_weight_bits"},
           "int8": {k: v for k, v in spec["int8"].items() if k != "weight_bits"}}
    write_json_atomic(old_dir / SPEC_FILE, old, indent=2, default=str)
    assert not int8_passed(read_spec(old_dir))

    retrained = train(ws, mode="head")
    assert not retrained.unchanged and retrained.version != trained_ikea[1].version
    assert read_spec(retrained.model_dir)["recipe"]["int8_weight_bits"] == 7
    assert int8_passed(read_spec(retrained.model_dir)), read_spec(retrained.model_dir)["int8"]["reason"]
    assert train(ws, mode="head").unchanged  # and only once


def test_labels_fingerprint_tracks_labels_not_row_order():
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "label": ["x", "y", None], "split": ["train", "valid", "train"]})
    assert labels_fingerprint(df) == labels_fingerprint(df.iloc[::-1])
    changed = df.assign(label=["x", "x", None])
    assert labels_fingerprint(changed) != labels_fingerprint(df)
    assert labels_fingerprint(df.assign(label=["x", "y", "z"])) != labels_fingerprint(df)


def test_train_refuses_without_labels_or_with_one_class(ws):
    with pytest.raises(ModelError, match="ingest"):
        train(ws)
    with pytest.raises(ModelError, match="mode"):
        train(ws, mode="magic")
    row = {"image_id": "ab" * 32, "path": "/nowhere.jpg", "source": "user", "item_id": "i1", "label": "table",
           "split": "train"}
    manifest.update(ws, lambda df: pd.concat([df, pd.DataFrame([row])], ignore_index=True))
    with pytest.raises(ModelError, match="class"):
        train(ws)
    assert registry.list_versions(ws) == []


@pytest.fixture(scope="module")
def tiny_finetuned(tmp_path_factory, shared_data):
    """36 photos of 3 classes fine-tuned with fastai for 1 (+1 frozen) epoch through the CLI."""
    from loop.workspace import init_workspace

    root = tmp_path_factory.mktemp("tiny")
    folder = tiny_ikea_folder(shared_data, root / "photos")
    ws = init_workspace(root / "ws")
    text = ws.config_file.read_text().replace("epochs = 8", "epochs = 1")
    ws.config_file.write_text(text.replace("batch_size = 32\nlearning", "batch_size = 8\nlearning"))
    runner = CliRunner()
    ingested = runner.invoke(app, ["ingest", str(folder), "--source", "user", "--labeled",
                                   "--items", str(root / "photos_items.csv"), "-w", str(ws.root)])
    assert ingested.exit_code == 0, ingested.output
    trained = runner.invoke(app, ["train", "--mode", "finetune", "-w", str(ws.root)])
    assert trained.exit_code == 0, trained.output
    return ws, registry.model_dir(ws, registry.list_versions(ws)[-1]), trained.output


def test_finetune_artifact_matches_fastai_get_preds_without_fastai(tiny_finetuned):
    ws, model_dir, output = tiny_finetuned
    assert "finetune mode" in output and "user_valid accuracy" in output
    spec = read_spec(model_dir)
    assert spec["train_mode"] == "finetune" and spec["training"]["body_batchnorm"] == "eval"
    stored = pd.read_parquet(model_dir / "valid_predictions.parquet")  # fastai's get_preds at train time
    out = run_without_fastai(PREDICT_CODE, str(model_dir), str(ws.root), ",".join(stored["image_id"]))
    assert out["fastai_loaded"] is False
    expected = np.stack(stored["probs"].to_numpy())
    for runtime in ("onnx", "torch"):
        np.testing.assert_allclose(np.array(out[runtime]), expected, atol=1e-4)


def test_finetune_keeps_pretrained_batchnorm_statistics(tiny_finetuned):
    from safetensors.torch import load_file

    from loop.model.backbones import pretrained_weights

    ws, model_dir, _ = tiny_finetuned
    trained = load_file(str(model_dir / "model.safetensors"))
    original = load_file(str(pretrained_weights(ws, "tf_efficientnet_lite0")))
    stats = [k for k in original if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 40
    for key in stats:
        assert np.array_equal(trained[key].numpy(), original[key].numpy()), key
    assert not np.array_equal(trained["conv_head.weight"].numpy(), original["conv_head.weight"].numpy())


def test_an_item_keeps_its_fold_when_other_items_arrive():
    import numpy as np

    from loop.model.head import item_folds

    groups = np.repeat([f"item{i}" for i in range(30)], 3)
    more = np.concatenate([groups, np.repeat([f"new{i}" for i in range(12)], 2)])

    def fold_of(splits, n):
        out = np.full(n, -1)
        for f, (fit, held) in enumerate(splits):
            assert not set(fit) & set(held) and len(fit) + len(held) == n
            out[held] = f
        return out

    before, after = fold_of(item_folds(groups, 5), len(groups)), fold_of(item_folds(more, 5), len(more))
    assert (before >= 0).all() and (after >= 0).all()  # every row held out exactly once
    for g in np.unique(groups):  # a whole item in one fold, the same fold before and after
        assert len(set(before[groups == g])) == 1 and len(set(after[more == g])) == 1
    held_with = {tuple(sorted(set(groups[before == f]))) for f in range(before.max() + 1)}
    assert held_with == {tuple(sorted(set(g for g in more[after == f] if g.startswith("item"))))
                         for f in range(after.max() + 1)}
    assert len(item_folds(np.array(["a", "a", "b", "c"]), 3)) >= 2  # a handful of items still gives folds


def test_a_class_whose_items_share_one_fold_is_still_predicted_out_of_fold():
    import numpy as np

    from loop.model.head import choose_c, class_rescues, item_folds

    groups = np.repeat([f"obj{i}" for i in range(24)], 4)  # 8 classes x 3 objects, like eth80's labeled part
    y = np.repeat(np.arange(24) // 3, 4)
    seed = next(s for s in range(100)  # a seed whose hash puts every item of some class in one fold
                if any(set(y) - set(y[fit]) for fit, _ in item_folds(groups, 5, seed=s)))
    splits = item_folds(groups, 5, seed=seed)
    rescues = class_rescues(splits, y, groups)
    assert rescues and all(len(set(groups[held])) == 1 for _, held in rescues)  # one whole item each
    for fit, held in rescues:
        assert not set(groups[fit]) & set(groups[held]) and set(y[held]) <= set(y[fit])
    rng = np.random.default_rng(0)
    x = np.eye(8)[y] * 3.0 + rng.normal(scale=0.5, size=(len(y), 8))  # well separated classes
    _, _, logits, _ = choose_c(x, y, groups, n_classes=8, folds=5, seed=seed)
    assert (logits.argmax(axis=1) == y).mean() > 0.95  # no class lost to an unlucky fold


def test_sorted_unreviewed_photos_self_train_the_next_model_and_never_become_labels(trained_ikea, tmp_path,
                                                                                   shared_data):
    """Photos `sort` copied and nobody reviewed train the next head with its sure guesses (model.json says
    how many); they are not labels: not in the training set, the out-of-fold predictions or the manifest."""
    import shutil

    from loop.learning.train import TRAINING_SET_FILE
    from loop.sorting.folder import sort_folder

    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    shop = tmp_path / "shop"
    rooms = pd.read_csv(shared_data / "rooms" / "manifest.csv").groupby("cls").head(12)
    for k, rel in enumerate(rooms["path"]):
        shop.mkdir(exist_ok=True)
        shutil.copy(shared_data / "rooms" / rel, shop / f"{k:03d}.jpg")
    assert sort_folder(ws, shop, tmp_path / "sorted").ok
    before = manifest.load(ws)
    sorted_ids = set(before.loc[before["label"].isna() & before["pred_label"].notna(), "image_id"])
    assert len(sorted_ids) >= 30

    result = train(ws, force=True)
    spec = read_spec(result.model_dir)
    guessed = spec["training"]["self_training"]
    assert 20 <= guessed["sorted_photos"] <= len(sorted_ids)
    assert 0 < guessed["trained_on"] <= guessed["sorted_photos"]
    assert spec["recipe"]["self_training"] is True
    assert any("sorted, unreviewed photos" in note for note in result.notes)
    trained = set(pd.read_parquet(result.model_dir / TRAINING_SET_FILE)["image_id"])
    oof = set(pd.read_parquet(result.model_dir / "oof_predictions.parquet")["image_id"])
    assert not (trained | oof) & sorted_ids
    after = manifest.load(ws)
    assert after.loc[after["image_id"].isin(sorted_ids), "label"].isna().all()  # guesses are never written

    # Off: the labels alone, a different recipe (so the switch retrains), other head weights
    ws.settings.model.self_training = False
    alone = train(ws)
    assert not alone.unchanged
    alone_spec = read_spec(alone.model_dir)
    assert alone_spec["training"]["self_training"]["trained_on"] == 0
    assert alone_spec["recipe"]["self_training"] is False


def test_the_shops_labeled_photos_bound_what_the_next_model_sends_to_other(trained_ikea, tmp_path, shared_data):
    """Labeled set of studio shots, the shop's photos in rooms: the first model sends many of them to
    `_other`; once people labeled 30 of them, the next model's threshold must also keep those within the
    share, so fewer of the shop's other photos leave their category."""
    import shutil

    from loop.data.images import load_model_input
    from loop.data.label_sources import REVIEW
    from loop.learning.deployment import deploy
    from loop.model.artifact import load_predictor
    from loop.sorting.folder import sort_folder
    from sortloop.status import _describe_unfamiliar

    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    rooms = pd.read_csv(shared_data / "rooms" / "manifest.csv")
    first, later = rooms.groupby("cls").head(10), rooms.groupby("cls").nth(list(range(10, 30)))
    for folder, part in (("shop", first), ("later", later)):
        for k, rel in enumerate(part["path"]):
            (tmp_path / folder).mkdir(exist_ok=True)
            shutil.copy(shared_data / "rooms" / rel, tmp_path / folder / f"{k:03d}.jpg")
    assert sort_folder(ws, tmp_path / "shop", tmp_path / "sorted").ok
    before = sort_folder(ws, tmp_path / "later", tmp_path / "sorted-before")
    assert before.unfamiliar >= 6, "an ikea-only model should find many room photos unfamiliar"
    df = manifest.load(ws)
    truth = dict(zip([f"{k:03d}.jpg" for k in range(len(first))], first["cls"], strict=True))
    shop = df[df["path"].astype(str).str.contains(f"{tmp_path / 'shop'}", regex=False)]
    manifest.set_labels(ws, [manifest.LabelChange(i, truth[p.rsplit("/", 1)[-1]], REVIEW, "test")
                             for i, p in zip(shop["image_id"], shop["path"].astype(str), strict=True)])

    result = train(ws, force=True)
    section = read_spec(result.model_dir)["unfamiliar"]
    assert section["shop_photos"] == len(first) == 30
    assert section["threshold"] == max(section["threshold_all_photos"], section["threshold_shop_photos"])
    assert "your 30 photos labeled after sorting" in _describe_unfamiliar(section, ws.settings.sort)
    deploy(ws, result.version, force=True)
    after = sort_folder(ws, tmp_path / "later", tmp_path / "sorted-after")
    assert after.unfamiliar <= before.unfamiliar / 2, (before.unfamiliar, after.unfamiliar)
    # ... and the bound on the shop's photos is what kept them: the same model with the labeled set's
    # threshold alone would send more of the later photos
    predictor = load_predictor(result.model_dir, "onnx")
    later_photos = sorted((tmp_path / "later").iterdir())
    scores = predictor.predict_with_familiarity(np.stack([load_model_input(p, predictor.image_size)
                                                          for p in later_photos])).unfamiliar_scores
    kept_by_the_bound = (scores >= section["threshold_all_photos"]).sum() - (scores >= section["threshold"]).sum()
    assert kept_by_the_bound >= 1, (scores, section)  # most of the way the pooled calibration already goes
