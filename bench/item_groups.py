"""How well inferred item groups match a dataset's own groups (reproduces the README's numbers).

Usage: .venv/bin/python bench/item_groups.py [../shared/data/ikea_products]

For each pHash threshold it counts photo pairs the rule would join, and how many of those pairs lie in
one of the dataset's `group`s and in one class. Pairs, not items, because a dataset group (a product
family) legitimately holds many different photos that no near-duplicate rule should join.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from loop.data.images import open_image, perceptual_hash
from loop.data.items import _hash_bits, _popcount64


def main(root: Path) -> None:
    meta = pd.read_csv(root / "manifest.csv")
    hashes = [perceptual_hash(open_image(root / p, draft_size=128)) for p in meta["path"]]
    bits = _hash_bits(hashes)
    dist = _popcount64(bits[:, None] ^ bits[None, :])
    group, label = meta["group"].to_numpy(str), meta["cls"].to_numpy(str)
    upper = np.triu_indices(len(meta), 1)
    same_group = (group[:, None] == group[None, :])[upper]
    same_class = (label[:, None] == label[None, :])[upper]
    print(f"{len(meta)} photos, {same_group.sum()} same-group pairs in the dataset")
    print("bits  joined_pairs  in_one_group  in_one_class")
    for bits_allowed in (0, 2, 4, 6, 8):
        joined = dist[upper] <= bits_allowed
        in_group, in_class = (joined & same_group).sum(), (joined & same_class).sum()
        print(f"{bits_allowed:4d}  {joined.sum():12d}  {in_group:12d}  {in_class:12d}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/ikea_products"))
