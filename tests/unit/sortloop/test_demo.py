"""`sortloop demo`: holds out whole items per class as "new photos" (nothing of them is trained on), stably;
or sorts another folder as the new photos, its class folders kept as an answer key only; and
`--simulate-review` shows the sorted folders getting better after a review, a retrain, the gate and a re-sort."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from loop.data import manifest
from loop.learning import registry
from loop.learning.gate import NEW_LABELS
from loop.sorting.copies import load_records
from loop.workspace import open_workspace
from sortloop.demo import hold_out, run_loop_once
from sortloop.demo_review import read_answers, simulate_review
from tests.helpers.models import tiny_ikea_folder


def _truth(items_per_class: dict[str, int], photos_per_item: int = 2) -> pd.DataFrame:
    rows = []
    for cls, n in items_per_class.items():
        for i in range(n):
            rows += [{"image_id": f"{cls}-{i}-{k}", "item_id": f"item-{cls}-{i}", "label": cls}
                     for k in range(photos_per_item)]
    return pd.DataFrame(rows)


def test_hold_out_takes_whole_items_per_class_and_never_a_whole_class():
    truth = _truth({"bed": 10, "chair": 4, "sofa": 2, "lamp": 1})
    held = hold_out(truth, 0.3)
    by_item = truth.assign(held=truth["image_id"].isin(held)).groupby("item_id")["held"]
    assert (by_item.nunique() == 1).all()  # an item is held out whole, or not at all: no leak
    per_class = truth[truth["image_id"].isin(held)].groupby("label")["item_id"].nunique()
    assert per_class.to_dict() == {"bed": 3, "chair": 1, "sofa": 1}  # ~30 %, at least one, never all (lamp: 1 item)


def test_hold_out_is_stable_and_off_at_zero():
    truth = _truth({"bed": 10, "chair": 6})
    assert hold_out(truth, 0.5) == hold_out(truth.sample(frac=1.0, random_state=3), 0.5)
    assert hold_out(truth, 0.0) == set()
    assert hold_out(truth, 0.3) <= hold_out(truth, 0.5)  # growing the share only adds items


def test_the_demo_sorts_another_folder_as_new_photos_and_a_simulated_review_improves_the_folders(tmp_path,
                                                                                                   shared_data):
    """ikea studio shots as the labeled folder, rooms web photos as "your new photos" (the default `make demo`)."""
    labeled = tiny_ikea_folder(shared_data, tmp_path / "labeled", per_class=12)
    rooms = shared_data / "rooms"
    meta = pd.read_csv(rooms / "manifest.csv").groupby("cls").head(20)
    new = tmp_path / "new"
    for path in meta["path"]:
        (new / path).parent.mkdir(parents=True, exist_ok=True)
        (new / path).symlink_to(rooms / path)
    dest = tmp_path / "sorted"
    report = run_loop_once(labeled, new, dest, workspace=tmp_path / "ws", with_review=False)
    ws = open_workspace(tmp_path / "ws")
    answers = read_answers(ws)
    assert sorted(answers.values()) == sorted(meta["cls"])  # the class folders are the answer key...
    df = manifest.load(ws)
    assert not df[df["image_id"].isin(answers)]["label"].notna().any()  # ...never labels
    assert report.held_out == 0 and len(df[df["label_source"] == "folder"]) == 36  # every labeled photo trains
    records = load_records(ws, dest)
    assert len(records) == len(meta)
    assert not any(part in {"bed", "chair", "sofa"} for p in records["dest_path"]
                   for part in Path(p).relative_to(dest).parts[1:])  # sorted flat: no answer in the path

    result = simulate_review(ws, 30)
    text = "\n".join(result.lines())
    print(text)
    assert result.reviewed == 30 and result.new_version == "v0002"
    assert result.evidence[NEW_LABELS]["n"] == 30  # the reviews are the gate's evidence, as well as training data
    reviewed = manifest.load(ws).query("label_source == 'review'")
    assert (reviewed["label"] == reviewed["image_id"].map(answers)).all()
    records = load_records(ws, dest).set_index("image_id")
    assert (records.loc[reviewed["image_id"], "category"] == reviewed["label"].to_numpy()).all()  # copies moved
    assert result.after.right > result.before.right and "right folder before the review (v0001)" in text
    assert result.promoted and registry.current_version(ws) == "v0002", text
