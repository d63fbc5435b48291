"""`sortloop labelstudio up|down` and `sortloop review listen`: each calls its one library function and prints.

The server itself is tested against a real Label Studio in tests/integration; here the library functions are
replaced, so what is checked is the command layer: arguments in, the library's answer out.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import labeling.server
import labeling.webhook
from sortloop import jobs
from sortloop.cli import app

runner = CliRunner()


def test_up_starts_the_server_and_shows_the_first_password_once(ws, monkeypatch) -> None:
    calls = []
    creds = SimpleNamespace(username="admin@sortloop.local", password="s3cret-once")
    monkeypatch.setattr(labeling.server, "status", lambda w: SimpleNamespace(running=False))
    monkeypatch.setattr(labeling.server, "up", lambda w: calls.append(w.root) or SimpleNamespace(
        url="http://127.0.0.1:8080", pid=4242, credentials=creds, first_start=True))
    result = runner.invoke(app, ["labelstudio", "up", "-w", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert calls == [ws.root]
    assert "starting Label Studio" in result.output and "http://127.0.0.1:8080 (pid 4242)" in result.output
    assert "login: admin@sortloop.local" in result.output and "s3cret-once" in result.output

    monkeypatch.setattr(labeling.server, "up", lambda w: SimpleNamespace(
        url="http://127.0.0.1:8080", pid=4242, credentials=creds, first_start=False))
    again = runner.invoke(app, ["labelstudio", "up", "-w", str(ws.root)])
    assert again.exit_code == 0 and "s3cret-once" not in again.output  # shown by the first start only


@pytest.mark.parametrize(("was_running", "said"), [(True, "stopped Label Studio"),
                                                   (False, "Label Studio was not running")])
def test_down_says_whether_a_server_was_stopped(ws, monkeypatch, was_running: bool, said: str) -> None:
    monkeypatch.setattr(labeling.server, "down", lambda w: was_running)
    result = runner.invoke(app, ["labelstudio", "down", "-w", str(ws.root)])
    assert result.exit_code == 0 and said in result.output


def test_listen_pulls_on_each_event_and_stops_the_receiver_on_ctrl_c(ws, monkeypatch) -> None:
    stopped = []

    def fake_listen(w, on_event):
        on_event()  # a reviewer saved: the command pulls and prints what the pull did
        return SimpleNamespace(stop=lambda: stopped.append(True))

    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(labeling.webhook, "listen", fake_listen)
    monkeypatch.setattr(labeling.webhook, "receiver_url", lambda w: "http://127.0.0.1:8099/hook")
    monkeypatch.setattr(jobs, "pull_reviews", lambda w: SimpleNamespace(summary=lambda: "pulled 2 changed task(s)"))
    monkeypatch.setattr(time, "sleep", ctrl_c)
    result = runner.invoke(app, ["review", "listen", "-w", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert "pulled 2 changed task(s)" in result.output
    assert "listening for Label Studio at http://127.0.0.1:8099/hook" in result.output
    assert stopped == [True]
