"""The scheduler: job ids and options, persisted schedules across restarts, missed nightly runs, the serve lock,
graceful SIGTERM, the job log, and the retrain skip rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from typer.testing import CliRunner

from loop.errors import ManifestError, WorkspaceError
from loop.workspace import Workspace
from sortloop import jobs, schedule
from sortloop.cli import app

REPO = Path(__file__).resolve().parents[3]


def fresh(ws: Workspace) -> Workspace:
    """A new Workspace object, so settings are re-read (environment changes take effect)."""
    return Workspace(ws.root)


def wait_for(predicate, timeout: float = 20.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture
def utc_env(monkeypatch):
    monkeypatch.setenv("SORTLOOP_SCHEDULE__TIMEZONE", "UTC")
    monkeypatch.setenv("SORTLOOP_SCHEDULE__RETRAIN_CRON", "0 2 * * *")


@pytest.fixture
def counted(monkeypatch):
    """Replace every step with a recorder, so scheduling is tested without Label Studio or training."""
    calls: list[str] = []

    def make(job_id):
        def step(ws):
            calls.append(job_id)
            return jobs.Outcome(f"{job_id} ran")

        return step

    for job_id in schedule.JOB_IDS:
        monkeypatch.setitem(jobs.STEPS, job_id, make(job_id))
    jobs.STOP.clear()
    return calls


def test_jobs_have_fixed_ids_options_and_a_store_in_the_workspace(ws, utc_env, monkeypatch, tmp_path):
    monkeypatch.setenv("SORTLOOP_SCHEDULE__INBOXES", json.dumps([[str(tmp_path / "in"), str(tmp_path / "out")]]))
    monkeypatch.setenv("SORTLOOP_SCHEDULE__MISFIRE_GRACE_S", "1234")
    ws = fresh(ws)
    scheduler = schedule.build_scheduler(ws, scheduler_cls=BackgroundScheduler)
    scheduler.start(paused=True)
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {"pull", "push", "scan", "watch", "retrain"}
        for job_id, job in jobs.items():
            assert job.func_ref == "sortloop.jobs:run_job"
            assert job.args == (job_id, str(ws.root))
            assert job.coalesce is True and job.max_instances == 1 and job.misfire_grace_time == 1234
        assert str(jobs["retrain"].trigger) == "cron[month='*', day='*', day_of_week='*', hour='2', minute='0']"
        assert jobs["pull"].trigger.interval == timedelta(minutes=10)
    finally:
        scheduler.shutdown(wait=False)
    assert schedule.jobstore_path(ws).is_file() and schedule.jobstore_path(ws).parent == ws.runs_dir
    # read back without any scheduler: what `status` uses
    assert set(schedule.next_run_times(ws)) == set(jobs)


def test_unconfigured_scan_and_watch_are_not_scheduled_and_are_removed(ws, utc_env, monkeypatch, tmp_path):
    monkeypatch.setenv("SORTLOOP_SCHEDULE__INBOXES", json.dumps([[str(tmp_path / "in"), str(tmp_path / "out")]]))
    first = schedule.build_scheduler(fresh(ws), scheduler_cls=BackgroundScheduler)
    first.start(paused=True)
    first.shutdown(wait=False)
    monkeypatch.delenv("SORTLOOP_SCHEDULE__INBOXES")
    second = schedule.build_scheduler(fresh(ws), scheduler_cls=BackgroundScheduler)
    second.start(paused=True)
    try:
        assert {job.id for job in second.get_jobs()} == {"pull", "push", "retrain"}
    finally:
        second.shutdown(wait=False)


def _stop_with_retrain_due_at(ws: Workspace, when: datetime) -> None:
    """Run a scheduler once (paused, nothing executes), then leave the store as if the machine went off
    while the nightly run was due at `when` (edited in the store itself: a live scheduler would act on it)."""
    scheduler = schedule.build_scheduler(ws, scheduler_cls=BackgroundScheduler)
    scheduler.start(paused=True)
    scheduler.shutdown(wait=False)
    store = SQLAlchemyJobStore(url=f"sqlite:///{schedule.jobstore_path(ws)}")
    store.start(schedule._StoreReader(), "default")
    job = store.lookup_job("retrain")
    job._modify(next_run_time=when)
    store.update_job(job)
    store.shutdown()


def _three_nights_ago(ws: Workspace) -> datetime:
    trigger = schedule.triggers(ws)["retrain"]
    return trigger.get_next_fire_time(None, datetime.now(UTC) - timedelta(days=3))


def test_restart_runs_a_missed_nightly_retrain_exactly_once(ws, utc_env, counted, monkeypatch):
    # a grace longer than the outage: all three missed nights are still "runnable"; coalesce makes them one
    monkeypatch.setenv("SORTLOOP_SCHEDULE__MISFIRE_GRACE_S", str(5 * 24 * 3600))
    ws = fresh(ws)
    missed_from = _three_nights_ago(ws)
    _stop_with_retrain_due_at(ws, missed_from)  # three nightly runs missed while "off"
    assert schedule.next_run_times(ws)["retrain"] == missed_from

    scheduler = schedule.build_scheduler(fresh(ws), scheduler_cls=BackgroundScheduler)
    scheduler.start()
    try:
        assert wait_for(lambda: counted.count("retrain") >= 1)
        time.sleep(1.0)  # room for any (wrong) extra run
    finally:
        scheduler.shutdown(wait=True)
    assert counted.count("retrain") == 1
    assert counted.count("pull") == 0  # 10-minute intervals are not due yet
    runs = [r for r in jobs.read_job_log(ws) if r["job"] == "retrain"]
    assert len(runs) == 1 and runs[0]["ok"] and runs[0]["summary"] == "retrain ran"
    assert schedule.next_run_times(ws)["retrain"] > datetime.now(UTC)


def test_a_run_missed_beyond_the_grace_time_is_logged_not_run(ws, utc_env, counted, monkeypatch):
    monkeypatch.setenv("SORTLOOP_SCHEDULE__MISFIRE_GRACE_S", "1")
    ws = fresh(ws)
    _stop_with_retrain_due_at(ws, _three_nights_ago(ws))
    scheduler = schedule.build_scheduler(fresh(ws), scheduler_cls=BackgroundScheduler)
    scheduler.start()
    try:
        assert wait_for(lambda: any(r.get("missed") for r in jobs.read_job_log(ws)))
    finally:
        scheduler.shutdown(wait=True)
    assert counted.count("retrain") == 0
    missed = [r for r in jobs.read_job_log(ws) if r.get("missed")]
    assert len(missed) == 1 and missed[0]["job"] == "retrain" and "misfire_grace_s" in missed[0]["summary"]


def test_a_changed_schedule_replaces_the_stored_next_run(ws, utc_env, counted, monkeypatch):
    ws = fresh(ws)
    _stop_with_retrain_due_at(ws, _three_nights_ago(ws))
    monkeypatch.setenv("SORTLOOP_SCHEDULE__RETRAIN_CRON", "30 3 * * *")
    scheduler = schedule.build_scheduler(fresh(ws), scheduler_cls=BackgroundScheduler)
    scheduler.start(paused=True)
    try:
        nxt = scheduler.get_job("retrain").next_run_time
    finally:
        scheduler.shutdown(wait=False)
    assert nxt > datetime.now(UTC) and (nxt.hour, nxt.minute) == (3, 30)


def test_run_job_records_success_expected_failure_and_bugs(ws, monkeypatch):
    jobs.STOP.clear()

    def fails(ws):
        raise ManifestError("manifest is locked")

    def bug(ws):
        raise ZeroDivisionError("oops")

    monkeypatch.setitem(jobs.STEPS, "pull", lambda ws: "pulled 3")
    monkeypatch.setitem(jobs.STEPS, "push", fails)
    monkeypatch.setitem(jobs.STEPS, "scan", bug)
    assert jobs.run_job("pull", str(ws.root))["ok"] is True
    assert jobs.run_job("push", str(ws.root))["error"] == "manifest is locked"
    with pytest.raises(ZeroDivisionError):
        jobs.run_job("scan", str(ws.root))
    log = jobs.read_job_log(ws)
    assert [(r["job"], r["ok"]) for r in log] == [("pull", True), ("push", False), ("scan", False)]
    assert log[0]["summary"] == "pulled 3" and log[2]["error"] == "ZeroDivisionError: oops"
    assert all(r["start"] <= r["end"] for r in log)

    jobs.STOP.set()
    try:
        record = jobs.run_job("pull", str(ws.root))
    finally:
        jobs.STOP.clear()
    assert record["skipped"] and "shutting down" in record["summary"]


def test_scan_and_watch_say_when_nothing_is_configured(ws):
    assert jobs.scan_step(ws).skipped and jobs.watch_step(ws).skipped


def test_second_serve_on_the_same_workspace_refuses(ws):
    with schedule.serve_lock(ws):
        assert schedule.is_serving(ws)
        with pytest.raises(WorkspaceError, match="already running"), schedule.serve_lock(ws):
            pass
        result = CliRunner().invoke(app, ["serve", "--workspace", str(ws.root)])
    assert result.exit_code == 1
    assert "already running" in result.output
    assert not schedule.is_serving(ws)


SERVE_SCRIPT = """
import sys, time
from pathlib import Path
from sortloop import jobs, schedule
from loop.workspace import open_workspace

marks = Path(sys.argv[2])

def slow_pull(ws):
    n = len(list(marks.glob("start-*")))
    (marks / f"start-{n}").touch()
    time.sleep(2.0)  # SIGTERM arrives while this step runs
    (marks / f"end-{n}").touch()
    return "slow pull done"

def fast_triggers(ws, real=schedule.triggers):
    from apscheduler.triggers.interval import IntervalTrigger

    wanted = real(ws)
    wanted["pull"] = IntervalTrigger(seconds=0.6, timezone="UTC")  # the config allows >= 1 minute
    return wanted

jobs.STEPS["pull"] = slow_pull
schedule.triggers = fast_triggers
schedule.serve(open_workspace(sys.argv[1]))
"""


def test_serve_refuses_a_second_process_and_stops_cleanly_on_sigterm(ws, tmp_path, monkeypatch):
    """A real `serve` process: a second one refuses; SIGTERM lets the running step finish, then exits 0."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SERVE_SCRIPT))
    env = {**os.environ, "SORTLOOP_SCHEDULE__TIMEZONE": "UTC", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root), str(marks)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: (marks / "start-0").exists(), timeout=60), "serve never ran the pull job"
        assert schedule.is_serving(ws)
        result = CliRunner().invoke(app, ["serve", "--workspace", str(ws.root)])
        assert result.exit_code == 1 and "already running" in result.output

        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert (marks / "end-0").exists()  # the step in progress finished
    assert not (marks / "start-1").exists()  # and nothing new started after the signal
    log = jobs.read_job_log(ws)
    pulls = [r for r in log if r["job"] == "pull" and not r.get("skipped")]
    assert len(pulls) == 1 and pulls[0]["ok"] and pulls[0]["summary"] == "slow pull done"
    assert [r["summary"] for r in log if r["job"] == "serve"][-1] == "stopped"
    assert not schedule.is_serving(ws)


def test_retrain_is_skipped_when_no_labels_changed_since_the_last_version(ws, tmp_path, monkeypatch):
    from loop.data.ingest import ingest_folder
    from loop.data.manifest import LabelChange, load, set_labels
    from loop.learning.train import labels_fingerprint
    from tests.conftest import make_image

    for i, (cls, color) in enumerate([("red", (200, 10, 10)), ("blue", (10, 10, 200))] * 3):
        make_image(tmp_path / "photos" / cls / f"{i}.jpg", (color[0] + i, color[1] + 5 * i, color[2]))
    ingest_folder(ws, tmp_path / "photos", source="user", labeled=True)
    # a trained version as `train` leaves it: model.json records the labels it was trained on
    version_dir = ws.models_dir / "v0001"
    version_dir.mkdir(parents=True)
    spec = {"version": "v0001", "labels_fingerprint": labels_fingerprint(load(ws)), "created_at": "2026-01-01T00:00Z",
            "architecture": "tf_efficientnet_lite0", "classes": ["blue", "red"], "image_size": 224,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (version_dir / "model.json").write_text(json.dumps(spec))

    pulls = []
    monkeypatch.setitem(jobs.STEPS, "pull", lambda ws: pulls.append(1) or "0 new labels")
    jobs.STOP.clear()
    outcome = jobs.retrain_step(ws)
    assert outcome.skipped and "no new labels since v0001" in outcome.summary and pulls == [1]

    image_id = load(ws)["image_id"].iloc[0]
    set_labels(ws, [LabelChange(image_id, "green", "review", "tester")])
    changed, why = jobs.new_labels_since_last_train(ws)
    assert changed and "v0001" in why


def test_a_shutdown_during_the_nightly_pull_stops_before_training(ws, monkeypatch):
    def pull_then_signal(ws):
        jobs.STOP.set()  # SIGTERM arrives while pull runs
        return "pulled 5 labels"

    monkeypatch.setitem(jobs.STEPS, "pull", pull_then_signal)
    jobs.STOP.clear()
    try:
        outcome = jobs.retrain_step(ws)
    finally:
        jobs.STOP.clear()
    assert outcome.skipped and "pulled 5 labels" in outcome.summary and "stopped before training" in outcome.summary
    assert not any(ws.models_dir.iterdir())  # no version was started
