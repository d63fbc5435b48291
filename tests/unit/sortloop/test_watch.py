"""`serve` says what it will run and when, runs pull and push at start-up, and `sortloop watch` registers the
inboxes and sorted trees it sorts and scans (editing the workspace config safely)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from typer.testing import CliRunner

from loop.errors import ConfigError
from loop.folders import watchlist
from loop.workspace import Workspace
from sortloop import jobs, schedule
from sortloop.cli import app
from tests.unit.sortloop.test_schedule import counted, utc_env, wait_for  # noqa: F401  (fixtures)

runner = CliRunner()


def test_watch_add_list_remove_edit_the_config_and_keep_its_comments(ws, tmp_path):
    inbox, dest = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    w = ["-w", str(ws.root)]
    result = runner.invoke(app, [*w, "watch", "add", str(inbox), str(dest)])
    assert result.exit_code == 0 and f"watching {inbox} -> {dest}" in result.output, result.output
    assert "already watching" in runner.invoke(app, [*w, "watch", "add", str(inbox), str(dest)]).output
    assert Workspace(ws.root).settings.schedule.inboxes == [(inbox, dest)]
    assert "# nightly at 02:00" in ws.config_file.read_text()  # comments survive

    listed = json.loads(runner.invoke(app, [*w, "--json", "watch", "list"]).stdout)
    assert listed == {"inboxes": [{"inbox": str(inbox), "dest": str(dest)}], "sorted_trees": [str(dest)]}

    dest.mkdir()
    assert runner.invoke(app, [*w, "watch", "add-tree", str(dest)]).exit_code == 0
    assert Workspace(ws.root).settings.schedule.sorted_trees == [dest]
    assert "no longer scanning" in runner.invoke(app, [*w, "watch", "remove-tree", str(dest)]).output
    assert "no longer watching" in runner.invoke(app, [*w, "watch", "remove", str(inbox)]).output
    fresh = Workspace(ws.root).settings.schedule
    assert fresh.inboxes == [] and fresh.sorted_trees == []


def test_watch_refuses_bad_folders_and_leaves_the_config_alone(ws, tmp_path):
    before = ws.config_file.read_text()
    with pytest.raises(ConfigError, match="is not a folder; create it first"):
        watchlist.add_inbox(ws, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "inbox").mkdir()
    with pytest.raises(ConfigError, match="inside one another"):
        watchlist.add_inbox(ws, tmp_path / "inbox", tmp_path / "inbox" / "sorted")
    result = runner.invoke(app, ["-w", str(ws.root), "watch", "add-tree", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "is not a folder" in result.output
    assert ws.config_file.read_text() == before


def test_serve_describes_each_job_and_names_the_off_ones_with_the_fix(ws, utc_env):  # noqa: F811
    scheduler = schedule.build_scheduler(Workspace(ws.root), scheduler_cls=BackgroundScheduler,
                                         start_now=schedule.START_NOW)
    lines = schedule.describe_jobs(ws, scheduler, sortloop=".venv/bin/sortloop")
    text = "\n".join(lines)
    assert len(lines) == len(schedule.JOB_IDS)
    assert "pull brings reviewers' labels back from Label Studio now, then every 10 minutes" in text
    assert "push sends newly flagged photos to Label Studio now, then every 10 minutes" in text
    assert "scan is off: no sorted tree registered; turn it on with: .venv/bin/sortloop watch add-tree DEST" in text
    assert "watch is off: no inbox registered; turn it on with: .venv/bin/sortloop watch add INBOX DEST" in text
    retrain = next(line for line in lines if line.startswith("retrain"))
    assert "every night at 02:00 (UTC); next run " in retrain and "Trigger" not in text


def test_serve_runs_pull_and_push_at_start_up(ws, utc_env, counted):  # noqa: F811
    scheduler = schedule.build_scheduler(Workspace(ws.root), scheduler_cls=BackgroundScheduler,
                                         start_now=schedule.START_NOW)
    start = datetime.now(UTC)
    scheduler.start()
    try:
        assert wait_for(lambda: {"pull", "push"} <= set(counted), timeout=20)
    finally:
        scheduler.shutdown(wait=True)
    assert "retrain" not in counted
    assert all(datetime.fromisoformat(r["start"]) >= start for r in jobs.read_job_log(ws))
