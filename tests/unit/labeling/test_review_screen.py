"""The review screen's payloads: choices as a vertical list beside the photo, guess and confidence as sortable
task-list columns, the sha256 and path hidden, reviewer instructions. (Seen in a real browser by
tests/integration/test_browser_review.py.)"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pandas as pd

from labeling import payloads


def test_choices_are_a_vertical_list_beside_the_photo():
    root = ET.fromstring(payloads.label_config(["bed", "chair", "table"]))
    choices = next(root.iter("Choices"))
    assert choices.get("layout") == "vertical" and choices.get("showInline") is None
    image_column, choice_column = root.findall("View")
    assert image_column.find("Image") is not None and choice_column.find("Choices") is not None
    assert "flex" in root.get("style")


def test_task_data_has_guess_and_confidence_columns_and_keeps_its_keys():
    row = pd.Series({"image_id": "abc", "path": "/p/x.jpg", "flag": "low_confidence", "pred_label": "sofa",
                     "pred_conf": 0.41666, "pred_model": "v0003"})
    data = payloads.task(row, "abc.jpg")["data"]
    assert (data["guess"], data["confidence"], data["flag"]) == ("sofa", 0.417, "low_confidence")
    assert data["image"] == payloads.image_url("abc.jpg")  # the served copy, never the original path
    assert data["image_id"] == "abc" and data["path"] == "/p/x.jpg"  # still there for push/pull, just hidden


def test_review_tab_hides_keys_and_keeps_the_push_order_of_tasks_nobody_answered():
    tab = payloads.review_tab(7)
    assert tab["project"] == 7
    for where in ("explore", "labeling"):
        assert {"tasks:data.image_id", "tasks:data.path"} <= set(tab["data"]["hiddenColumns"][where])
    assert tab["data"]["ordering"] == ["tasks:id"]  # push order: the most useful first (review push)
    filters = {(f["filter"], f["operator"], f["value"]) for f in tab["data"]["filters"]["items"]}
    assert filters == {("filter:tasks:total_annotations", "equal", 0),
                       ("filter:tasks:cancelled_annotations", "equal", 0)}
    assert "Submit" in payloads.INSTRUCTIONS and "Skip" in payloads.INSTRUCTIONS
