"""The loop as a service: `sortloop serve` runs pull, push, scan, watch and the nightly retrain on a schedule.

One APScheduler 3.x scheduler per workspace, guarded by a lock file (`runs/serve.lock`), with its job store
in its own SQLite file (`runs/scheduler.sqlite`) so schedules survive a restart. Jobs have fixed ids
(`pull`, `push`, `scan`, `watch`, `retrain`); each is `sortloop.jobs.run_job(job_id, workspace_root)`,
which opens the workspace, runs one step and appends the outcome to the job log (`runs/jobs.jsonl`) that
`sortloop status` reads. Steps run one at a time (a process-wide mutex), so a retrain never races a pull.
`coalesce=True` plus a generous `misfire_grace_time` make a nightly run missed while the machine was off
run exactly once at start-up.

Caveat: `replace_existing=True` alone would overwrite the stored next run time on every start and silently
drop a missed night; `build_scheduler` therefore keeps the stored next run time of any job whose trigger
and arguments did not change.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
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

from loop.errors import ConfigError, WorkspaceError
from loop.tables import held_or_refused
from loop.workspace import Workspace
from sortloop.jobs import STOP, append_job_log, now_utc, sorted_trees

logger = logging.getLogger(__name__)

JOB_IDS = ("pull", "push", "scan", "watch", "retrain")
START_NOW = ("pull", "push", "scan")  # `serve` runs these at start-up, then on their interval
JOBSTORE_FILE = "scheduler.sqlite"
CONFIG_HINT = "sortloop.toml's [schedule]"
LOCK_FILE = "serve.lock"



def jobstore_path(ws: Workspace) -> Path:
    return ws.runs_dir / JOBSTORE_FILE


def lock_path(ws: Workspace) -> Path:
    return ws.runs_dir / LOCK_FILE


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
    if sorted_trees(ws):
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


def build_scheduler(
    ws: Workspace, *, scheduler_cls: type[BaseScheduler] = BlockingScheduler, start_now: tuple[str, ...] = ()
) -> BaseScheduler:
    """A scheduler (not started) with every configured job in the workspace's persistent job store.

    A job whose trigger and arguments are unchanged keeps its stored next run time, so a run missed while
    nothing was serving fires once at start-up (coalesce) if it is within `schedule.misfire_grace_s`.
    Jobs no longer configured (e.g. `watch` after the inboxes were removed) are dropped from the store.
    Jobs named in `start_now` run as soon as the scheduler starts (`serve` does this for pull and push).

    Example:
        >>> from apscheduler.schedulers.background import BackgroundScheduler
        >>> scheduler = build_scheduler(open_workspace("data"), scheduler_cls=BackgroundScheduler)  # doctest: +SKIP
        >>> [job.id for job in scheduler.get_jobs()]                                            # doctest: +SKIP
        ['pull', 'push', 'retrain']
    """
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    sched = ws.settings.schedule
    wanted = triggers(ws)
    quarantine_damaged_jobstore(ws)
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
        if job_id in start_now:
            kwargs["next_run_time"] = datetime.now(UTC)
        elif (
            old is not None
            and old.next_run_time is not None
            and _trigger_key(old.trigger) == _trigger_key(trigger)
            and list(old.args) == [job_id, root]
        ):
            kwargs["next_run_time"] = old.next_run_time
        scheduler.add_job(
            "sortloop.jobs:run_job",
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
                "end": now_utc().isoformat(),
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


def jobstore_problem(ws: Workspace) -> str | None:
    """One line if the job store file exists but is not a readable SQLite database, else None."""
    import sqlite3

    path = jobstore_path(ws)
    if not path.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            con.execute("SELECT name FROM sqlite_master").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return (f"{path} is damaged ({exc}); `sortloop serve` moves it aside and rebuilds the schedule from "
                f"{CONFIG_HINT}")
    return None


def quarantine_damaged_jobstore(ws: Workspace) -> None:
    """Move a damaged job store aside (`.damaged`): it holds only the schedule, rebuilt from the config."""
    problem = jobstore_problem(ws)
    if problem is None:
        return
    path = jobstore_path(ws)
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    logger.warning("%s; moved to %s and rebuilt", problem.split(";")[0], aside)


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


# --- saying what will run when ------------------------------------------------------------------------------

WHAT = {
    "pull": "brings reviewers' labels back from Label Studio",
    "push": "sends newly flagged photos to Label Studio",
    "scan": "records photos moved between category folders of the sorted trees as corrections",
    "watch": "sorts new photos from the inboxes",
    "retrain": "pulls, trains a candidate and deploys it if it beats the deployed model",
}
TURN_ON = {
    "scan": "no sorted tree registered; turn it on with: {sortloop} watch add-tree DEST (then restart serve)",
    "watch": "no inbox registered; turn it on with: {sortloop} watch add INBOX DEST (then restart serve)",
}


def _when(trigger: BaseTrigger) -> str:
    if isinstance(trigger, IntervalTrigger):
        minutes = trigger.interval.total_seconds() / 60
        return f"every {minutes:g} minute{'s' if minutes != 1 else ''}"
    if isinstance(trigger, CronTrigger):
        fields = {f.name: str(f) for f in trigger.fields}
        if all(fields[k] == "*" for k in ("day", "month", "day_of_week")) and fields["hour"].isdigit() \
                and fields["minute"].isdigit():
            return f"every night at {int(fields['hour']):02d}:{int(fields['minute']):02d} ({trigger.timezone})"
        return f"on the schedule {trigger} ({trigger.timezone})"
    return str(trigger)


def describe_jobs(
    ws: Workspace, scheduler: BaseScheduler, *, now: datetime | None = None, sortloop: str = "sortloop"
) -> list[str]:
    """One readable sentence per job: what it does, how often, and its next run in local time.

    Jobs that are off because nothing is configured (scan, watch) are named with the command that turns
    them on (`sortloop`: how to type the command here). Works on a scheduler that is not started yet (next
    runs are then computed from the triggers).
    """
    now = now or datetime.now(UTC)
    jobs = {job.id: job for job in scheduler.get_jobs()}
    lines = []
    for job_id in JOB_IDS:
        job = jobs.get(job_id)
        if job is None:
            lines.append(f"{job_id} is off: " + TURN_ON.get(job_id, "not configured").format(sortloop=sortloop))
            continue
        nxt = getattr(job, "next_run_time", None) or job.trigger.get_next_fire_time(None, now)
        if nxt is None:
            lines.append(f"{job_id} {WHAT[job_id]} {_when(job.trigger)}; no further run")
        elif nxt <= now + timedelta(seconds=5):
            lines.append(f"{job_id} {WHAT[job_id]} now, then {_when(job.trigger)}")
        else:
            local = nxt.astimezone().strftime("%a %d %b at %H:%M %Z")
            lines.append(f"{job_id} {WHAT[job_id]} {_when(job.trigger)}; next run {local}")
        if job_id == "scan":
            lines += [f"  scans {tree}" for tree in sorted_trees(ws)]
    return lines


# --- serving ---------------------------------------------------------------------------------------------


@contextmanager
def serve_lock(ws: Workspace) -> Iterator[None]:
    """Hold the workspace's serve lock; raises WorkspaceError at once if another process holds it."""
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    with held_or_refused(lock_path(ws), WorkspaceError(
            f"another `sortloop serve` is already running on {ws.root} (lock {lock_path(ws)}); "
            "stop it first, or use another workspace")):
        yield


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
        scheduler = build_scheduler(ws, scheduler_cls=scheduler_cls, start_now=START_NOW)
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
            ws, {"job": "serve", "start": now_utc().isoformat(), "ok": True, "summary": f"started (pid {os.getpid()})"}
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
            append_job_log(ws, {"job": "serve", "end": now_utc().isoformat(), "ok": True, "summary": "stopped"})
