"""Every command survives a missing or torn state file, with one line that says how to repair it."""

from __future__ import annotations

import json
import shutil

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from typer.testing import CliRunner

from loop.data import manifest
from loop.learning import registry
from sortloop import schedule
from sortloop.cli import app
from sortloop.status import collect_status
from tests.conftest import make_image
from tests.helpers.serving import build


@pytest.fixture(autouse=True)
def closed_port(monkeypatch):
    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__PORT", "9")  # nothing listens: status does not wait


def run(ws, *args: str):
    return CliRunner().invoke(app, [*args, "--workspace", str(ws.root)])


def one_line_error(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.output


def test_a_torn_current_json_is_one_line_for_sort_and_status_and_deploy_repairs_it(ws, tmp_path) -> None:
    build(ws, tmp_path)
    registry.pointer_path(ws).write_text('{"version": "v00')  # torn mid-write by an old version
    make_image(tmp_path / "inbox" / "a.jpg", (1, 2, 3))
    sort = run(ws, "sort", str(tmp_path / "inbox"), str(tmp_path / "sorted"))
    assert sort.exit_code != 0 and "sortloop deploy" in one_line_error(sort)  # JSONDecodeError before
    status = run(ws, "status")
    assert status.exit_code == 0 and "PROBLEM" in status.output and "current.json is damaged" in status.output
    deploy = run(ws, "deploy", "v0002")  # the version the registry log deployed last
    assert deploy.exit_code == 0, deploy.output
    assert registry.current_version(ws) == "v0002" and "PROBLEM" not in run(ws, "status").output


def test_rollback_repairs_a_torn_current_json(ws, tmp_path) -> None:
    build(ws, tmp_path)
    registry.set_current(ws, "v0003")
    registry.append_log(ws, {"event": "promoted", "version": "v0003", "reasons": []})
    registry.pointer_path(ws).write_bytes(b"\x00\x00garbage")
    result = run(ws, "rollback")
    assert result.exit_code == 0, result.output
    assert registry.current_version(ws) == "v0002"


def test_the_deployed_version_folder_deleted_is_a_status_problem_not_a_crash(ws, tmp_path) -> None:
    build(ws, tmp_path)
    shutil.rmtree(ws.models_dir / "v0002")
    result = run(ws, "status")  # FileNotFoundError before
    assert result.exit_code == 0, result.output
    assert "deployed version v0002" in result.output and "sortloop rollback" in result.output


def test_a_garbage_scheduler_db_is_reported_by_status_and_rebuilt_by_serve(ws, tmp_path) -> None:
    build(ws, tmp_path)
    store = schedule.jobstore_path(ws)
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_bytes(b"this is not a database" * 100)
    status = run(ws, "status")  # sqlite3.DatabaseError before
    assert status.exit_code == 0 and "scheduler.sqlite is damaged" in status.output
    scheduler = schedule.build_scheduler(ws, scheduler_cls=BackgroundScheduler)  # what serve builds first
    assert {job.id for job in scheduler.get_jobs()} >= {"pull", "push", "retrain"}
    assert store.with_name(store.name + ".damaged").exists()
    scheduler.start(paused=True)
    scheduler.shutdown(wait=False)
    assert schedule.jobstore_problem(ws) is None


def test_a_history_line_torn_inside_a_multibyte_character_is_skipped_and_counted(ws, tmp_path) -> None:
    build(ws, tmp_path)
    line = json.dumps({"image_id": "x", "new_label": "stół"}, ensure_ascii=False).encode("utf-8")
    torn = line[: line.index("ó".encode()) + 1]  # half of "ó"
    for path in (manifest.history_path(ws), registry.log_path(ws)):
        with open(path, "ab") as fh:
            fh.write(torn)
    n_history = len(manifest.history(ws))  # UnicodeDecodeError before
    assert n_history > 0 and len(registry.read_log(ws)) == 2
    status = collect_status(ws, check_labelstudio=False)
    assert sum("damaged line" in p for p in status["problems"]) == 2
    image = manifest.load(ws)["image_id"].iloc[0]
    assert run(ws, "history", image).exit_code == 0
    with open(manifest.history_path(ws), "ab") as fh:  # a write after the torn line still counts
        fh.write(b"\n")
    assert len(manifest.history(ws)) == n_history
