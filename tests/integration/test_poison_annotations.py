"""Annotations a client stored in a shape sortloop's config never makes: skipped and reported, never a stop."""

from __future__ import annotations

import contextlib

import pandas as pd
import pytest

from tests.integration.conftest import build_manifest

pytestmark = pytest.mark.integration

FLAGGED = [("chair", "chair", 0.45, "low_confidence"), ("sofa", "chair", 0.30, "low_confidence"),
           ("table", "table", 0.40, "low_confidence")]
LABELED = {"chair": 2, "sofa": 2, "table": 2}


def test_a_malformed_annotation_is_reported_once_and_the_other_reviews_come_back(ls_ws, sdk):
    from labeling.pull import pull
    from labeling.push import push
    from loop.data import manifest as mf

    odd, text, good = build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED)
    report = push(ls_ws)
    task_of = {t.data["image_id"]: t.id for t in sdk.tasks.list(project=report.project_id, page_size=1000)}
    sdk.annotations.create(id=task_of[odd], result=[{"from_name": "label", "to_name": "image", "type": "choices",
                                                     "value": {"choices": {"a": 1}}}])  # Label Studio: 201
    with contextlib.suppress(Exception):  # Label Studio answers 500 but stores it
        sdk.annotations.create(id=task_of[text], result=[{"from_name": "label", "to_name": "image",
                                                          "type": "choices", "value": "bed"}])
    sdk.annotations.create(id=task_of[good], result=[{"from_name": "label", "to_name": "image", "type": "choices",
                                                      "value": {"choices": ["sofa"]}}])

    first = pull(ls_ws)  # raised KeyError: 0 (and AttributeError for the string value) before
    assert first.labeled == 1 and mf.load(ls_ws).set_index("image_id").loc[good, "label"] == "sofa"
    assert len(first.unreadable) >= 1 and all(f"/projects/{report.project_id}/data?task=" in u
                                              for u in first.unreadable)
    assert f"task={task_of[odd]}" in " ".join(first.unreadable)
    assert "unreadable annotation" in first.summary()
    df = mf.load(ls_ws).set_index("image_id")
    assert pd.isna(df.loc[odd, "label"]) and pd.isna(df.loc[text, "label"])
    again = pull(ls_ws)
    assert again.unreadable == []  # reported once
    from sortloop.status import collect_status

    assert any("unreadable annotation" in p for p in collect_status(ls_ws, check_labelstudio=False)["problems"])
