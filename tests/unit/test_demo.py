"""`sortloop demo` holds out whole items per class as "new photos" (nothing of them is trained on), stably."""

from __future__ import annotations

import pandas as pd

from sortloop.demo import hold_out


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
