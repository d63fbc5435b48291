"""`review push`: flagged images become Label Studio tasks with the model's guess pre-filled.

Candidates are manifest rows with a `flag` (or `review_status == "queued"`) that were not reviewed yet
and are not known to be in the project. "Known" is checked twice, because Label Studio ids are no
permanent keys: the manifest's `review_task` hint (trusted only for the project it was set in), and the
`image_id` (sha256) stored in every task of the project, listed before importing. So an image is never
imported twice, even after a crash between an import and the manifest write.
Order: user moves first; then the photos `loop.review.queue` selected (by `review_rank`: the strategy's
order, topped up at each push to `review.daily_budget`); then audit suspects (`suspected_mislabel`, surest
first); then other flags, lowest confidence first. Everything but user moves counts against the daily
budget (`history/pushes.jsonl`), so a reviewer gets the most useful photos and a bounded day's work.
Each photo is published into the served folder first (`labeling.served`: a copy named by its hash); a
photo that may not be served (a symlink leaving its folder, missing, changed) is not sent, and is reported
in `PushReport.refused` (it stays flagged: the next push tries again).
Tasks go in batches through Label Studio's own bulk import (`Client.import_tasks`: the SDK's request,
encoded once; the payloads are built in `labeling.payloads`). The next batch is published and built while
the server imports the current one (one import in flight). The manifest learns the new task ids every
`HINT_WRITE_S` seconds and when the push ends (also by an error), not after every batch: each write
rewrites the whole manifest, which cost more than the payloads at 10k tasks (`bench/labelstudio.py`).
Caveat: a row that was reviewed (`review_status` reviewed/skipped) is not pushed again even if it is
flagged again later; set `review_status` to "queued" to ask for a second look.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from labeling import payloads, served
from labeling.client import Client, connect
from labeling.project import ensure_project, remembered_project
from loop.data import manifest as mf
from loop.flags import LOW_CONFIDENCE, SELECTED, SUSPECTED_MISLABEL, UNFAMILIAR, USER_MOVED
from loop.progress import ProgressCallback
from loop.review import queue
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

DONE_STATUSES = ("reviewed", "skipped")
HINT_WRITE_S = 10.0  # write `review_task` hints to the manifest at most this often during a push (and at its end)


@dataclass(frozen=True)
class PushReport:
    """What one push did."""

    url: str
    project_id: int
    candidates: int  # rows that wanted a task
    imported: int  # new tasks created
    linked: int  # already in the project: manifest hint restored, nothing imported
    batches: int
    seconds: float
    project_created: bool = False
    refused: dict[str, str] = field(default_factory=dict)  # image_id -> why its photo may not be served
    waiting: int = 0  # photos wanting review held back by today's budget (they go first tomorrow)
    daily_budget: int = 0  # review.daily_budget (0: no limit)
    by_reason: dict[str, int] = field(default_factory=dict)  # what the new tasks are: REASONS -> count

    @property
    def ok(self) -> bool:
        return not self.refused

    def summary(self) -> str:
        what = ", ".join(f"{n} {reason}" for reason, n in self.by_reason.items() if n)
        text = (f"sent {self.imported} photo(s) for review{f' ({what})' if what else ''} to "
                f"{self.url}/projects/{self.project_id} ({self.linked} already there, {self.batches} batch(es), "
                f"{self.seconds:.1f} s)")
        if self.waiting:
            text += (f"\n{self.waiting} more wait for review: today's budget is spent (review.daily_budget = "
                     f"{self.daily_budget} a day, besides photos people moved); they go first tomorrow")
        for reason in list(self.refused.values())[:10]:
            text += f"\n  not sent: {reason}"
        if len(self.refused) > 10:
            text += f"\n  ... and {len(self.refused) - 10} more not sent"
        return text


def select_candidates(df: pd.DataFrame, *, trust_hints: bool = True) -> pd.DataFrame:
    """Rows to push, most useful first: user moves, selected (by rank), suspects, then lowest `pred_conf`.

    Args:
        df: the manifest.
        trust_hints: treat rows with `review_status == "pushed"` and a `review_task` as already pushed
            (False when the project changed since those hints were written).
    """
    status = df["review_status"].astype(object)
    wanted = df["flag"].notna().to_numpy() | (status == "queued").to_numpy(bool)
    done = status.isin(DONE_STATUSES).to_numpy(bool)
    pushed = (status == "pushed").to_numpy(bool) & df["review_task"].notna().to_numpy()
    if not trust_hints:
        pushed[:] = False
    rows = df[wanted & ~done & ~pushed].copy()
    flag = rows["flag"].astype(object)
    ranked = rows["review_rank"].notna().to_numpy()
    suspect = (flag == SUSPECTED_MISLABEL).to_numpy(bool)
    rows["_group"] = np.select([(flag == USER_MOVED).to_numpy(bool), ranked, suspect], [0, 1, 2], 3)
    rows["_key"] = np.where(ranked, rows["review_rank"].to_numpy(float, na_value=np.nan),
                            np.where(suspect, -rows["pred_score"].to_numpy(float, na_value=np.nan),
                                     rows["pred_conf"].to_numpy(float, na_value=np.nan)))
    rows = rows.sort_values(["_group", "_key", "image_id"], na_position="last")
    return rows.drop(columns=["_group", "_key"])


# Why a photo is sent for review, in the words `sort`, `status` and `review push` share (in push order).
REASONS = {USER_MOVED: "moved by a person", SELECTED: "chosen to teach the model most",
           SUSPECTED_MISLABEL: "labels that look wrong", LOW_CONFIDENCE: "flagged by sort as unsure",
           UNFAMILIAR: "like none of the labeled photos"}


def reason_counts(rows: pd.DataFrame) -> dict[str, int]:
    """How many of `rows` are sent for each reason of `REASONS` (a queued row with no flag: "selected")."""
    flag = rows["flag"].astype(object).where(rows["flag"].notna(), SELECTED)
    counts = flag.value_counts()
    return {words: int(counts.get(key, 0)) for key, words in REASONS.items()}


def within_budget(rows: pd.DataFrame, left: int | None) -> pd.DataFrame:
    """User moves, then at most `left` other rows (None: all), keeping the order."""
    if left is None:
        return rows
    moved = (rows["flag"].astype(object) == USER_MOVED).to_numpy(bool)
    keep = moved | (np.cumsum(~moved) <= left)
    return rows[keep]


def project_image_ids(client: Client, project_id: int, *, page_size: int = 1000) -> dict[str, int]:
    """`image_id -> task id` for every sortloop task in the project (light listing: id and data only)."""
    found: dict[str, int] = {}
    for page in client.pages(f"list the tasks of project {project_id}", client.tasks.list, project=project_id,
                             page_size=page_size, fields="task_only", include="id,data"):
        for t in page:
            image_id = payloads.task_image_id({"data": t.data, "meta": t.meta})
            if image_id:
                found.setdefault(image_id, int(t.id))
    return found


def _mark_pushed(ws: Workspace, task_ids: dict[str, int]) -> None:
    """Record `review_task` and `review_status = pushed` for these image ids, in one manifest write."""
    if not task_ids:
        return

    def change(df: pd.DataFrame) -> pd.DataFrame:
        hit = df["image_id"].isin(task_ids.keys())
        df.loc[hit, "review_task"] = df.loc[hit, "image_id"].map(task_ids).astype("Int64")
        df.loc[hit, "review_status"] = "pushed"
        return df

    mf.update(ws, change)


def _prepared_batches(ws: Workspace, rows: pd.DataFrame, batch_size: int,
                      refused: dict[str, str]) -> Iterator[tuple[pd.DataFrame, list[dict]]]:
    """(manifest rows, their task payloads) per batch, in order. Only published photos become tasks: the
    server may show nothing else (`labeling.served`); the others are added to `refused` (image_id -> why)."""
    for begin in range(0, len(rows), batch_size):
        batch = rows.iloc[begin:begin + batch_size]
        names, bad = served.publish(ws, dict(zip(batch["image_id"], batch["path"].astype(str), strict=True)))
        refused.update(bad)
        batch = batch[batch["image_id"].isin(names.keys())]
        if not batch.empty:  # records: 2x faster than iterrows
            yield batch, [payloads.task(row, names[row["image_id"]]) for row in batch.to_dict("records")]


def push(ws: Workspace, *, limit: int | None = None, select: bool = True,
         on_progress: ProgressCallback | None = None) -> PushReport:
    """Send flagged and selected manifest rows to the workspace's Label Studio project as tasks with predictions.

    Args:
        limit: push at most this many (the most useful first); None = all within today's budget.
        select: first top up today's selection (`loop.review.queue.top_up`, strategy `review.strategy`).
        on_progress: called with (tasks done, total) after each batch.

    Raises:
        LabelStudioError: the server is unreachable, refuses the token, or rejects a batch (rows of
            earlier batches stay recorded as pushed; rerunning continues where it stopped).

    Example:
        >>> push(open_workspace("data")).summary()   # doctest: +SKIP
        'sent 42 photo(s) for review (42 flagged by sort as unsure) to http://127.0.0.1:8080/projects/1 (0 already
        there, 1 batch(es), 0.4 s)'
    """
    start = time.monotonic()
    batch_size = ws.settings.labelstudio.push_batch_size
    if select:
        queue.top_up(ws)
    hints: dict[str, int] = {}  # image_id -> task id: imported, not yet written to the manifest
    with connect(ws) as client, ExitStack() as on_exit:
        on_exit.callback(lambda: _mark_pushed(ws, hints))  # also on an error: earlier batches stay recorded
        previous = remembered_project(ws, client.url)
        df = mf.load(ws)
        project = ensure_project(client, ws)
        trust = previous == project.id and not project.created
        wanted = select_candidates(df, trust_hints=trust)
        rows = within_budget(wanted, queue.budget_left(ws))
        held = len(wanted) - len(rows)
        if limit is not None:
            rows = rows.head(limit)
        total = len(rows)
        budget = ws.settings.review.daily_budget
        if total == 0:
            return PushReport(client.url, project.id, 0, 0, 0, 0, time.monotonic() - start, project.created,
                              waiting=held, daily_budget=budget)

        # Already in the project (a crash after an import, or hints from another project): link, don't import.
        existing = {} if project.created else project_image_ids(client, project.id)
        linked = {i: existing[i] for i in rows["image_id"] if i in existing}
        _mark_pushed(ws, linked)
        rows = rows[~rows["image_id"].isin(linked.keys())]

        imported, batches, written, refused = 0, 0, time.monotonic(), {}
        if on_progress:
            on_progress(len(linked), total)
        # One import in flight at a time, in a worker thread, while this thread publishes and builds the next
        # batch: the server's work and ours overlap. The next import is sent only after this one answered.
        sender = on_exit.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sortloop-push"))
        prepared = _prepared_batches(ws, rows, batch_size, refused)
        upcoming = next(prepared, None)
        while upcoming is not None:
            batch, tasks = upcoming
            # not idempotent: an import is never retried once sent (no duplicate tasks; a rerun relinks)
            sending = sender.submit(client.call, f"import {len(tasks)} tasks into project {project.id}",
                                    client.import_tasks, project.id, tasks, idempotent=False,
                                    rerun_hint="run the push again (it never imports an image twice)")
            upcoming = next(prepared, None)
            ids = sending.result()
            if len(ids) != len(tasks):
                logger.warning("import returned %d task ids for %d tasks; relisting the project", len(ids), len(tasks))
                listed = project_image_ids(client, project.id)
                mapping = {i: listed[i] for i in batch["image_id"] if i in listed}
            else:
                mapping = dict(zip(batch["image_id"], ids, strict=True))
            hints.update(mapping)
            if time.monotonic() - written >= HINT_WRITE_S:  # a kill -9 loses at most these (relinked next time)
                _mark_pushed(ws, hints)
                hints.clear()
                written = time.monotonic()
            counted = int((batch["flag"].astype(object) != USER_MOVED).sum())
            queue.record_pushed(ws, list(mapping), counted=counted)
            imported += len(tasks)
            batches += 1
            if on_progress:
                on_progress(len(linked) + imported, total)
        logger.info("pushed %d task(s) to project %s in %d batch(es)", imported, project.id, batches)
        sent = rows[~rows["image_id"].isin(refused.keys())]
        return PushReport(client.url, project.id, total, imported, len(linked), batches,
                          time.monotonic() - start, project.created, refused, waiting=held, daily_budget=budget,
                          by_reason=reason_counts(sent))
