"""The review queue: which unlabeled or flagged photos a reviewer sees next, in order, within a daily budget.

`select(ws, budget)` refits the linear head on the cached features of every labeled photo (seconds), scores
the candidates (unlabeled photos, including those sort flagged `low_confidence`, not yet queued, pushed or
reviewed) and picks a batch with a strategy of `loop.scoring.strategies` (`review.strategy`; typiclust at cold start),
spread over items: the strategy ranks `ITEM_SPREAD` times the budget, then each item's best photo comes
before any item's second (`loop.scoring.strategies.one_per_item`).
`queue(ws, selection)` marks the picks `review_status = queued` with a `review_rank` (and `flag = selected`
where they had no flag), so `review push` sends them in that order after user moves. `budget_left(ws)` is
`review.daily_budget` minus what was pushed today (UTC; user moves never count; `history/pushes.jsonl`).
Caveat: the head used here is refit from the manifest's labels, not the deployed model: it sees every
label given so far (also those since the last nightly retrain), which is what selection should use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from loop.atomic import append_jsonl, read_jsonl
from loop.data import manifest as mf
from loop.data.items import item_keys
from loop.flags import SELECTED, SELECTION_GUESS, SUSPECTED_MISLABEL, USER_MOVED
from loop.model.embeddings import embeddings
from loop.progress import ProgressCallback
from loop.review.probe import fit_probe, probe_probs
from loop.scoring.strategies import Pool, get_batch_strategy, is_cold_start, one_per_item, select_batch
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

DONE_STATUSES = ("pushed", "reviewed", "skipped", "queued")
OWN_ORDER_FLAGS = (USER_MOVED, SUSPECTED_MISLABEL)  # pushed by their own rule, never "selected"
PUSH_LOG = "pushes.jsonl"
ITEM_SPREAD = 3  # the strategy ranks this many times the budget, from which one photo per item goes first


@dataclass(frozen=True)
class Selection:
    """One batch chosen for review, most useful first."""

    image_ids: list[str]
    paths: list[str]
    pred_labels: list[str | None]  # the refit head's guess (None at cold start without 2 classes)
    strategy: str  # asked for
    used: str  # what chose them (typiclust at cold start)
    candidates: int
    labeled: int

    @property
    def cold_start(self) -> bool:
        return self.used != self.strategy

    def summary(self) -> str:
        how = f"{self.used} (cold start)" if self.cold_start else self.used
        return (f"selected {len(self.image_ids)} of {self.candidates} candidate photo(s) with {how}, "
                f"from {self.labeled} labeled photo(s)")


def candidate_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Photos selection may pick: unlabeled (flagged low_confidence or not), not queued/pushed/reviewed."""
    status = df["review_status"].astype(object)
    flag = df["flag"].astype(object)
    keep = df["label"].isna().to_numpy() & ~status.isin(DONE_STATUSES).to_numpy(bool)
    keep &= ~flag.isin(OWN_ORDER_FLAGS).to_numpy(bool)
    keep &= df["path"].notna().to_numpy()
    return df[keep].reset_index(drop=True)


def select(ws: Workspace, budget: int, strategy: str | None = None, *, seed: int | None = None,
           on_progress: ProgressCallback | None = None) -> Selection:
    """Choose up to `budget` photos for review with `strategy` (default `review.strategy`).

    Raises:
        ConfigError: unknown strategy (the message lists the valid ones).
        ModelError: missing backbone weights.

    Example:
        >>> print(select(open_workspace("data"), 50).summary())   # doctest: +SKIP
        selected 50 of 1200 candidate photo(s) with hybrid, from 400 labeled photo(s)
    """
    strategy = strategy or ws.settings.review.strategy
    get_batch_strategy(strategy)  # fail on a bad name before any work
    seed = ws.settings.model.seed if seed is None else seed
    df = mf.load(ws)
    cand = candidate_rows(df)
    labeled = df[df["label"].notna() & df["path"].notna()].reset_index(drop=True)
    if budget <= 0 or cand.empty:
        return Selection([], [], [], strategy, strategy, len(cand), len(labeled))

    both = pd.concat([cand, labeled], ignore_index=True)
    feats, ok = embeddings(ws, both, on_progress=on_progress)
    cand_feats, cand_ok = feats[: len(cand)], ok[: len(cand)]
    lab_feats, lab_ok = feats[len(cand):], ok[len(cand):]
    cand, cand_feats = cand[cand_ok].reset_index(drop=True), cand_feats[cand_ok]
    labeled, lab_feats = labeled[lab_ok].reset_index(drop=True), lab_feats[lab_ok]

    # The head on every label given so far (C=1: the fit must be seconds; selection tolerates it).
    classes = sorted(labeled["label"].astype(str).unique())
    y = labeled["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    if len(classes) >= 2:
        model = fit_probe(lab_feats.reshape(-1, lab_feats.shape[-1]), np.repeat(y, 2))
        probs = probe_probs(model, cand_feats[:, 0], len(classes))
    else:  # nothing to learn yet: uniform guesses, and cold start below ignores them
        probs = np.full((len(cand), max(1, len(classes))), 1.0 / max(1, len(classes)))
    pool = Pool(probs, cand_feats.mean(axis=1), lab_feats.mean(axis=1) if len(labeled) else
                np.zeros((0, cand_feats.shape[-1])), y)
    cold = is_cold_start(y, len(classes))
    ranked, used = select_batch(pool, min(len(cand), ITEM_SPREAD * budget), strategy, seed=seed, cold_start=cold)
    picks = one_per_item(ranked, item_keys(cand), budget)
    guesses = [classes[j] if len(classes) >= 2 else None for j in probs[picks].argmax(axis=1)]
    selection = Selection(cand["image_id"].astype(str).to_numpy()[picks].tolist(),
                          cand["path"].astype(str).to_numpy()[picks].tolist(), guesses, strategy, used,
                          len(cand), len(labeled))
    logger.info("%s", selection.summary())
    return selection


def queue(ws: Workspace, selection: Selection) -> int:
    """Mark the selection `queued` with ranks after any already queued; returns how many rows it marked.

    The head's guess becomes the row's prediction only where the row has none (sort's own prediction,
    from the deployed model, is kept).
    """
    if not selection.image_ids:
        return 0
    rank_of = {i: r for r, i in enumerate(selection.image_ids)}
    guess_of = dict(zip(selection.image_ids, selection.pred_labels, strict=True))
    marked = 0

    def change(df: pd.DataFrame) -> pd.DataFrame:
        nonlocal marked
        start = float(np.nan_to_num(df["review_rank"].max(), nan=-1.0)) + 1.0
        hit = df["image_id"].isin(rank_of.keys()) & ~df["review_status"].astype(object).isin(
            ("pushed", "reviewed", "skipped")).to_numpy(bool)
        df.loc[hit, "review_rank"] = start + df.loc[hit, "image_id"].map(rank_of).astype(float)
        df.loc[hit, "review_status"] = "queued"
        df.loc[hit & df["flag"].isna(), "flag"] = SELECTED  # low_confidence stays: it says more
        no_pred = hit & df["pred_label"].isna()
        df.loc[no_pred, "pred_label"] = df.loc[no_pred, "image_id"].map(guess_of).to_numpy()
        df.loc[no_pred & df["pred_label"].notna(), "pred_model"] = SELECTION_GUESS
        marked = int(hit.sum())
        return df

    mf.update(ws, change)
    return marked


def choose(ws: Workspace, budget: int, strategy: str | None = None, *, dry_run: bool = False,
           on_progress: ProgressCallback | None = None) -> Selection:
    """`select`, then `queue` the result unless `dry_run`: what `sortloop select` does.

    Example:
        >>> choose(open_workspace("data"), 50, "margin").image_ids[:3]   # doctest: +SKIP
    """
    selection = select(ws, budget, strategy, on_progress=on_progress)
    if not dry_run:
        queue(ws, selection)
    return selection


def push_log_path(ws: Workspace) -> Path:
    return ws.history_dir / PUSH_LOG


def record_pushed(ws: Workspace, image_ids: list[str], *, counted: int, at: datetime | None = None) -> None:
    """Append one push to the log: the ids sent and how many count against the daily budget."""
    if not image_ids:
        return
    stamp = (at or datetime.now(UTC)).isoformat()
    append_jsonl(push_log_path(ws), [{"at": stamp, "counted": int(counted), "image_ids": list(image_ids)}])


def pushed_today(ws: Workspace, *, now: datetime | None = None) -> int:
    """Photos pushed today (UTC) that count against the budget."""
    path = push_log_path(ws)
    if not path.exists():
        return 0
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    return sum(int(r.get("counted", 0)) for r in read_jsonl(path)
               if datetime.fromisoformat(r["at"]).astimezone(UTC).date() == today)


def budget_left(ws: Workspace, *, now: datetime | None = None) -> int | None:
    """How many more photos may be pushed today (None: no daily limit)."""
    daily = ws.settings.review.daily_budget
    if daily == 0:
        return None
    return max(0, daily - pushed_today(ws, now=now))


def queued_count(df: pd.DataFrame) -> int:
    """Rows selected and waiting to be pushed."""
    return int(((df["review_status"].astype(object) == "queued") & df["review_rank"].notna()).sum())


def top_up(ws: Workspace, *, on_progress: ProgressCallback | None = None) -> Selection | None:
    """Queue a fresh selection for what is left of today's budget beyond rows already queued.

    Returns the selection, or None when nothing was needed (budget spent, or enough queued already).
    With no daily limit, `review.daily_budget` = 0, this selects nothing: push then sends every flag.
    """
    left = budget_left(ws)
    if left is None:
        return None
    want = left - queued_count(mf.load(ws))
    if want <= 0:
        return None
    selection = select(ws, want, on_progress=on_progress)
    queue(ws, selection)
    return selection
