"""The promotion gate: rules as properties on synthetic outcomes, then the real thing on real photos in both
directions (shuffled, 30%-flipped, swapped-class and lost-class candidates are refused; one much better on
the shop's own photos is promoted; --force and rollback are logged and reversible)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from loop.data import manifest
from loop.errors import ModelError
from loop.learning import registry
from loop.learning.deployment import deploy, deployment_stack, rollback
from loop.learning.gate import LABELED_SET, NEW_LABELS, Evidence, compare, first_deployment, gate_rows
from loop.learning.train import train, training_set
from loop.model.artifact import read_spec
from loop.scoring.paired import Paired, holm, loss_test
from sortloop.cli import app
from tests.helpers.models import copy_workspace

ALPHA = 0.05


def paired(outcomes: dict[str, tuple[int, int, int, int]]) -> Paired:
    """Per class: (both right, only candidate right, only current right, both wrong) photo counts."""
    labels, cand, cur = [], [], []
    for name, counts in outcomes.items():
        for (c, k), n in zip(((1, 1), (1, 0), (0, 1), (0, 0)), counts, strict=True):
            labels += [name] * n
            cand += [bool(c)] * n
            cur += [bool(k)] * n
    return Paired(np.array(labels), np.array(cand), np.array(cur))


def evidence(outcomes: dict[str, tuple[int, int, int, int]], key: str = LABELED_SET) -> Evidence:
    return Evidence(key, paired(outcomes), how="test photos")


def test_holm_tests_the_smallest_p_against_alpha_over_m_and_stops_at_the_first_miss():
    def test(p: float):
        return replace(loss_test(paired({"a": (1, 0, 0, 0)}), "x"), p=p)

    verdicts = holm([test(0.01), test(0.02), test(0.03)], 0.05)
    assert [t.significant for t in verdicts] == [True, True, True]
    assert [round(t.threshold, 4) for t in verdicts] == [0.0167, 0.025, 0.05]
    verdicts = holm([test(0.01), test(0.04), test(0.03)], 0.05)  # 0.03 misses 0.025: it and 0.04 stand
    assert [t.significant for t in verdicts] == [True, False, False]


def test_a_clearly_better_candidate_with_small_class_wobbles_is_promoted():
    # +7 photos overall on 92, while a 5-photo class loses one photo (0.40 -> 0.20)
    e = evidence({"table": (20, 6, 1, 5), "chair": (15, 4, 1, 4), "bench": (1, 0, 1, 3),
                  "bed": (10, 1, 0, 2), "sofa": (12, 0, 1, 5)})
    ok, reasons = compare([e], alpha=ALPHA)
    assert ok, reasons
    assert "your labeled set" in reasons[0] and "on 92 photos" in reasons[0]
    assert "right only for the candidate on 11, only for the current model on 4" in reasons[0] and "p=" in reasons[0]


def test_the_issues_chair_case_is_noise_once_eleven_classes_are_corrected_for():
    # chair 1.00 -> 0.82 on 11 photos (lost 2, gained 0, p = 0.25) while ten other classes wobble by a photo
    classes = {"chair": (9, 0, 2, 0), **{f"c{i}": (5, 1 if i % 2 else 0, 0 if i % 2 else 1, 1) for i in range(10)}}
    ok, reasons = compare([evidence(classes)], alpha=ALPHA)
    assert ok, reasons
    assert "no class significantly worse (11 class tests, Holm-corrected at 0.05)" in reasons[-1]
    assert "chair recall 1.000 -> 0.818 on 11 photos" in reasons[-1] and "p=0.25" in reasons[-1]


def test_a_loss_significant_alone_is_not_once_corrected_for_the_classes_tested():
    lost5 = {"a": (10, 0, 5, 0)}  # p = 1/32 = 0.031 < 0.05 alone
    others = {f"c{i}": (8, 1, 0, 1) for i in range(10)}  # ten classes each one photo better
    ok_alone, _ = compare([evidence({**lost5, "b": (40, 0, 0, 0)})], alpha=ALPHA)  # one class tested
    assert not ok_alone
    ok, reasons = compare([evidence({**lost5, **others})], alpha=ALPHA)  # 11 classes: threshold 0.05/11
    assert ok, reasons
    assert "a recall 1.000 -> 0.667 on 15 photos" in reasons[-1] and "p=0.0312 >= Holm threshold 0.00455" in reasons[-1]


def test_a_class_that_loses_a_lot_on_enough_photos_still_refuses():
    # better overall, but the 12 wardrobe photos the current model got right are now all wrong
    e = evidence({"wardrobe": (0, 0, 12, 0), "table": (30, 14, 0, 4), "chair": (30, 10, 0, 4)})
    assert e.paired.candidate.mean() > e.paired.current.mean()
    ok, reasons = compare([e], alpha=ALPHA)
    assert not ok
    failure = next(r for r in reasons if r.startswith("FAIL: class significantly worse"))
    assert "wardrobe recall 1.000 -> 0.000 on 12 photos" in failure and "only for the current model on 12" in failure
    assert "p=0.000244" in failure and "< Holm threshold 0.0167" in failure


def test_a_significantly_worse_candidate_is_refused_with_its_evidence():
    ok, reasons = compare([evidence({"a": (40, 2, 14, 4)})], alpha=ALPHA)
    assert not ok and reasons[0].startswith("FAIL: significantly worse on your labeled set")
    assert "on 60 photos" in reasons[0] and "on 2, only for the current model on 14" in reasons[0]
    assert "p=0.00209" in reasons[0]


def test_ties_and_losses_that_are_not_significant_promote():
    assert compare([evidence({"a": (30, 2, 2, 6)})], alpha=ALPHA)[0]  # a tie: the candidate learned from more labels
    assert compare([evidence({"a": (15, 0, 2, 5)})], alpha=ALPHA)[0]  # two photos worse of 22 (p = 0.25)
    spread = {"a": (5, 0, 1, 1), "b": (5, 0, 1, 2), "c": (5, 0, 1, 1)}  # three of 22: -0.136 but p = 0.125
    ok, reasons = compare([evidence(spread)], alpha=ALPHA)
    assert ok and "not significantly worse on your labeled set" in reasons[0]
    assert compare([evidence({"a": (2, 0, 1, 0)})], alpha=ALPHA)[0]  # one photo of three proves nothing


def test_much_better_on_new_photos_and_slightly_worse_on_the_labeled_set_promotes():
    labeled = evidence({"a": (20, 1, 3, 4), "b": (10, 0, 1, 2)})  # 4 lost, 1 gained: p = 0.19
    new = evidence({"a": (20, 15, 1, 5), "b": (10, 12, 2, 4)}, NEW_LABELS)
    ok, reasons = compare([labeled, new], alpha=ALPHA)
    assert ok, reasons
    assert any(r.startswith("not significantly worse on your labeled set") for r in reasons)
    assert any(r.startswith("not significantly worse on your photos labeled since the last model") for r in reasons)


def test_significantly_worse_on_either_kind_of_evidence_refuses():
    fine = evidence({"a": (40, 3, 2, 5)})
    worse = evidence({"a": (20, 1, 12, 5)}, NEW_LABELS)  # p = 0.0017 < 0.05 / 2
    ok, reasons = compare([fine, worse], alpha=ALPHA)
    assert not ok
    assert any(r.startswith("FAIL: significantly worse on your photos labeled since the last model") for r in reasons)
    ok, reasons = compare([Evidence(LABELED_SET, worse.paired, how="x"), Evidence(NEW_LABELS, fine.paired, how="x")],
                          alpha=ALPHA)
    assert not ok and any(r.startswith("FAIL: significantly worse on your labeled set") for r in reasons)


def test_a_dropped_class_with_labels_left_refuses_and_nothing_to_compare_on_refuses():
    ok, reasons = compare([evidence({"a": (30, 2, 2, 6)})], alpha=ALPHA, dropped_classes={"stool": 4})
    assert not ok and any("cannot sort into 'stool'" in r and "4 photo(s)" in r for r in reasons)
    ok, reasons = compare([Evidence(LABELED_SET, None, how="none"), Evidence(NEW_LABELS, None, how="none")],
                          alpha=ALPHA)
    assert not ok and "--force" in reasons[0]


def test_first_deployment_needs_measurable_photos():
    assert first_deployment(12, "gate set")[0]
    ok, reasons = first_deployment(0, "gate set")
    assert not ok and "--force" in reasons[0]


def test_deploy_and_rollback_need_versions(ws):
    with pytest.raises(ModelError, match="train"):
        deploy(ws)
    with pytest.raises(ModelError, match="nothing to roll back"):
        rollback(ws)


@pytest.fixture(scope="module")
def gated(trained_ikea, tmp_path_factory):
    """A copy of the trained workspace plus a worse candidate trained on shuffled train labels."""
    ws = copy_workspace(trained_ikea[0], tmp_path_factory.mktemp("gate") / "ws")
    good = trained_ikea[1].version
    df = manifest.load(ws)
    train_rows = df[(df["split"] == "train") & df["label"].notna()]
    shuffled = np.random.default_rng(0).permutation(train_rows["label"].to_numpy())
    manifest.set_labels(ws, [manifest.LabelChange(i, str(lab), "test_shuffle", "test")
                             for i, lab in zip(train_rows["image_id"], shuffled, strict=True)])
    worse = train(ws, mode="head")
    return ws, good, worse


def test_gate_refuses_a_candidate_trained_on_shuffled_labels(gated):
    ws, good, worse = gated
    decision = deploy(ws, worse.version)
    assert not decision.promoted and registry.current_version(ws) == good
    assert decision.candidate_metrics["accuracy"] < decision.current_metrics["accuracy"]
    assert any(r.startswith("FAIL: significantly worse on your labeled set") for r in decision.reasons)
    # both were measured on the same photos today
    assert decision.candidate_metrics["n"] == decision.current_metrics["n"] > 50
    last = registry.read_log(ws)[-1]
    assert last["event"] == "refused" and last["version"] == worse.version
    assert last["candidate"]["accuracy"] == decision.candidate_metrics["accuracy"]


def test_cli_deploy_refusal_prints_numbers_and_exits_nonzero(gated):
    ws, good, worse = gated
    result = CliRunner().invoke(app, ["deploy", worse.version, "-w", str(ws.root)])
    assert result.exit_code == 2
    assert "refused" in result.output and "FAIL: significantly worse on your labeled set" in result.output
    assert "McNemar p=" in result.output and "Holm threshold" in result.output
    assert registry.current_version(ws) == good


def test_force_then_rollback_restores_the_previous_model(gated):
    ws, good, worse = gated
    runner = CliRunner()
    forced = runner.invoke(app, ["deploy", worse.version, "--force", "-w", str(ws.root)])
    assert forced.exit_code == 0, forced.output
    assert "forced" in forced.output and registry.current_version(ws) == worse.version
    assert registry.read_log(ws)[-1]["event"] == "forced"
    assert deployment_stack(ws)[-2:] == [good, worse.version]

    back = runner.invoke(app, ["rollback", "-w", str(ws.root)])
    assert back.exit_code == 0, back.output
    assert good in back.output and registry.current_version(ws) == good
    event = registry.read_log(ws)[-1]
    assert event["event"] == "rolled_back" and event["version"] == good and event["previous"] == worse.version

    again = runner.invoke(app, ["rollback", "-w", str(ws.root)])  # only one deployment left on record
    assert again.exit_code == 1 and "nothing to roll back" in again.output
    assert registry.current_version(ws) == good


def test_the_gate_never_scores_a_model_on_photos_it_trained_on(trained_ikea, tmp_path):
    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    current = trained_ikea[1]
    # a candidate trained while 12 gate photos were (wrongly) on the train side, then put back
    df = manifest.load(ws)
    moved = df[(df["split"] == "valid") & df["label"].notna()]["image_id"].head(12).tolist()
    manifest.update(ws, lambda d: d.assign(split=d["split"].where(~d["image_id"].isin(moved), "train")))
    candidate = train(ws, mode="head")
    manifest.update(ws, lambda d: d.assign(split=d["split"].where(~d["image_id"].isin(moved), "valid")))

    rows, excluded = gate_rows(ws, [candidate.model_dir, current.model_dir])
    assert excluded == 12 and not set(moved) & set(rows["image_id"])
    for model_dir in (candidate.model_dir, current.model_dir):
        assert not set(training_set(model_dir)["image_id"]) & set(rows["image_id"])
    decision = deploy(ws, candidate.version)
    assert decision.candidate_metrics["n"] == decision.current_metrics["n"] == len(rows)
    assert any("12 gate photos left out" in r for r in decision.reasons)


def test_a_reviewed_photo_changes_the_next_candidates_training_set(trained_ikea, tmp_path):
    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    before = set(training_set(trained_ikea[1].model_dir)["image_id"])
    # an unlabeled photo (a relabelled copy of an ikea photo) reviewed by a person
    df = manifest.load(ws)
    photo = df[df["split"] == "train"].iloc[0]
    new_id = "f" * 64
    row = {**photo.to_dict(), "image_id": new_id, "item_id": "reviewed-item", "label": pd.NA, "split": pd.NA,
           "label_source": pd.NA}
    manifest.update(ws, lambda d: pd.concat([d, pd.DataFrame([row])], ignore_index=True))
    manifest.set_labels(ws, [manifest.LabelChange(new_id, str(photo["label"]), "review", "reviewer@example.com")])
    assert manifest.load(ws).set_index("image_id").at[new_id, "split"] == "train"
    result = train(ws, mode="head")
    assert not result.unchanged and result.n_new == 1
    after = set(training_set(result.model_dir)["image_id"])
    assert after - before == {new_id}


def test_without_a_gate_set_the_gate_compares_both_versions_out_of_fold(ws, tmp_path, shared_data):
    """Too few items per class for a gate set: first deploy on out-of-fold accuracy, then both versions out of
    fold on the same photos; a version without out-of-fold predictions: on items it never saw."""
    from loop.data.ingest import ingest_folder
    from loop.workspace import open_workspace
    from tests.helpers.models import tiny_ikea_folder

    ws.config_file.write_text("[split]\nuser_valid_fraction = 0.0\n")
    ws = open_workspace(ws.root)
    folder = tiny_ikea_folder(shared_data, tmp_path / "tiny", per_class=10)
    ingest_folder(ws, folder, source="user", labeled=True, items_csv=tmp_path / "tiny_items.csv")
    df = manifest.load(ws)
    true = df.set_index("image_id")["label"].astype(str)
    sizes = df.groupby("item_id")["image_id"].transform("size")
    items = df[sizes >= 2].groupby("label")["item_id"].unique()
    first_new = df[df["item_id"].isin([i[0] for i in items])]["image_id"].tolist()  # a whole item per class
    later_new = df[df["item_id"].isin([i[1] for i in items])]["image_id"].tolist()  # another one
    held = first_new + later_new
    manifest.update(ws, lambda d: d.assign(label=d["label"].where(~d["image_id"].isin(held)),
                                           split=d["split"].where(~d["image_id"].isin(held))))
    first = train(ws, mode="head")
    decision = deploy(ws, first.version)
    assert decision.promoted and "no gate set (too few items per class): out-of-fold accuracy" in decision.reasons[-1]

    def review(ids: list[str]) -> None:
        manifest.set_labels(ws, [manifest.LabelChange(i, true[i], "review", "r@example.com") for i in ids])

    review(first_new)
    second = train(ws, mode="head")
    decision = deploy(ws, second.version)
    compared = set(training_set(first.model_dir)["image_id"])  # what the deployed version scored out of fold
    assert not set(first_new) & compared
    assert decision.candidate_metrics["n"] == decision.current_metrics["n"] == len(compared)
    assert decision.evidence[LABELED_SET]["n"] == len(compared)
    assert any("both versions' out-of-fold predictions on the same photos" in r for r in decision.reasons)
    # the reviewed item is new to the deployed model: the deployed model as it is, the candidate out of fold
    assert decision.evidence[NEW_LABELS]["n"] == len(first_new)
    assert decision.promoted, decision.reasons

    (second.model_dir / "oof_predictions.parquet").unlink()  # e.g. a finetune-mode version
    review(later_new)
    third = train(ws, mode="head")
    decision = deploy(ws, third.version)
    assert decision.evidence[LABELED_SET]["n"] == 0
    assert any("the deployed version kept no out-of-fold predictions" in r for r in decision.reasons)
    assert decision.evidence[NEW_LABELS]["n"] == len(later_new)
    assert not set(later_new) & set(training_set(second.model_dir)["image_id"])  # it never saw them


# --- the gate on real photos, both directions (issue: "it still refuses what is truly worse") ---------------


def _gate_copy(trained_ikea, tmp_path: Path):
    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    ws.settings.model.int8 = False  # the gate is under test here, not quantisation (and it saves minutes)
    return ws


def _train_rows(ws) -> pd.DataFrame:
    df = manifest.load(ws)
    return df[(df["split"] == "train") & df["label"].notna()].reset_index(drop=True)


def _relabel(ws, ids, labels, by: str = "test") -> None:
    manifest.set_labels(ws, [manifest.LabelChange(i, None if lab is None else str(lab), None if lab is None
                                                  else "test_corruption", by) for i, lab in zip(ids, labels,
                                                                                               strict=True)])


def _refused(ws, good: str, decision) -> str:
    print(decision.summary())  # the reason, printed (pytest -s shows it)
    assert not decision.promoted and registry.current_version(ws) == good
    failures = [r for r in decision.reasons if r.startswith("FAIL")]
    assert failures and all("p=" in r or "cannot sort into" in r for r in failures)
    return " ".join(failures)


def test_gate_refuses_a_candidate_with_30_percent_of_its_labels_flipped(trained_ikea, tmp_path):
    ws = _gate_copy(trained_ikea, tmp_path)
    rows = _train_rows(ws)
    classes = sorted(rows["label"].astype(str).unique())
    rng = np.random.default_rng(1)
    flip = rng.random(len(rows)) < 0.3
    wrong = [rng.choice([c for c in classes if c != old]) for old in rows.loc[flip, "label"].astype(str)]
    _relabel(ws, rows.loc[flip, "image_id"], wrong)
    failures = _refused(ws, trained_ikea[1].version, deploy(ws, train(ws, mode="head").version))
    assert "significantly worse on your labeled set" in failures or "class significantly worse" in failures


def test_gate_refuses_a_candidate_with_two_classes_swapped(trained_ikea, tmp_path):
    ws = _gate_copy(trained_ikea, tmp_path)
    rows = _train_rows(ws)
    a, b = rows["label"].astype(str).value_counts().index[:2]  # the two largest classes
    swap = rows["label"].isin([a, b])
    _relabel(ws, rows.loc[swap, "image_id"], rows.loc[swap, "label"].map({a: b, b: a}))
    failures = _refused(ws, trained_ikea[1].version, deploy(ws, train(ws, mode="head").version))
    assert any(text in failures for text in ("significantly worse on your labeled set", f"{a} recall", f"{b} recall"))


def test_gate_refuses_a_candidate_that_lost_a_class(trained_ikea, tmp_path):
    ws = _gate_copy(trained_ikea, tmp_path)
    rows = _train_rows(ws)
    lost = rows["label"].astype(str).value_counts().index[0]
    taken = rows["label"] == lost
    _relabel(ws, rows.loc[taken, "image_id"], [None] * int(taken.sum()))  # its training labels taken back
    candidate = train(ws, mode="head")
    assert lost not in read_spec(candidate.model_dir)["classes"]
    failures = _refused(ws, trained_ikea[1].version, deploy(ws, candidate.version))
    assert f"cannot sort into {lost!r}" in failures


def test_gate_promotes_a_candidate_much_better_on_the_shops_photos(trained_ikea, tmp_path, shared_data):
    """The shop's own photos (rooms: web photos in rooms, unlike ikea's studio shots) reviewed after sorting:
    the deployed model is scored on them as it is, the candidate out of fold, and the gain there decides."""
    from loop.data.ingest import ingest_folder

    ws = _gate_copy(trained_ikea, tmp_path)
    rooms = shared_data / "rooms"
    meta = pd.read_csv(rooms / "manifest.csv").groupby("cls").head(30)  # 90 photos, each its own item
    shop = tmp_path / "shop"
    for path in meta["path"]:
        (shop / path).parent.mkdir(parents=True, exist_ok=True)
        (shop / path).symlink_to(rooms / path)
    ingest_folder(ws, shop, source="user", labeled=False)
    df = manifest.load(ws)
    ids = {Path(p).name: i for p, i in zip(df["path"], df["image_id"], strict=True)}
    reviewed = [ids[Path(p).name] for p in meta["path"]]
    manifest.set_labels(ws, [manifest.LabelChange(i, c, "review", "reviewer@example.com")
                             for i, c in zip(reviewed, meta["cls"], strict=True)])
    candidate = train(ws, mode="head")
    decision = deploy(ws, candidate.version)
    print(decision.summary())
    new = decision.evidence[NEW_LABELS]
    assert new["n"] == len(reviewed)  # every reviewed photo: the deployed model never saw any of them
    assert not set(reviewed) & set(training_set(trained_ikea[1].model_dir)["image_id"])
    oof = pd.read_parquet(candidate.model_dir / "oof_predictions.parquet").set_index("image_id").loc[reviewed]
    assert new["candidate_accuracy"] == pytest.approx(float((oof["pred_label"] == oof["label"]).mean()))
    # measured: 0.933 out of fold vs the deployed 0.856 on these 90 photos (ikea studio shots -> web photos)
    assert new["candidate_accuracy"] >= new["current_accuracy"] + 0.05, new
    assert decision.promoted, decision.reasons
    assert any(r.startswith("not significantly worse on your labeled set") for r in decision.reasons)


def test_a_version_runs_on_each_gate_photo_once_and_its_outputs_are_kept(gated, monkeypatch):
    from loop.learning import gate
    from loop.model.artifact import load_predictor
    from loop.model.evaluate import evaluate_predictor
    from loop.progress import no_progress

    ws, good, _ = gated
    model_dir = registry.model_dir(ws, good)
    rows, _ = gate_rows(ws, [model_dir])
    assert (model_dir / gate.GATE_PREDICTIONS_FILE).exists()  # written when it was gated
    predictor = load_predictor(model_dir, "onnx")
    _, fresh = evaluate_predictor(ws, predictor, rows)

    def predicted_again(*args, **kwargs):
        raise AssertionError("a photo the version had scored was predicted again")

    monkeypatch.setattr(gate, "evaluate_predictor", predicted_again)
    stored = gate.gate_probabilities(ws, predictor, model_dir, rows, no_progress)
    np.testing.assert_allclose(stored, fresh, atol=1e-6)
    monkeypatch.undo()
    first = rows.head(5)
    (model_dir / gate.GATE_PREDICTIONS_FILE).unlink()  # a new photo is predicted, then kept
    assert np.allclose(gate.gate_probabilities(ws, predictor, model_dir, first, no_progress), fresh[:5], atol=1e-6)
    assert len(pd.read_parquet(model_dir / gate.GATE_PREDICTIONS_FILE)) == 5
