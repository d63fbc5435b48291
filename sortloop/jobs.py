"""Jobs: what each scheduled job of `sortloop serve` does, one step at a time, and the job log.

Every job is the module-level `run_job(job_id, workspace_root)` (plain arguments, so the job store can
persist it): it opens the workspace, runs the step `STEPS[job_id]` and appends the outcome to
`runs/jobs.jsonl`, which `sortloop status` reads. Steps run one at a time (a process-wide mutex), so a
retrain never races a pull. The scheduling itself (triggers, job store, lock, signals) is `sortloop.schedule`.

This is the application layer: it composes the core (`loop`) and the Label Studio adapter (`labeling`) with
plain imports. Caveat: a step holds the process-wide mutex for its whole run, so a long retrain delays a pull.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from labeling.pull import PullReport, Rejected, pull
from labeling.push import push
from loop.atomic import append_jsonl, read_jsonl
from loop.errors import SortloopError
from loop.model.artifact import read_spec
from loop.workspace import Workspace, open_workspace

logger = logging.getLogger(__name__)
T = TypeVar("T")

JOB_LOG_FILE = "jobs.jsonl"

# Set by SIGTERM/SIGINT in `serve`: running steps stop at their next step boundary, queued ones do not start.
STOP = threading.Event()
_STEP_MUTEX = threading.Lock()


@dataclass(frozen=True)
class Outcome:
    """What a step did, in one line; `skipped` when it deliberately did nothing."""

    summary: str
    skipped: bool = False


# --- the job log ---------------------------------------------------------------------------


def job_log_path(ws: Workspace) -> Path:
    return ws.runs_dir / JOB_LOG_FILE


def now_utc() -> datetime:
    return datetime.now(UTC)


def append_job_log(ws: Workspace, record: dict[str, Any]) -> None:
    """Append one record (a job run, a missed run, serve start/stop) to `runs/jobs.jsonl`."""
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(job_log_path(ws)) + ".lock", timeout=30):
        append_jsonl(job_log_path(ws), [record], default=str, ensure_ascii=False)


def read_job_log(ws: Workspace) -> list[dict[str, Any]]:
    """Every job-log record, oldest first (a torn last line from a crash is ignored)."""
    return read_jsonl(job_log_path(ws))


# --- running one job ---------------------------------------------------------------------------------


def _summarise(result: Any) -> Outcome:
    if isinstance(result, Outcome):
        return result
    summary = getattr(result, "summary", None)
    if callable(summary):
        return Outcome(str(summary()))
    return Outcome("" if result is None else str(result))


def run_job(job_id: str, root: str) -> dict[str, Any]:
    """Run the step `job_id` on the workspace at `root` and append its outcome to the job log.

    This is the function every scheduled job calls (plain arguments, so the job store can persist it).
    Expected failures (`SortloopError`) are logged and recorded; anything else is recorded and re-raised
    so the scheduler logs the traceback too.

    Returns:
        The job-log record: job, start, end, ok, skipped, summary (or error).
    """
    ws = open_workspace(root)
    with _STEP_MUTEX:
        record: dict[str, Any] = {"job": job_id, "start": now_utc().isoformat()}
        if STOP.is_set():
            record.update(end=now_utc().isoformat(), ok=True, skipped=True, summary="not started: shutting down")
            append_job_log(ws, record)
            return record
        logger.info("job %s: start", job_id)
        unexpected: BaseException | None = None
        try:
            outcome = _summarise(STEPS[job_id](ws))
            record.update(ok=True, skipped=outcome.skipped, summary=outcome.summary)
        except SortloopError as exc:
            record.update(ok=False, skipped=False, error=str(exc))
        except Exception as exc:  # a bug: keep a record for `status`, then let the scheduler log it
            record.update(ok=False, skipped=False, error=f"{type(exc).__name__}: {exc}")
            unexpected = exc
        record["end"] = now_utc().isoformat()
        append_job_log(ws, record)
        if record["ok"]:
            logger.info("job %s: %s", job_id, record["summary"])
        else:
            logger.warning("job %s failed: %s", job_id, record["error"])
        if unexpected is not None:
            raise unexpected
        return record


# --- the steps -----------------------------------------------------------------------------------------


@dataclass
class ReviewPull:
    """A review pull (`labeling.pull.pull`) and what the sorted folders did after it."""

    pulled: PullReport
    folders: str = ""  # what `loop.folders.apply.apply_labels` moved ("" if nothing)
    folders_error: str = ""  # why it moved nothing (e.g. a label unusable as a folder name)

    @property
    def ok(self) -> bool:
        return self.pulled.ok and not self.folders_error

    @property
    def rejected(self) -> list[Rejected]:
        return self.pulled.rejected

    def summary(self) -> str:
        text = self.pulled.summary()
        if self.folders:
            text += f"\n{self.folders}"
        if self.folders_error:
            text += f"\nsorted folders NOT updated: {self.folders_error}"
        return text


def pull_reviews(ws: Workspace) -> ReviewPull:
    """`review pull` and the scheduled pull: reviewers' labels into the manifest, then the sorted folders follow.

    A refusal by `apply_labels` (a label unusable as a folder) loses no label: the labels are in the manifest
    and the watermark moved; it is reported, and the next pull or `apply` retries.
    """
    from loop.folders.apply import apply_labels

    pulled = pull(ws)
    if pulled.project_id is None:
        return ReviewPull(pulled)
    try:
        applied = apply_labels(ws)
    except SortloopError as exc:
        return ReviewPull(pulled, folders_error=str(exc))
    moved_any = applied.moved or applied.placed_by_person or applied.edited or applied.failed
    return ReviewPull(pulled, folders=applied.summary() if moved_any else "")


def _each_until_stop(trees: Iterable[T], step: Callable[[T], str | None]) -> list[str]:
    """`step` on each tree (or inbox) in turn, keeping its line (None: nothing to say); a shutdown request
    stops before the next one."""
    parts: list[str] = []
    for tree in trees:
        if STOP.is_set():
            parts.append("stopped: shutting down")
            break
        line = step(tree)
        if line is not None:
            parts.append(line)
    return parts


def sorted_trees(ws: Workspace) -> list[Path]:
    """Configured sorted trees plus every inbox destination, without duplicates."""
    sched = ws.settings.schedule
    trees: list[Path] = []
    for tree in [*sched.sorted_trees, *(dest for _, dest in sched.inboxes)]:
        if Path(tree) not in trees:
            trees.append(Path(tree))
    return trees


def scan_step(ws: Workspace) -> Outcome:
    """Scan each sorted tree for photos a person moved to another category folder."""
    trees = sorted_trees(ws)
    if not trees:
        return Outcome("no sorted trees configured (schedule.sorted_trees / schedule.inboxes)", skipped=True)
    from loop.folders.corrections import scan

    def scan_one(tree: Path) -> str:
        if not tree.is_dir():
            return f"{tree}: missing, not scanned"
        return f"{tree}: {_summarise(scan(ws, tree)).summary}"

    return Outcome("; ".join(_each_until_stop(trees, scan_one)))


def watch_step(ws: Workspace) -> Outcome:
    """Sort new files in each configured inbox into its destination with the model deployed right now.

    `sort_folder` reads the deployed-model pointer at each call, so a model deployed by the nightly retrain
    is used from the next run on, without restarting `serve`.
    """
    inboxes = ws.settings.schedule.inboxes
    if not inboxes:
        return Outcome("no inboxes configured (schedule.inboxes)", skipped=True)
    from loop.sorting.folder import sort_folder

    def sort_one(inbox: tuple[Path, Path]) -> str:
        src, dest = inbox
        if not Path(src).is_dir():
            return f"{src}: missing, nothing sorted"
        return f"{src} -> {dest}: {_summarise(sort_folder(ws, Path(src), Path(dest))).summary}"

    return Outcome("; ".join(_each_until_stop(inboxes, sort_one)))


def latest_trained(ws: Workspace) -> tuple[str, dict[str, Any]] | None:
    """The newest model version and its model.json, or None before the first training."""
    from loop.learning.registry import list_versions

    versions = list_versions(ws)
    if not versions:
        return None
    version = versions[-1]
    return version, read_spec(ws.models_dir / version)


def new_labels_since_last_train(ws: Workspace) -> tuple[bool, str]:
    """Whether the training data differ from what the newest version was trained on, and why (one line).

    Compares `loop.learning.train.labels_fingerprint` of today's trainable rows with the newest model.json's.
    """
    from loop.learning.train import labeled_rows, labels_fingerprint

    latest = latest_trained(ws)
    if latest is None:
        return True, "no model trained yet"
    version, spec = latest
    if spec.get("labels_fingerprint") == labels_fingerprint(labeled_rows(ws, none_of_these=True)):
        return False, f"no new labels since {version} was trained"
    return True, f"labels changed since {version} was trained"


def retrain_step(ws: Workspace) -> Outcome:
    """The nightly cycle: pull reviews → train a candidate → gate → deploy or refuse → log.

    Skipped, with the reason, when the labels are exactly those the newest version was trained on. A
    failed pull (Label Studio down) is reported and training goes on with the labels already pulled.
    Between steps, a shutdown request stops the cycle.
    """
    parts: list[str] = []
    try:
        parts.append(f"pull: {_summarise(STEPS['pull'](ws)).summary}")
    except SortloopError as exc:
        parts.append(f"pull failed ({exc}); using the labels already in the manifest")
    if STOP.is_set():
        return Outcome("; ".join([*parts, "stopped before training: shutting down"]), skipped=True)

    changed, why = new_labels_since_last_train(ws)
    if not changed:
        return Outcome("; ".join([*parts, f"retrain skipped: {why}"]), skipped=True)

    from loop.learning.train import train

    result = train(ws)
    parts.append(f"{_summarise(result).summary} ({why})")
    if result.unchanged:
        return Outcome("; ".join(parts), skipped=True)
    if STOP.is_set():
        return Outcome("; ".join([*parts, "not deployed: shutting down (run `sortloop deploy` later)"]))

    from loop.learning.deployment import deploy
    from loop.learning.gate import describe_evidence

    decision = deploy(ws, result.version)
    if decision.promoted:
        parts.append(f"deployed {decision.version} ({describe_evidence(decision.evidence)})")
        if STOP.is_set():
            parts.append("not re-sorted: shutting down (run `sortloop resort DEST` later)")
        else:
            parts.append(resort_step(ws).summary)
    else:
        parts.append(f"refused {decision.version}: " + "; ".join(decision.reasons))
    return Outcome("; ".join(parts))


def resort_step(ws: Workspace) -> Outcome:
    """After a deploy: re-sort every sorted tree on record (setting `sort.resort_after_deploy`)."""
    if not ws.settings.sort.resort_after_deploy:
        return Outcome("re-sort off (sort.resort_after_deploy = false)", skipped=True)
    from loop.folders.apply import recorded_roots
    from loop.folders.resort import resort

    def resort_one(root: Path) -> str | None:
        if not Path(root).is_dir():
            return None
        try:
            return resort(ws, root).summary().splitlines()[0]
        except SortloopError as exc:
            return f"re-sort of {root} failed: {exc}"

    parts = _each_until_stop(recorded_roots(ws, None), resort_one)
    return Outcome("; ".join(parts) or "re-sort: no sorted trees on record")


# What each job runs: a function of the Workspace. Tests may swap an entry for a counting function.
STEPS: dict[str, Callable[[Workspace], Any]] = {
    "pull": pull_reviews,
    "push": push,
    "scan": scan_step,
    "watch": watch_step,
    "retrain": retrain_step,
}
