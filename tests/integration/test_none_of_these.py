"""'None of these' against a real Label Studio: sort sends unfamiliar photos to DEST/_other/, push pre-selects
'None of these' for them, a reviewer's 'None of these' reaches the manifest and its history (never a
class) and keeps the copy in _other/, and a reviewer's category for an _other photo moves its copy there."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def test_none_of_these_reaches_the_manifest_and_keeps_the_copy_in_other(ls_ws, sdk, sort_model, shared_data,
                                                                         tmp_path):
    from labeling.payloads import config_classes
    from labeling.push import push
    from loop.data import manifest as mf
    from loop.data.classnames import OTHER_LABEL
    from loop.learning.train import labeled_rows
    from loop.sorting import copies
    from loop.sorting.folder import sort_folder
    from sortloop.jobs import pull_reviews
    from tests.helpers.sorting import deploy_copy, sample_ikea
    from tests.unit.sorting.test_unfamiliar_sort import _non_photos, _with_familiarity

    reference = sample_ikea(shared_data, tmp_path / "reference", per_class=4, classes=4)
    deploy_copy(ls_ws, _with_familiarity(sort_model, reference, tmp_path / "artifact"))
    src, dest = tmp_path / "inbox", tmp_path / "sorted"
    sample_ikea(shared_data, src, per_class=1, classes=4)
    _non_photos(src / "misc", n=1)
    assert sort_folder(ls_ws, src, dest).ok
    records = copies.load_records(ls_ws, dest)
    odd = records[records["category"] == "_other"].sort_values("dest_path")
    assert len(odd) == 2  # the flat colour and the noise
    df = mf.load(ls_ws).set_index("image_id")
    assert (df.loc[odd["image_id"], "flag"] == "unfamiliar").all()

    report = push(ls_ws)
    project = sdk.projects.get(report.project_id)
    assert 'value="_other"' in project.label_config and "None of these" in project.label_config
    assert OTHER_LABEL not in config_classes(project.label_config)  # a choice, never a class
    tasks = {t.data["image_id"]: t for t in sdk.tasks.list(project=report.project_id, page_size=1000)}
    none_id, chair_id = odd["image_id"].tolist()
    assert tasks[none_id].predictions[0].result[0]["value"]["choices"] == [OTHER_LABEL]  # the model's answer

    sdk.annotations.create(id=tasks[none_id].id, result=choice(OTHER_LABEL))  # "None of these"
    sdk.annotations.create(id=tasks[chair_id].id, result=choice("chair"))  # it is a chair after all
    done = pull_reviews(ls_ws)  # what `sortloop review pull` runs: the labels, then the folders follow
    pulled = done.pulled
    assert pulled.ok and pulled.labeled == 2, pulled.summary()

    df = mf.load(ls_ws).set_index("image_id")
    assert df.at[none_id, "label"] == OTHER_LABEL and df.at[none_id, "label_source"] == "review"
    history = mf.history(ls_ws)
    assert ((history["image_id"] == none_id) & (history["new_label"] == OTHER_LABEL)).sum() == 1
    assert none_id not in set(labeled_rows(ls_ws)["image_id"])  # never a furniture class
    assert none_id in set(labeled_rows(ls_ws, none_of_these=True)["image_id"])  # but evidence for training
    after = copies.load_records(ls_ws, dest).set_index("image_id")
    none_copy = after.loc[none_id, "dest_path"]
    assert none_copy == odd.iloc[0]["dest_path"] and Path(none_copy).is_file()  # stays in _other/
    assert Path(none_copy).relative_to(dest).parts[0] == "_other"
    chair_copy = Path(after.loc[chair_id, "dest_path"])
    assert after.loc[chair_id, "category"] == "chair" and chair_copy.is_file()  # moved out by apply
    assert chair_copy.relative_to(dest).parts[:2] == ("chair", "misc")
