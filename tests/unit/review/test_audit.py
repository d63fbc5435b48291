"""Audit: out-of-fold probabilities + confident learning find flipped labels, and `sortloop audit` flags them."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from loop.data import manifest as mf
from loop.flags import SUSPECTED_MISLABEL
from loop.review.audit import ISSUE_METHODS, audit, confident_joint, find_label_issues, out_of_fold_probs
from tests.helpers.queues import centres_for, synthetic_workspace


@pytest.mark.parametrize("method", sorted(ISSUE_METHODS))
def test_finds_confident_mistakes_with_per_class_thresholds(method: str):
    # class 2 is hard (its own photos average p=0.45), so a fixed 0.5 threshold would call them all wrong
    probs = np.array([
        [0.90, 0.05, 0.05], [0.85, 0.10, 0.05], [0.05, 0.90, 0.05],   # fine
        [0.10, 0.85, 0.05],                                          # labeled 0, surely class 1
        [0.05, 0.90, 0.05], [0.30, 0.25, 0.45], [0.25, 0.30, 0.45],  # class 2 photos: hard but right
        [0.20, 0.10, 0.70],                                          # labeled 1, surely class 2
    ])
    labels = np.array([0, 0, 1, 0, 1, 2, 2, 1])
    found = find_label_issues(labels, probs, method=method)
    assert found.ranked().tolist() in ([7, 3], [3, 7])
    assert found.alternative[3] == 1 and found.alternative[7] == 2
    assert not found.is_issue[[5, 6]].any()
    assert found.score[3] == pytest.approx(0.9)


def test_confident_joint_rows_sum_to_class_counts():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=200)
    labels = rng.integers(0, 4, size=200)
    joint = confident_joint(labels, probs)
    np.testing.assert_allclose(joint.sum(axis=1), np.bincount(labels, minlength=4))


def test_out_of_fold_never_sees_its_own_item():
    # Two photos per item, both labeled the *wrong* way consistently: an in-fold head would learn the item
    # and vouch for it; out of fold, the other items say otherwise.
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(2, 8))
    y_true = np.repeat([0, 1], 20)
    x = centres[y_true] + rng.normal(scale=0.3, size=(40, 8))
    x[[0, 1]] = x[0] + rng.normal(scale=0.01, size=(2, 8))  # item "0" is two near-identical photos
    labels = y_true.copy()
    labels[[0, 1]] = 1
    groups = np.array(["i0", "i0"] + [f"i{j}" for j in range(2, 40)])
    probs = out_of_fold_probs(x, labels, groups, 2, folds=5)
    assert probs[0, 0] > 0.9 and probs[1, 0] > 0.9
    assert set(find_label_issues(labels, probs).ranked().tolist()) == {0, 1}


def test_audit_flags_suspects_with_the_alternative(ws, monkeypatch):
    classes = ["bed", "chair", "sofa"]
    true = [c for c in classes for _ in range(12)]
    labels = list(true)
    flipped = {3: "sofa", 17: "bed", 30: "chair"}
    for i, wrong in flipped.items():
        labels[i] = wrong
    ids = synthetic_workspace(ws, monkeypatch, labels=labels, true=true, centres=centres_for(classes))
    report = audit(ws)
    assert set(report.suspects["image_id"]) == {ids[i] for i in flipped}
    df = mf.load(ws).set_index("image_id")
    for i in flipped:
        row = df.loc[ids[i]]
        assert row["flag"] == SUSPECTED_MISLABEL and row["pred_label"] == true[i] and row["pred_model"] == "audit"
        assert row["label"] == labels[i]  # the audit never changes a label: a reviewer does
    assert report.flagged == 3 and audit(ws).flagged == 0  # idempotent


def test_audit_command_dry_run(ws, monkeypatch):
    from sortloop.cli import app

    classes = ["bed", "chair"]
    true = [c for c in classes for _ in range(10)]
    labels = list(true)
    labels[2] = "chair"
    synthetic_workspace(ws, monkeypatch, labels=labels, true=true, centres=centres_for(classes))
    result = CliRunner().invoke(app, ["audit", "--dry-run", "-w", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert "1 suspect(s)" in result.output and "chair -> bed" in result.output
    assert mf.load(ws)["flag"].isna().all()


def test_audit_needs_two_classes(ws, monkeypatch):
    from loop.errors import ModelError

    synthetic_workspace(ws, monkeypatch, labels=["bed"] * 4, true=["bed"] * 4, centres=centres_for(["bed"]))
    with pytest.raises(ModelError, match="at least 2 classes"):
        audit(ws)
