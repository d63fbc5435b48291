"""Item groups: which photos show the same physical item, so they always land on the same side of a split.

The rule, in priority order:
1. `csv`: an explicit `item_id` from a CSV the user passes (columns `path,item_id`).
2. `exact`: byte-identical files are one manifest row already (the key is the sha256 of the bytes).
3. `near_duplicate`: perceptual hashes (pHash, 64 bits) within `items.near_duplicate_distance` bits join
   the item of the earlier photo (re-encodes, resizes, small crops of the same shot), unless both photos
   carry different labels. Default 2 bits: on ikea_products (plain white backgrounds) 4 bits joined
   46 pairs, 6 of them across classes; 2 bits joined 26, 25 within one class (bench/item_groups.py).
4. `burst`: photos in the same folder whose EXIF DateTimeOriginal lie within `items.burst_seconds` of
   each other (off by default: on our data it merged different items shot in one session).
5. `single`: otherwise the photo is its own item.

Caveat: an image joins an existing item but two existing items are never merged afterwards, because
merging could put one item on both sides of a split that is already in use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from loop.data.images import exif_time_raw


def parse_exif_time(raw: str | None) -> pd.Timestamp | None:
    """An EXIF date ("2024:05:01 13:45:10") as a UTC timestamp (camera local time taken as UTC), or None."""
    if not raw:
        return None
    try:
        return pd.Timestamp(pd.to_datetime(raw.strip("\x00 "), format="%Y:%m:%d %H:%M:%S"), tz="UTC")
    except (ValueError, TypeError):
        return None


def exif_taken_at(img: Image.Image) -> pd.Timestamp | None:
    """The image's EXIF capture time (DateTimeOriginal, else DateTime) as a UTC timestamp, or None."""
    return parse_exif_time(exif_time_raw(img))


def _hash_bits(hashes: Sequence[str] | pd.Series) -> np.ndarray:
    """pHash hex strings -> uint64 bits. Every flush of a sort parses the whole manifest's hashes, so hashes of
    16 digits (as `perceptual_hash` writes them) are parsed in one `bytes.fromhex`, not one int() each."""
    text = hashes.to_numpy(dtype=object) if isinstance(hashes, pd.Series) else list(hashes)
    if all(len(h) == 16 for h in text):
        return np.frombuffer(bytes.fromhex("".join(text)), dtype=">u8").astype(np.uint64)
    return np.array([int(h, 16) for h in text], dtype=np.uint64)


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits per uint64 (vectorised SWAR popcount)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def nearest_by_hash(query: np.uint64, pool: np.ndarray, max_distance: int, allowed: np.ndarray) -> int:
    """Index of the pool hash closest to `query` within `max_distance` bits (among `allowed`), else -1.

    Shapes: pool (P,) uint64 hash bits, allowed (P,) bool.
    """
    if len(pool) == 0:
        return -1
    dist = _popcount64(np.bitwise_xor(pool, query)).astype(np.int64)
    dist[~allowed] = 65
    j = int(np.argmin(dist))
    return j if dist[j] <= max_distance else -1


INDEXED_MAX_DISTANCE = 7  # up to this distance the pool is searched by blocks of >= 8 bits; beyond, compared whole


class _NearDuplicateIndex:
    """The pool's hashes by blocks of bits, so a photo is compared only with the photos that could be within
    `max_distance` bits of it, not with the whole manifest (every new photo of every flush did that: O(new x
    manifest), so a shop's flushes slowed as its manifest grew).

    Why it finds every match (pigeonhole): cut 64 bits into `max_distance + 1` blocks; two hashes that differ
    in at most `max_distance` bits agree exactly on at least one block. Each block's values are kept sorted, so
    the photos agreeing with a query on a block are one `searchsorted` range.
    """

    def __init__(self, pool: np.ndarray, max_distance: int) -> None:
        self.edges = [] if max_distance > INDEXED_MAX_DISTANCE else \
            np.linspace(0, 64, max_distance + 2).round().astype(int).tolist()
        self.blocks = []
        for keys in self._keys(pool):
            order = np.argsort(keys, kind="stable")
            self.blocks.append((keys[order], order))

    def _keys(self, bits: np.ndarray) -> list[np.ndarray]:
        return [(bits >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
                for lo, hi in zip(self.edges[:-1], self.edges[1:], strict=True)]

    def candidates(self, query: np.uint64, size: int) -> np.ndarray:
        """Ascending pool indices below `size` that may lie within the distance of `query` (a superset)."""
        if not self.edges:
            return np.arange(size)
        found = []
        for (keys, order), key in zip(self.blocks, self._keys(np.array([query], np.uint64)), strict=True):
            lo, hi = np.searchsorted(keys, key[0], "left"), np.searchsorted(keys, key[0], "right")
            found.append(order[lo:hi])
        near = np.unique(np.concatenate(found))
        return near[near < size]


def single_item_id(image_id: str) -> str:
    return f"img-{image_id[:16]}"


def assign_items(
    new: pd.DataFrame,
    existing: pd.DataFrame,
    *,
    near_duplicate_distance: int,
    burst_seconds: float,
) -> pd.DataFrame:
    """Fill `item_id`/`item_rule` for rows of `new` that have none, following the module's rule.

    Args:
        new: rows being added, in order (columns image_id, path, phash, taken_at, item_id, item_rule); rows
            with an item_id already (from a CSV) are kept as they are.
        existing: the manifest before this addition (its items are joined, never changed).
    Returns:
        `new` with item_id and item_rule filled for every row.

    Runs on every flush of a sort, so the loop works on plain lists and the burst rule on a per-folder
    index, not on pandas rows (a scan of the manifest per photo took 42 ms a photo at 20,000 rows).
    """
    new = new.copy()
    todo = new["item_id"].isna().to_numpy()
    # Pool = existing photos with a hash, then the new ones in order: a photo may join an earlier one.
    # Hash bits and labels are known up front; the pool grows as rows get their item (`size`).
    known = existing.dropna(subset=["phash"])
    joining = new.loc[todo & new["phash"].notna().to_numpy()]
    pool_bits = _hash_bits(pd.concat([known["phash"], joining["phash"]]).astype("string"))
    pool_labels = pd.concat([known["label"], joining["label"]]).astype("string").to_numpy(object, na_value=None)
    pool_items: list[str] = known["item_id"].to_numpy(object).tolist()
    index = _NearDuplicateIndex(pool_bits, near_duplicate_distance)
    bursts = _Bursts(existing, burst_seconds) if burst_seconds > 0 else None
    items, rules = new["item_id"].tolist(), new["item_rule"].tolist()
    columns = zip(new["image_id"], new["path"], new["phash"], new["label"], new["taken_at"], strict=True)
    for pos, (image_id, path, phash, label, taken) in enumerate(columns):
        if todo[pos]:
            item, rule = None, None
            size = len(pool_items)
            if not pd.isna(phash) and size:
                query = _hash_bits([phash])[0]
                near = index.candidates(query, size)
                # Photos with two different labels cannot show the same item, however alike they look.
                labels = pool_labels[near]
                allowed = pd.isna(labels) | (labels == label) if not pd.isna(label) else np.ones(len(near), bool)
                j = nearest_by_hash(query, pool_bits[near], near_duplicate_distance, allowed)
                if j >= 0:
                    item, rule = pool_items[near[j]], "near_duplicate"
            if item is None and bursts is not None and not pd.isna(taken):
                item = bursts.nearest(str(path), taken)
                rule = "burst" if item else None
            if item is None:
                item, rule = single_item_id(image_id), "single"
            items[pos], rules[pos] = item, rule
            if not pd.isna(phash):
                pool_items.append(item)
        if bursts is not None and not pd.isna(taken) and not pd.isna(items[pos]):
            bursts.add(str(path), taken, str(items[pos]))
    new["item_id"], new["item_rule"] = items, rules
    return new


class _Bursts:
    """The burst rule's lookup: capture times (ns) and items by folder, of the existing photos and of the new
    ones so far. A photo joins the closest earlier new photo in its folder within `seconds`, else the closest
    existing one."""

    def __init__(self, existing: pd.DataFrame, seconds: float) -> None:
        self.limit_ns = seconds * 1e9
        rows = existing.dropna(subset=["taken_at", "item_id"])
        index = pd.DataFrame({
            "folder": rows["path"].astype(str).map(os.path.dirname),
            "ns": pd.to_datetime(rows["taken_at"], utc=True).dt.as_unit("ns").astype("int64"),  # a manifest may hold µs
            "item": rows["item_id"].astype(str)})
        self.existing = {str(folder): (group["ns"].to_numpy(), group["item"].to_numpy())
                         for folder, group in index.groupby("folder", sort=False)}
        self.new: dict[str, tuple[list[int], list[str]]] = {}

    def add(self, path: str, taken: pd.Timestamp, item: str) -> None:
        times, items = self.new.setdefault(os.path.dirname(path), ([], []))
        times.append(pd.Timestamp(taken).value)
        items.append(item)

    def nearest(self, path: str, taken: pd.Timestamp) -> str | None:
        folder, t = os.path.dirname(path), pd.Timestamp(taken).value
        for times, items in (self.new.get(folder, ([], [])), self.existing.get(folder, ([], []))):
            if len(times) == 0:
                continue
            gap = np.abs(np.asarray(times, np.int64) - t)
            j = int(np.argmin(gap))
            if gap[j] <= self.limit_ns:
                return str(items[j])
        return None


def item_keys(rows: pd.DataFrame) -> np.ndarray:
    """The item of each manifest row, or its own image where none is known (photos of one item err together)."""
    return rows["item_id"].astype(object).fillna(rows["image_id"].astype(object)).astype(str).to_numpy()
