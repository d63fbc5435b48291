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


def _brute_force_items(existing: pd.DataFrame, new: pd.DataFrame, distance: int) -> list[str]:
    """The near-duplicate rule by definition: each new photo against every earlier one, nearest first, ties to the
    earliest, never across two labels; else its own item."""
    pool = [(int(h, 16), lab, item) for h, lab, item in
            zip(existing.phash, existing.label, existing.item_id, strict=True)]
    items = []
    for image_id, h, lab in zip(new.image_id, new.phash, new.label, strict=True):
        bits = int(h, 16)
        best = min(((bin(bits ^ b).count("1"), i) for i, (b, other, _) in enumerate(pool)
                    if pd.isna(lab) or pd.isna(other) or other == lab), default=(65, -1))
        item = pool[best[1]][2] if best[0] <= distance else single_item_id(image_id)
        items.append(item)
        pool.append((bits, lab, item))
    return items


def test_near_duplicate_search_by_blocks_finds_what_comparing_every_pair_finds() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    bases = rng.integers(0, 2**63, size=60, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)

    def photos(n: int, tag: str) -> pd.DataFrame:
        """n hashes, each a base with 0-4 random bits flipped (so distances around the limit), random labels."""
        hashes, labels = [], []
        for _ in range(n):
            bits = int(bases[rng.integers(len(bases))])
            for b in rng.choice(64, size=int(rng.integers(0, 5)), replace=False):
                bits ^= 1 << int(b)
            hashes.append(f"{bits:016x}")
            labels.append([None, "table", "chair"][int(rng.integers(3))])
        rows = _rows([(f"{tag}{i}", "a", None) for i in range(n)])
        rows["phash"], rows["label"] = hashes, labels
        return rows

    for distance in (0, 1, 2, 3, 10):  # 10: beyond INDEXED_MAX_DISTANCE, every pair is compared
        existing = photos(300, "e")
        existing["item_id"] = [f"item-{i}" for i in range(len(existing))]
        new = photos(300, "n")
        out = assign_items(new, existing, near_duplicate_distance=distance, burst_seconds=0)
        assert out["item_id"].tolist() == _brute_force_items(existing, new, distance)
        joined = (out["item_rule"] == "near_duplicate").sum()
        assert 0 < joined < len(new)  # both outcomes occur, so the comparison means something
