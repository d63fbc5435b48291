"""`collect_status` / `sortloop status`: model, candidates, counts, flags, jobs and Label Studio reachability."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from typer.testing import CliRunner

from loop.data import manifest
from loop.workspace import Workspace
from sortloop import jobs, schedule
from sortloop.cli import app
from sortloop.status import collect_status, format_status
from tests.helpers.serving import build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def closed_port(monkeypatch) -> int:
    port = free_port()
    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__PORT", str(port))
    return port


def test_empty_workspace(ws, closed_port):
    ws = Workspace(ws.root)
    started = time.monotonic()
    status = collect_status(ws)
    assert time.monotonic() - started < 5
    assert status["model"] is None and status["versions"] == [] and status["candidates"] == []
    assert status["images"]["total"] == 0 and status["labels"]["labeled"] == 0
    assert status["flags"]["waiting"] == 0 and status["serving"] is False
    assert all(job["last_run"] is None and job["next_run"] is None for job in status["jobs"].values())
    assert status["labelstudio"]["reachable"] is False
    assert status["labelstudio"]["url"] == f"http://127.0.0.1:{closed_port}"
    assert "none deployed" in format_status(status)


def test_populated_workspace_counts_match_the_manifest(ws, tmp_path, closed_port):
    built = build(ws, tmp_path)
    ws = Workspace(ws.root)
    status = collect_status(ws)
    df = manifest.load(ws)

    assert status["model"]["version"] == "v0002"
    assert status["model"]["metrics"]["user_valid"]["accuracy"] == built.accuracy["v0002"]
    assert [v["version"] for v in status["versions"]] == ["v0001", "v0002", "v0003"]
    assert [c["version"] for c in status["candidates"]] == ["v0003"]
    assert status["candidates"][0]["last_decision"]["event"] == "refused"

    assert status["images"]["total"] == len(df)
    assert status["images"]["by_source"] == {"user": len(df)}
    assert status["labels"]["by_label_source"] == df["label_source"].value_counts().to_dict()
    for split in ("train", "valid"):
        part = df[df["split"] == split]
        assert status["splits"][split] == {
            "images": len(part), "items": part["item_id"].nunique(), "labeled_images": len(part),
            "user_images": len(part),
        }
    assert status["flags"]["by_reason"] == {"low_confidence": 3, "user_moved": 1}
    assert (status["flags"]["waiting"], status["flags"]["in_review"], status["flags"]["reviewed"]) == (1, 2, 1)
    assert status["flags"]["reviewed_since_last_train"] == 1  # the T0+6h review; earlier ones are in v0003

    text = format_status(status)
    assert "v0002" in text and "0.812" in text and "candidate   v0003" in text
    point = status["model"]["flag_point"]  # sized from the deployed model's catch curve and the default target
    assert point["expected_catch"] >= 0.8 and point["goal"] == "catch 80% of mistakes"
    assert f"flags {point['expected_share']:.0%} of photos, expected to catch {point['expected_catch']:.0%}" in text
    assert "off by 20% on average before, 5% after" in text and "ECE" not in text and ">=" not in text


def test_jobs_show_last_and_next_runs_without_starting_a_scheduler(ws, closed_port, monkeypatch):
    monkeypatch.setenv("SORTLOOP_SCHEDULE__TIMEZONE", "UTC")
    ws = Workspace(ws.root)
    scheduler = schedule.build_scheduler(ws, scheduler_cls=BackgroundScheduler)
    scheduler.start(paused=True)
    expected = {job.id: job.next_run_time for job in scheduler.get_jobs()}
    scheduler.shutdown(wait=False)
    monkeypatch.setitem(jobs.STEPS, "pull", lambda ws: "pulled 2 labels")
    jobs.STOP.clear()
    jobs.run_job("pull", str(ws.root))

    shown = collect_status(ws)["jobs"]
    assert set(expected) == {"pull", "push", "retrain"}
    for job_id, when in expected.items():
        assert shown[job_id]["scheduled"] and datetime.fromisoformat(shown[job_id]["next_run"]) == when
    assert not shown["watch"]["scheduled"]
    assert shown["pull"]["last_run"]["summary"] == "pulled 2 labels" and shown["pull"]["runs"] == 1
    assert shown["push"]["last_run"] is None
    assert datetime.fromisoformat(shown["pull"]["last_run"]["end"]) <= datetime.now(UTC)


class Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        ok = self.path == "/health"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "UP"}' if ok else b"")

    def log_message(self, *args):
        pass


def test_label_studio_reachable_when_health_answers(ws, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("SORTLOOP_LABELSTUDIO__URL", f"http://127.0.0.1:{server.server_port}/")
        status = collect_status(Workspace(ws.root))
    finally:
        server.shutdown()
    assert status["labelstudio"] == {"url": f"http://127.0.0.1:{server.server_port}", "reachable": True,
                                     "detail": "HTTP 200", "whose": "team"}


def test_status_command_json_and_text(ws, tmp_path, closed_port):
    build(ws, tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--json", "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["version"] == "v0002" and data["labelstudio"]["reachable"] is False
    text = runner.invoke(app, ["status", "--workspace", str(ws.root)])
    assert text.exit_code == 0 and "model       v0002" in text.stdout


def test_status_outside_a_workspace_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["status", "--workspace", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "sortloop init" in result.output


def test_status_measures_the_flags_on_the_photos_people_labeled(ws, tmp_path, closed_port):
    """The history keeps what the model said when a person labeled a photo; status counts the mistakes the
    flags had marked among the latest of them."""
    build(ws, tmp_path)
    ws = Workspace(ws.root)
    df = manifest.load(ws)
    unlabeled = df[df["label"].isna()].head(4)
    if len(unlabeled) < 4:  # make four unlabeled photos from labeled ones (their labels taken back)
        ids = df["image_id"].head(4).tolist()
        manifest.set_labels(ws, [manifest.LabelChange(i, None, None, "test") for i in ids])
        unlabeled = manifest.load(ws).set_index("image_id").loc[ids].reset_index()
    ids = unlabeled["image_id"].tolist()
    guesses = {ids[0]: ("chair", "low_confidence"), ids[1]: ("chair", None), ids[2]: ("table", "low_confidence"),
               ids[3]: ("sofa", None)}

    def predicted(frame):
        for i, (label, flag) in guesses.items():
            row = frame["image_id"] == i
            frame.loc[row, "pred_label"], frame.loc[row, "pred_model"], frame.loc[row, "flag"] = label, "v0002", flag
        return frame

    manifest.update(ws, predicted)
    truth = {ids[0]: "bed", ids[1]: "bed", ids[2]: "table", ids[3]: "sofa"}  # two mistakes, one of them flagged
    manifest.set_labels(ws, [manifest.LabelChange(i, c, "review", "r@example.com") for i, c in truth.items()])
    hist = manifest.history(ws).drop_duplicates("image_id", keep="last").set_index("image_id")
    assert hist.loc[ids[0], "pred_label"] == "chair" and hist.loc[ids[0], "flag"] == "low_confidence"
    measured = collect_status(ws)["flags"]["measured"]
    assert (measured["photos"], measured["mistakes"], measured["flagged_mistakes"]) == (4, 2, 1)
    assert "of the last 4 photos a person labeled after sorting, the flags had marked 1 of the model's 2 " \
           "mistakes (50%)" in format_status(collect_status(ws))
