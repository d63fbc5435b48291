"""`loop.review.queue` and `sortloop select`: what a reviewer sees next, queued in order, within a budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from loop.data import manifest as mf
from loop.errors import ConfigError
from loop.flags import SELECTED
from loop.review import queue as rq
from tests.helpers.queues import centres_for, synthetic_workspace

CLASSES = ["bed", "chair", "sofa"]


def make(ws, monkeypatch, *, labeled_per_class: int, unlabeled_per_class: int = 10) -> list[str]:
    labels, true = [], []
    for c in CLASSES:
        labels += [c] * labeled_per_class + [None] * unlabeled_per_class
        true += [c] * (labeled_per_class + unlabeled_per_class)
    return synthetic_workspace(ws, monkeypatch, labels=labels, true=true, centres=centres_for(CLASSES))


def test_select_queues_unlabeled_photos_in_rank_order(ws, monkeypatch):
    make(ws, monkeypatch, labeled_per_class=5)
    chosen = rq.choose(ws, 6, "hybrid")
    assert chosen.used == "hybrid" and not chosen.cold_start and len(chosen.image_ids) == 6
    df = mf.load(ws).set_index("image_id")
    assert df.loc[chosen.image_ids, "label"].isna().all()
    assert (df.loc[chosen.image_ids, "review_status"] == "queued").all()
    assert (df.loc[chosen.image_ids, "flag"] == SELECTED).all()
    assert df.loc[chosen.image_ids, "review_rank"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert set(df.loc[chosen.image_ids, "pred_label"]) <= set(CLASSES)
    # a second selection never picks a queued photo, and ranks continue after the first batch
    again = rq.choose(ws, 3, "margin")
    assert not set(again.image_ids) & set(chosen.image_ids)
    assert mf.load(ws).set_index("image_id").loc[again.image_ids, "review_rank"].min() == 6.0


def test_cold_start_with_few_labels_uses_typiclust(ws, monkeypatch):
    make(ws, monkeypatch, labeled_per_class=1)
    chosen = rq.select(ws, 3, "margin")
    assert chosen.cold_start and chosen.used == "typiclust"
    assert "cold start" in chosen.summary()


def test_select_with_no_labels_at_all(ws, monkeypatch):
    make(ws, monkeypatch, labeled_per_class=0)
    chosen = rq.select(ws, 3)
    assert chosen.used == "typiclust" and len(chosen.image_ids) == 3 and chosen.pred_labels == [None] * 3


def test_dry_run_and_unknown_strategy(ws, monkeypatch):
    make(ws, monkeypatch, labeled_per_class=5)
    rq.choose(ws, 4, dry_run=True)
    assert mf.load(ws)["review_status"].isna().all()
    with pytest.raises(ConfigError, match="valid: .*hybrid"):
        rq.select(ws, 4, "nope")


def test_daily_budget_counts_todays_pushes_only(ws, monkeypatch):
    make(ws, monkeypatch, labeled_per_class=5)
    monkeypatch.setenv("SORTLOOP_REVIEW__DAILY_BUDGET", "10")
    ws = type(ws)(ws.root)  # re-read settings
    now = datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert rq.budget_left(ws, now=now) == 10
    rq.record_pushed(ws, ["a", "b", "c"], counted=3, at=now - timedelta(hours=1))
    rq.record_pushed(ws, ["d"], counted=0, at=now)  # a user move: not counted
    rq.record_pushed(ws, ["e", "f"], counted=2, at=now - timedelta(days=1))  # yesterday
    assert rq.budget_left(ws, now=now) == 7


def test_top_up_fills_the_budget_once(ws, monkeypatch):
    make(ws, monkeypatch, labeled_per_class=5)
    monkeypatch.setenv("SORTLOOP_REVIEW__DAILY_BUDGET", "4")
    ws = type(ws)(ws.root)
    first = rq.top_up(ws)
    assert first is not None and len(first.image_ids) == 4
    assert rq.top_up(ws) is None  # four queued already: nothing more today
    assert rq.queued_count(mf.load(ws)) == 4


def test_push_order_and_budget():
    import pandas as pd

    from labeling.push import select_candidates, within_budget
    from loop.data.manifest import COLUMNS
    from loop.tables import conform

    df = conform(pd.DataFrame({
        "image_id": list("abcdef"),
        "flag": ["low_confidence", "user_moved", "selected", "suspected_mislabel", "low_confidence", "selected"],
        "pred_conf": [0.4, 0.9, 0.8, 0.9, 0.1, 0.2],
        "pred_score": [None, None, None, 0.7, None, None],
        "review_rank": [None, None, 5.0, None, 3.0, 4.0],
        "review_status": [None, None, "queued", None, "queued", "queued"],
        "review_task": pd.array([None] * 6, dtype="Int64"),
    }), COLUMNS)
    order = list(select_candidates(df)["image_id"])
    assert order == ["b", "e", "f", "c", "d", "a"]  # user move, selection by rank, suspect, other flags
    assert list(within_budget(select_candidates(df), 2)["image_id"]) == ["b", "e", "f"]
    assert list(within_budget(select_candidates(df), None)["image_id"]) == order


def test_select_command(ws, monkeypatch):
    from sortloop.cli import app

    make(ws, monkeypatch, labeled_per_class=5)
    result = CliRunner().invoke(app, ["select", "--budget", "3", "--strategy", "margin", "-w", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert "selected 3 of 30 candidate photo(s) with margin" in result.output
    assert rq.queued_count(mf.load(ws)) == 3
    bad = CliRunner().invoke(app, ["select", "--strategy", "nope", "-w", str(ws.root)])
    assert bad.exit_code == 1 and "valid:" in bad.output


def test_a_batch_spreads_over_items(ws, monkeypatch):
    # 10 unlabeled photos per class from 5 items (two views each): a batch takes one view per item first
    labels, true, items = [], [], []
    for c in CLASSES:
        labels += [c] * 5 + [None] * 10
        true += [c] * 15
        items += [f"{c}-lab{n}" for n in range(5)] + [f"{c}-new{n // 2}" for n in range(10)]
    ids = synthetic_workspace(ws, monkeypatch, labels=labels, true=true, items=items, centres=centres_for(CLASSES))
    item_of = dict(zip(ids, items, strict=True))
    for budget in (6, 9):
        chosen = rq.select(ws, budget, "margin")
        assert len({item_of[i] for i in chosen.image_ids}) == budget  # one photo per item
    everything = rq.select(ws, 30, "margin")
    firsts = [item_of[i] for i in everything.image_ids[:15]]
    assert len(set(firsts)) == 15 and len(everything.image_ids) == 30  # every item once, then the seconds
