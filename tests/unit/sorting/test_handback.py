"""The Windows PC's work comes home: photos first seen as the standalone sorter's copies stay readable after a
person moves them, so review push sends them (the person's choice pre-selected) and train learns from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from labeling import payloads, served
from labeling.push import select_candidates
from loop.data import manifest
from loop.data.images import file_sha256
from loop.folders.corrections import scan
from loop.learning import registry
from loop.learning.train import train
from loop.sorting import dest_record
from tests.helpers.models import copy_workspace
from tests.unit.sortloop.test_bundle import _run_sorter_from_source


def _room_photos(shared_data: Path, dest: Path, per_class: int = 2) -> list[Path]:
    """Real photos the ikea model never saw (the `rooms` set: bed, chair, sofa), copied into a temp inbox."""
    out = []
    for cls in ("bed", "chair", "sofa"):
        for src in sorted((shared_data / "rooms" / cls).iterdir())[:per_class]:
            target = dest / "project A" / f"{cls}_{src.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
            out.append(target)
    return out


def test_moved_copies_from_the_standalone_sorter_are_pushed_and_trained(trained_ikea, shared_data: Path,
                                                                       tmp_path: Path) -> None:
    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    deployed = registry.current_model_dir(ws)
    inbox = tmp_path / "pc" / "inbox"
    _room_photos(shared_data, inbox)
    run = _run_sorter_from_source(str(inbox), "--model", str(deployed), "--workers", "0")
    assert run["rc"] == 0, run["err"]
    dest = inbox.with_name("inbox sorted")
    rows = dest_record.read_rows(dest)
    assert len(rows) == 6

    # a person at the PC moves two copies to another category folder, then the folder comes home
    classes = json.loads((deployed / "model.json").read_text())["classes"]
    moved = {}
    for row in rows[:2]:
        old = dest / row["dest_path"]
        new_cat = next(c for c in classes if c != row["label"])
        target = dest / new_cat / old.name
        target.parent.mkdir(parents=True, exist_ok=True)
        old.rename(target)
        moved[row["image_id"]] = (target, row["label"], new_cat)
    report = scan(ws, dest)
    assert {m.image_id for m in report.corrections} == set(moved)

    df = manifest.load(ws).set_index("image_id")
    for image_id, (target, _old_cat, new_cat) in moved.items():
        row = df.loc[image_id]
        assert Path(row["path"]) == target and file_sha256(target) == image_id  # the bytes are where it says
        assert (row["label"], row["label_source"], row["flag"]) == (new_cat, "user_move", "user_moved")

    # review push: both are candidates, publishable (no "missing or unreadable"), the person's class first
    candidates = select_candidates(df.reset_index())
    sent = candidates[candidates["image_id"].isin(list(moved))]
    assert len(sent) == 2
    names, refused = served.publish(ws, dict(zip(sent["image_id"], sent["path"].astype(str), strict=True)))
    assert refused == {} and set(names) == set(moved)
    for rec in sent.to_dict("records"):
        task = payloads.task(pd.Series(rec), names[rec["image_id"]])
        _target, old_cat, new_cat = moved[rec["image_id"]]
        assert task["predictions"][-1]["result"] == payloads.choice_result(new_cat)  # the one Label Studio pre-selects
        assert task["data"]["note"].startswith(f"Moved by a person from {old_cat} to {new_cat} on ")

    # train learns from both moves (none skipped as unreadable)
    result = train(ws, mode="head")
    assert result.skipped == [] and result.n_new == 2, result.summary()
    trained = pd.read_parquet(result.model_dir / "training_set.parquet")
    assert set(moved) <= set(trained["image_id"])
