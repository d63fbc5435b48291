"""Train/validation splits: by whole items, stratified by label, per source, and stable over time.

"valid" is the **gate set**: a small share of the user's own items (`split.user_valid_fraction`, 0.2)
that no model trains on, so `loop.learning.gate` can compare two models on photos neither has seen. Everything
else trains; metrics, calibration and flag thresholds come from item-grouped cross-validation on it
(`loop.learning.train`). Photos labeled by a person *after* ingest (reviews, user moves) always go to train: they
are the labels the loop exists to learn from, and they were chosen by the model, so they would make a
biased yardstick anyway.
Why stable: the gate compares model versions on the same validation photos, so a photo never changes
side once it has one. Only labeled items get a split; an unlabeled photo gets one when its item is first
labeled (then the label is known and the split can be stratified). New items of a (source, label) stratum
alternate so the stratum's valid share tracks the configured fraction (user photos 50%, web 20%): the
first item of a stratum goes to train, so a class seen once is still learnt.
Caveat: with very few items per class the ratio is only approximate (it is kept per stratum, in items).
"""

from __future__ import annotations

import hashlib
import math

import pandas as pd

from loop.config import SplitConfig
from loop.data.label_sources import labeled_after_sorting

TRAIN, VALID = "train", "valid"


def _order_key(item_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()


def assign_splits(df: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """Return `df` with `split` filled for every labeled row of an item that had none; others unchanged.

    An item that already has a split (on any of its rows) gives that split to its new rows.
    """
    df = df.copy()
    has_split = df["split"].notna()
    item_split = df.loc[has_split].groupby("item_id")["split"].first()
    # 1. New rows of items that already have a side inherit it (a lookup, not `isin`: pandas' isin on Arrow strings
    # makes a scalar per value, and a shop's manifest has tens of thousands of items; this runs on every flush).
    inherited = df.loc[~has_split, "item_id"].map(item_split).dropna()
    df.loc[inherited.index, "split"] = inherited

    # 2. Labeled items with no side yet are new items: place them per (source, label) stratum.
    labeled = df[df["label"].notna()]
    unplaced = labeled.loc[labeled["split"].isna()]
    reviewed = labeled_after_sorting(unplaced)
    if reviewed is not None:  # reviewed / moved photos of new items: straight to train
        to_train = unplaced.loc[reviewed, "item_id"].unique()
        df.loc[df["split"].isna() & df["item_id"].isin(to_train), "split"] = TRAIN
        unplaced = unplaced[~unplaced["item_id"].isin(to_train)]
    new_items = unplaced.groupby("item_id").agg(
        source=("source", "first"), label=("label", lambda s: s.value_counts().index[0])
    )
    if new_items.empty:
        return df
    placed = (df["split"].notna() & df["label"].notna()).to_numpy(bool)
    human = labeled_after_sorting(df)
    if human is not None:  # the ratio is kept among ingested labels, reviews aside
        placed = placed & ~human
    assigned_items = df.loc[placed].groupby("item_id").agg(
        source=("source", "first"), label=("label", lambda s: s.value_counts().index[0]), split=("split", "first")
    )
    counts: dict[tuple[str, str], list[int]] = {}
    for (source, label), group in assigned_items.groupby(["source", "label"]):
        counts[(source, label)] = [len(group), int((group["split"] == VALID).sum())]

    decisions: dict[str, str] = {}
    order = sorted(new_items.index, key=lambda item: _order_key(str(item), config.seed))
    for item in order:
        source, label = new_items.at[item, "source"], new_items.at[item, "label"]
        fraction = config.web_valid_fraction if source == "web" else config.user_valid_fraction
        total, valid = counts.setdefault((source, label), [0, 0])
        goes_valid = valid < math.floor(fraction * (total + 1) + 1e-9)
        decisions[item] = VALID if goes_valid else TRAIN
        counts[(source, label)] = [total + 1, valid + int(goes_valid)]
    fill = df["split"].isna() & df["item_id"].isin(decisions)
    df.loc[fill, "split"] = df.loc[fill, "item_id"].map(decisions)
    return df


def straddling_items(df: pd.DataFrame) -> list[str]:
    """Items with photos on both sides of the split (should always be empty)."""
    sides = df.dropna(subset=["split"]).groupby("item_id")["split"].nunique()
    return sorted(sides[sides > 1].index.astype(str))
