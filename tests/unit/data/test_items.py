"""The item rule on frames (`loop.data.items.assign_items`), without decoding photos: the cases a sort's flush meets."""

from __future__ import annotations

import pandas as pd

from loop.data.items import assign_items, single_item_id


def _rows(photos: list[tuple[str, str, str | None]], *, unit: str = "ns") -> pd.DataFrame:
    """(name, folder, capture time or None) -> rows as the manifest holds them (no pHash: the burst rule alone)."""
    taken = pd.to_datetime([t for _, _, t in photos], utc=True).as_unit(unit)
    return pd.DataFrame({
        "image_id": [f"{name:0<64}" for name, _, _ in photos], "path": [f"/photos/{d}/{n}.jpg" for n, d, _ in photos],
        "phash": [None] * len(photos), "taken_at": taken, "label": [None] * len(photos),
        "item_id": [None] * len(photos), "item_rule": [None] * len(photos)})


def test_burst_rule_prefers_an_earlier_new_photo_then_the_closest_existing_one_in_the_same_folder() -> None:
    # The manifest's times in microseconds (what pandas infers from parquet), the new ones in ns: compared in one unit.
    existing = assign_items(_rows([("e1", "a", "2024-05-01 12:00:00"), ("e2", "a", "2024-05-01 11:00:00")], unit="us"),
                            _rows([]), near_duplicate_distance=2, burst_seconds=0)
    new = _rows([
        ("n1", "a", "2024-05-01 12:01:00"),  # 60 s from e1: alone
        ("n2", "a", "2024-05-01 12:00:31"),  # 29 s from n1, 31 s from e1: joins n1 (a new photo first)
        ("n3", "a", "2024-05-01 11:00:10"),  # 10 s from e2: joins the closest existing photo
        ("n4", "b", "2024-05-01 12:00:00"),  # another folder: alone
        ("n5", "a", None),                   # no capture time: alone
    ])
    out = assign_items(new, existing, near_duplicate_distance=2, burst_seconds=30).set_index("image_id")
    item = {name: out.at[f"{name:0<64}", "item_id"] for name in ("n1", "n2", "n3", "n4", "n5")}
    rule = {name: out.at[f"{name:0<64}", "item_rule"] for name in item}
    e2 = existing.set_index("image_id").at[f"{'e2':0<64}", "item_id"]
    assert item["n1"] == single_item_id(f"{'n1':0<64}") and rule["n1"] == "single"
    assert item["n2"] == item["n1"] and rule["n2"] == "burst"
    assert item["n3"] == e2 and rule["n3"] == "burst"
    assert rule["n4"] == "single" and rule["n5"] == "single"
    # off (the default): every photo is its own item
    assert set(assign_items(new, existing, near_duplicate_distance=2, burst_seconds=0)["item_rule"]) == {"single"}


def test_hash_bits_parses_the_manifest_column_in_one_pass_as_int_would_and_falls_back_on_short_hashes() -> None:
    from loop.data.items import _hash_bits

    hashes = ["ffffffffffffffff", "0000000000000001", "8000000000000000", "0123456789abcdef"]
    expected = [int(h, 16) for h in hashes]
    column = pd.Series(hashes, dtype="string[pyarrow]")  # as the manifest's parquet reads back
    assert _hash_bits(column).tolist() == expected
    assert _hash_bits(hashes).tolist() == expected
    assert _hash_bits(["abc", "ffffffffffffff"]).tolist() == [0xABC, 0xFFFFFFFFFFFFFF]  # not 16 digits: one by one
    assert _hash_bits([]).tolist() == []


def test_near_duplicates_join_existing_items_of_a_manifest_read_from_parquet_unless_labels_differ(tmp_path) -> None:
    existing = _rows([("e1", "a", None), ("e2", "a", None)])
    existing["phash"] = ["00000000000000ff", "ffff000000000000"]
    existing["item_id"] = ["item-1", "item-2"]
    existing["label"] = ["table", "chair"]
    existing.to_parquet(tmp_path / "m.parquet")
    existing = pd.read_parquet(tmp_path / "m.parquet")
    for column in ("image_id", "path", "phash", "label", "item_id"):  # Arrow-backed strings, as the manifest's
        existing[column] = existing[column].astype("string[pyarrow]")
    new = _rows([("n1", "b", None), ("n2", "b", None), ("n3", "b", None)])
    new["phash"] = ["00000000000000fe", "ffff000000000001", "0f0f0f0f0f0f0f0f"]  # 1 bit, 1 bit, far from both
    new["label"] = [None, "table", None]  # n2 is labeled table: it cannot join e2, a chair
    out = assign_items(new, existing, near_duplicate_distance=2, burst_seconds=0).set_index("image_id")
    assert out.loc[f"{'n1':0<64}", "item_id"] == "item-1" and out.loc[f"{'n1':0<64}", "item_rule"] == "near_duplicate"
    assert out.loc[f"{'n2':0<64}", "item_rule"] == "single"
    assert out.loc[f"{'n3':0<64}", "item_rule"] == "single"
