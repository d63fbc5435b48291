"""The promotion gate: rules as properties on synthetic metrics, then the real thing on ikea photos
(a candidate trained on shuffled labels is refused; --force and rollback are logged and reversible)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from loop import manifest, registry
from loop.app.cli import app
from loop.errors import ModelError
from loop.gate import compare, deploy, deployment_stack, rollback
from loop.train import train
from tests.unit.model_helpers import copy_workspace


def metrics(accuracy: float, recalls: dict[str, float], n: int = 100) -> dict:
    return {"n": n, "accuracy": accuracy,
            "per_class": {c: {"precision": 0.5, "recall": r, "support": 10} for c, r in recalls.items()}}


RULES = {"min_accuracy_gain": 0.0, "max_recall_drop": 0.10}


def test_compare_promotes_only_a_real_improvement():
    current = metrics(0.70, {"a": 0.7, "b": 0.7})
    assert compare(metrics(0.75, {"a": 0.75, "b": 0.75}), current, **RULES)[0]
    ok, reasons = compare(metrics(0.70, {"a": 0.7, "b": 0.7}), current, **RULES)  # a tie is not better
    assert not ok and "0.700" in reasons[0] and reasons[0].startswith("FAIL")
    ok, reasons = compare(metrics(0.72, {"a": 0.72}), current, min_accuracy_gain=0.05, max_recall_drop=0.1)
    assert not ok and "0.050" in reasons[0]


def test_compare_refuses_a_class_recall_collapse_even_if_accuracy_rises():
    ok, reasons = compare(metrics(0.80, {"a": 1.0, "b": 0.55}), metrics(0.70, {"a": 0.7, "b": 0.7}), **RULES)
    assert not ok
    assert any("b 0.70 -> 0.55" in r for r in reasons)


def test_compare_first_deploy_needs_measurable_metrics():
    assert compare(metrics(0.4, {"a": 0.4}), None, **RULES)[0]
    ok, reasons = compare({"n": 0, "accuracy": None, "per_class": {}}, None, **RULES)
    assert not ok and "--force" in reasons[0]


def test_compare_ignores_classes_without_support_and_new_classes():
    current = metrics(0.6, {"a": 0.6, "b": None})
    assert compare(metrics(0.7, {"a": 0.7, "b": None, "c": 0.1}), current, **RULES)[0]


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
    assert any(r.startswith("FAIL: accuracy") for r in decision.reasons)
    # both were measured on the same photos today
    assert decision.candidate_metrics["n"] == decision.current_metrics["n"] > 100
    last = registry.read_log(ws)[-1]
    assert last["event"] == "refused" and last["version"] == worse.version
    assert last["candidate"]["accuracy"] == decision.candidate_metrics["accuracy"]


def test_cli_deploy_refusal_prints_numbers_and_exits_nonzero(gated):
    ws, good, worse = gated
    result = CliRunner().invoke(app, ["deploy", worse.version, "-w", str(ws.root)])
    assert result.exit_code == 2
    assert "refused" in result.output and "FAIL: accuracy" in result.output
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
