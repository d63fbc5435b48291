"""Splits: whole items, stratified per source and label, stable when new images arrive."""

from __future__ import annotations

import pandas as pd

from loop.config import SplitConfig
from loop.data.manifest import COLUMNS
from loop.data.splits import assign_splits, straddling_items
from loop.tables import conform


def frame(rows: list[tuple[str, str, str, str | None]]) -> pd.DataFrame:
    """rows of (image_id, item_id, source, label)."""
    df = pd.DataFrame(rows, columns=["image_id", "item_id", "source", "label"])
    return conform(df, COLUMNS)


def test_items_never_straddle_and_ratios_follow_source():
    rows = []
    for k in range(40):
        for v in range(3):
            rows.append((f"u{k}-{v}", f"user-item-{k}", "user", "table" if k % 2 else "console"))
            rows.append((f"w{k}-{v}", f"web-item-{k}", "web", "table" if k % 2 else "console"))
    df = assign_splits(frame(rows), SplitConfig())
    assert straddling_items(df) == []
    items = df.drop_duplicates("item_id")
    share = items.groupby("source")["split"].apply(lambda s: (s == "valid").mean())
    assert abs(share["user"] - 0.2) <= 0.05 and abs(share["web"] - 0.2) <= 0.05  # the gate set: 20% of items


def test_assignment_is_stable_when_images_are_added():
    first = assign_splits(frame([(f"i{k}", f"item{k}", "user", "chair") for k in range(10)]), SplitConfig())
    more = pd.concat(
        [first, frame([(f"j{k}", f"item{k % 12}", "user", "chair") for k in range(12)])], ignore_index=True
    )
    second = assign_splits(more, SplitConfig())
    before = first.set_index("image_id")["split"]
    after = second.set_index("image_id")["split"]
    assert (after.loc[before.index] == before).all()  # nobody moved
    assert straddling_items(second) == []  # new photos of old items joined their side
    assert second["split"].notna().all()
    items = second.drop_duplicates("item_id")
    assert abs((items["split"] == "valid").mean() - 0.2) <= 0.1


def test_unlabeled_rows_get_no_split_until_labeled():
    df = assign_splits(frame([("a", "ia", "user", None), ("b", "ib", "user", "bed")]), SplitConfig())
    assert pd.isna(df.set_index("image_id").at["a", "split"])
    assert df.set_index("image_id").at["b", "split"] == "train"  # a class's first item trains


def test_reviewed_and_moved_photos_always_train_and_keep_the_gate_ratio():
    ingested = assign_splits(frame([(f"i{k}", f"item{k}", "user", "chair") for k in range(20)]), SplitConfig())
    reviewed = frame([(f"r{k}", f"new{k}", "user", "chair") for k in range(10)])
    reviewed["label_source"] = ["review"] * 5 + ["user_move"] * 5
    df = assign_splits(pd.concat([ingested, reviewed], ignore_index=True), SplitConfig())
    assert (df.set_index("image_id").loc[[f"r{k}" for k in range(10)], "split"] == "train").all()
    more = frame([(f"j{k}", f"later{k}", "user", "chair") for k in range(20)])
    df = assign_splits(pd.concat([df, more], ignore_index=True), SplitConfig())
    ingested_items = df[~df["image_id"].str.startswith("r")].drop_duplicates("item_id")
    assert abs((ingested_items["split"] == "valid").mean() - 0.2) <= 0.05  # reviews do not dilute the gate set
