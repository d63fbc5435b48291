"""The loop as a service: `sortloop serve` runs pull, push, scan, watch and the nightly retrain on a schedule.

One APScheduler 3.x scheduler per workspace, guarded by a lock file (`runs/serve.lock`), with its job store
in its own SQLite file (`runs/scheduler.sqlite`) so schedules survive a restart. Jobs have fixed ids
(`pull`, `push`, `scan`, `watch`, `retrain`); each is the module-level `run_job(job_id, workspace_root)`,
which opens the workspace, runs one step and appends the outcome to the job log (`runs/jobs.jsonl`) that
`sortloop status` reads. Steps run one at a time (a process-wide mutex), so a retrain never races a pull.
`coalesce=True` plus a generous `misfire_grace_time` make a nightly run missed while the machine was off
run exactly once at start-up.

Caveat: `replace_existing=True` alone would overwrite the stored next run time on every start and silently
drop a missed night; `build_scheduler` therefore keeps the stored next run time of any job whose trigger
and arguments did not change. Steps that talk to Label Studio are referenced by text
(`"labeling.pull:pull"`), so `loop` never imports `labeling` (labeling depends on loop, not the reverse).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from filelock import FileLock, Timeout

from loop.errors import ConfigError, SortloopError, WorkspaceError
from loop.workspace import Workspace, open_workspace

logger = logging.getLogger(__name__)

JOB_IDS = ("pull", "push", "scan", "watch", "retrain")
JOBSTORE_FILE = "scheduler.sqlite"
JOB_LOG_FILE = "jobs.jsonl"
LOCK_FILE = "serve.lock"

# What each job runs: "module:function" taking the Workspace (text, so loop never imports labeling) or a
# callable. Tests may swap an entry for a counting function.
STEPS: dict[str, str | Callable[[Workspace], Any]] = {
    "pull": "labeling.pull:pull",
    "push": "labeling.push:push",
    "scan": "loop.schedule:scan_step",
    "watch": "loop.schedule:watch_step",
    "retrain": "loop.schedule:retrain_step",
}

# Set by SIGTERM/SIGINT in `serve`: running steps stop at their next step boundary, queued ones do not start.
STOP = threading.Event()
_STEP_MUTEX = threading.Lock()


@dataclass(frozen=True)
class Outcome:
    """What a step did, in one line; `skipped` when it deliberately did nothing."""

    summary: str
    skipped: bool = False


# --- paths and the job log ---------------------------------------------------------------------------


def jobstore_path(ws: Workspace) -> Path:
    return ws.runs_dir / JOBSTORE_FILE


def job_log_path(ws: Workspace) -> Path:
    return ws.runs_dir / JOB_LOG_FILE


def lock_path(ws: Workspace) -> Path:
    return ws.runs_dir / LOCK_FILE


def _now() -> datetime:
    return datetime.now(UTC)


def append_job_log(ws: Workspace, record: dict[str, Any]) -> None:
    """Append one record (a job run, a missed run, serve start/stop) to `runs/jobs.jsonl`."""
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str, ensure_ascii=False) + "\n"
    with FileLock(str(job_log_path(ws)) + ".lock", timeout=30), open(job_log_path(ws), "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_job_log(ws: Workspace) -> list[dict[str, Any]]:
    """Every job-log record, oldest first (a torn last line from a crash is ignored)."""
    path = job_log_path(ws)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring a damaged line in %s", path)
    return records


# --- running one job ---------------------------------------------------------------------------------


def _resolve(step: str | Callable[[Workspace], Any]) -> Callable[[Workspace], Any]:
    if callable(step):
        return step
    module, _, name = step.partition(":")
    return getattr(importlib.import_module(module), name)


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
        record: dict[str, Any] = {"job": job_id, "start": _now().isoformat()}
        if STOP.is_set():
            record.update(end=_now().isoformat(), ok=True, skipped=True, summary="not started: shutting down")
            append_job_log(ws, record)
            return record
        logger.info("job %s: start", job_id)
        unexpected: BaseException | None = None
        try:
            outcome = _summarise(_resolve(STEPS[job_id])(ws))
            record.update(ok=True, skipped=outcome.skipped, summary=outcome.summary)
        except SortloopError as exc:
            record.update(ok=False, skipped=False, error=str(exc))
        except Exception as exc:  # a bug: keep a record for `status`, then let the scheduler log it
            record.update(ok=False, skipped=False, error=f"{type(exc).__name__}: {exc}")
            unexpected = exc
        record["end"] = _now().isoformat()
        append_job_log(ws, record)
        if record["ok"]:
            logger.info("job %s: %s", job_id, record["summary"])
        else:
            logger.warning("job %s failed: %s", job_id, record["error"])
        if unexpected is not None:
            raise unexpected
        return record


# --- the steps -----------------------------------------------------------------------------------------


def _sorted_trees(ws: Workspace) -> list[Path]:
    """Configured sorted trees plus every inbox destination, without duplicates."""
    sched = ws.settings.schedule
    trees: list[Path] = []
    for tree in [*sched.sorted_trees, *(dest for _, dest in sched.inboxes)]:
        if Path(tree) not in trees:
            trees.append(Path(tree))
    return trees


def scan_step(ws: Workspace) -> Outcome:
    """Scan each sorted tree for photos a person moved to another category folder."""
    trees = _sorted_trees(ws)
    if not trees:
        return Outcome("no sorted trees configured (schedule.sorted_trees / schedule.inboxes)", skipped=True)
    from loop.corrections import scan

    parts = []
    for tree in trees:
        if STOP.is_set():
            parts.append("stopped: shutting down")
            break
        if not tree.is_dir():
            parts.append(f"{tree}: missing, not scanned")
            continue
        parts.append(f"{tree}: {_summarise(scan(ws, tree)).summary}")
    return Outcome("; ".join(parts))


def watch_step(ws: Workspace) -> Outcome:
    """Sort new files in each configured inbox into its destination with the model deployed right now.

    `sort_folder` reads the deployed-model pointer at each call, so a model deployed by the nightly retrain
    is used from the next run on, without restarting `serve`.
    """
    inboxes = ws.settings.schedule.inboxes
    if not inboxes:
        return Outcome("no inboxes configured (schedule.inboxes)", skipped=True)
    from loop.sort import sort_folder

    parts = []
    for src, dest in inboxes:
        if STOP.is_set():
            parts.append("stopped: shutting down")
            break
        if not Path(src).is_dir():
            parts.append(f"{src}: missing, nothing sorted")
            continue
        parts.append(f"{src} -> {dest}: {_summarise(sort_folder(ws, Path(src), Path(dest))).summary}")
    return Outcome("; ".join(parts))


def latest_trained(ws: Workspace) -> tuple[str, dict[str, Any]] | None:
    """The newest model version and its model.json, or None before the first training."""
    from loop.registry import list_versions

    versions = list_versions(ws)
    if not versions:
        return None
    version = versions[-1]
    return version, json.loads((ws.models_dir / version / "model.json").read_text())


def new_labels_since_last_train(ws: Workspace) -> tuple[bool, str]:
    """Whether the training data differ from what the newest version was trained on, and why (one line).

    Compares `loop.train.labels_fingerprint` of today's trainable rows with the newest model.json's.
    """
    from loop.train import labeled_rows, labels_fingerprint

    latest = latest_trained(ws)
    if latest is None:
        return True, "no model trained yet"
    version, spec = latest
    if spec.get("labels_fingerprint") == labels_fingerprint(labeled_rows(ws)):
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
        parts.append(f"pull: {_summarise(_resolve(STEPS['pull'])(ws)).summary}")
    except SortloopError as exc:
        parts.append(f"pull failed ({exc}); using the labels already in the manifest")
    if STOP.is_set():
        return Outcome("; ".join([*parts, "stopped before training: shutting down"]), skipped=True)

    changed, why = new_labels_since_last_train(ws)
    if not changed:
        return Outcome("; ".join([*parts, f"retrain skipped: {why}"]), skipped=True)

    from loop.train import train

    result = train(ws)
    parts.append(f"{_summarise(result).summary} ({why})")
    if STOP.is_set():
        return Outcome("; ".join([*parts, "not deployed: shutting down (run `sortloop deploy` later)"]))

    from loop.gate import deploy

    decision = deploy(ws, result.version)
    if decision.promoted:
        parts.append(f"deployed {decision.version}")
    else:
        parts.append(f"refused {decision.version}: " + "; ".join(decision.reasons))
    return Outcome("; ".join(parts))


# --- the scheduler -----------------------------------------------------------------------------------


def _timezone(ws: Workspace) -> Any:
    name = ws.settings.schedule.timezone
    if not name:
        from tzlocal import get_localzone

        return get_localzone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"schedule.timezone: unknown time zone {name!r} (e.g. 'Europe/Paris' or 'UTC')") from None


def triggers(ws: Workspace) -> dict[str, BaseTrigger]:
    """The trigger of every job the config asks for (scan and watch only when something is configured)."""
    sched = ws.settings.schedule
    tz = _timezone(ws)
    try:
        nightly = CronTrigger.from_crontab(sched.retrain_cron, timezone=tz)
    except ValueError as exc:
        raise ConfigError(f"schedule.retrain_cron: {exc} (got {sched.retrain_cron!r}, e.g. '0 2 * * *')") from None
    wanted: dict[str, BaseTrigger] = {
        "pull": IntervalTrigger(minutes=sched.pull_minutes, timezone=tz),
        "push": IntervalTrigger(minutes=sched.push_minutes, timezone=tz),
    }
    if _sorted_trees(ws):
        wanted["scan"] = IntervalTrigger(minutes=sched.scan_minutes, timezone=tz)
    if sched.inboxes:
        wanted["watch"] = IntervalTrigger(minutes=sched.watch_minutes, timezone=tz)
    wanted["retrain"] = nightly
    return wanted


def _trigger_key(trigger: BaseTrigger) -> tuple[str, str, str]:
    return type(trigger).__name__, str(trigger), str(getattr(trigger, "timezone", ""))


class _StoreReader:
    """Just enough of a scheduler for a job store to hand back its jobs, without starting anything."""

    timezone = UTC


def stored_jobs(ws: Workspace) -> dict[str, Any]:
    """The jobs persisted in the workspace's job store, by id (empty if there is none)."""
    if not jobstore_path(ws).exists():
        return {}
    store = SQLAlchemyJobStore(url=f"sqlite:///{jobstore_path(ws)}")
    store.start(_StoreReader(), "default")  # type: ignore[arg-type]
    try:
        return {job.id: job for job in store.get_all_jobs()}
    finally:
        store.shutdown()


def build_scheduler(ws: Workspace, *, scheduler_cls: type[BaseScheduler] = BlockingScheduler) -> BaseScheduler:
    """A scheduler (not started) with every configured job in the workspace's persistent job store.

    A job whose trigger and arguments are unchanged keeps its stored next run time, so a run missed while
    nothing was serving fires once at start-up (coalesce) if it is within `schedule.misfire_grace_s`.
    Jobs no longer configured (e.g. `watch` after the inboxes were removed) are dropped from the store.

    Example:
        >>> from apscheduler.schedulers.background import BackgroundScheduler
        >>> scheduler = build_scheduler(open_workspace("data"), scheduler_cls=BackgroundScheduler)  # doctest: +SKIP
        >>> [job.id for job in scheduler.get_jobs()]                                            # doctest: +SKIP
        ['pull', 'push', 'retrain']
    """
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    sched = ws.settings.schedule
    wanted = triggers(ws)
    previous = stored_jobs(ws)
    scheduler = scheduler_cls(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{jobstore_path(ws)}")},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": sched.misfire_grace_s},
        timezone=_timezone(ws),
    )
    root = str(ws.root)
    for job_id, trigger in wanted.items():
        kwargs: dict[str, Any] = {}
        old = previous.get(job_id)
        if (
            old is not None
            and old.next_run_time is not None
            and _trigger_key(old.trigger) == _trigger_key(trigger)
            and list(old.args) == [job_id, root]
        ):
            kwargs["next_run_time"] = old.next_run_time
        scheduler.add_job(
            "loop.schedule:run_job",
            trigger,
            args=[job_id, root],
            id=job_id,
            name=f"sortloop {job_id}",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=sched.misfire_grace_s,
            **kwargs,
        )
    for job_id in set(previous) - set(wanted):
        _remove_stored_job(ws, job_id)

    def on_missed(event: JobExecutionEvent) -> None:
        append_job_log(
            ws,
            {
                "job": event.job_id,
                "start": None,
                "end": _now().isoformat(),
                "ok": False,
                "skipped": True,
                "missed": True,
                "summary": f"run of {event.scheduled_run_time} missed by more than "
                f"{sched.misfire_grace_s} s (schedule.misfire_grace_s); waiting for the next one",
            },
        )

    scheduler.add_listener(on_missed, EVENT_JOB_MISSED)
    return scheduler


def _remove_stored_job(ws: Workspace, job_id: str) -> None:
    store = SQLAlchemyJobStore(url=f"sqlite:///{jobstore_path(ws)}")
    store.start(_StoreReader(), "default")  # type: ignore[arg-type]
    try:
        store.remove_job(job_id)
        logger.info("job %s is no longer configured; removed from the job store", job_id)
    finally:
        store.shutdown()


def next_run_times(ws: Workspace) -> dict[str, datetime | None]:
    """Next run time of each stored job, read straight from the job store file (nothing is started)."""
    import sqlite3

    path = jobstore_path(ws)
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT id, next_run_time FROM apscheduler_jobs").fetchall()
    except sqlite3.OperationalError:  # the table is created on the first start
        return {}
    finally:
        con.close()
    return {job_id: None if ts is None else datetime.fromtimestamp(ts, UTC) for job_id, ts in rows}


# --- serving ---------------------------------------------------------------------------------------------


@contextmanager
def serve_lock(ws: Workspace) -> Iterator[None]:
    """Hold the workspace's serve lock; raises WorkspaceError at once if another process holds it."""
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(ws)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise WorkspaceError(
            f"another `sortloop serve` is already running on {ws.root} (lock {lock_path(ws)}); "
            "stop it first, or use another workspace"
        ) from None
    try:
        yield
    finally:
        lock.release()


def is_serving(ws: Workspace) -> bool:
    """Whether some process holds the workspace's serve lock right now."""
    if not lock_path(ws).exists():
        return False
    lock = FileLock(str(lock_path(ws)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def serve(
    ws: Workspace,
    *,
    scheduler_cls: type[BaseScheduler] = BlockingScheduler,
    on_started: Callable[[BaseScheduler], None] | None = None,
) -> None:
    """Run the scheduler until SIGTERM/SIGINT; then stop cleanly: running steps finish their current step.

    `on_started(scheduler)` is called once the lock is held and the jobs are scheduled (the CLI prints there).

    Raises:
        WorkspaceError: another `serve` holds this workspace.

    Example:
        >>> serve(open_workspace("data"))   # doctest: +SKIP   (blocks; Ctrl-C to stop)
    """
    with serve_lock(ws):
        STOP.clear()
        scheduler = build_scheduler(ws, scheduler_cls=scheduler_cls)
        stopper: list[threading.Thread] = []

        def request_stop(signum: int, frame: Any) -> None:
            if STOP.is_set():
                return
            logger.info("signal %s: stopping after the current step", signum)
            STOP.set()
            # shutdown(wait=True) joins the worker threads; do it off the signal handler, which may have
            # interrupted the scheduler while it holds its own locks.
            thread = threading.Thread(target=scheduler.shutdown, kwargs={"wait": True}, name="sortloop-stop")
            stopper.append(thread)
            thread.start()

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        append_job_log(
            ws, {"job": "serve", "start": _now().isoformat(), "ok": True, "summary": f"started (pid {os.getpid()})"}
        )
        try:
            if on_started is not None:
                on_started(scheduler)
            scheduler.start()
            if scheduler_cls is not BlockingScheduler:  # a background scheduler: wait here for the signal
                STOP.wait()
        finally:
            for thread in stopper:
                thread.join()
            if scheduler.running:
                scheduler.shutdown(wait=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            append_job_log(ws, {"job": "serve", "end": _now().isoformat(), "ok": True, "summary": "stopped"})
