"""Typos and wrong workspaces are one clear line: an unknown class, flag, review status or source names the
valid values (with a "did you mean"), exit 2; `-w` at a file is one line; `status` says whose Label Studio
answered."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from typer.testing import CliRunner

from loop.data.ingest import ingest_folder
from sortloop.cli import app
from tests.conftest import make_image


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def labeled_ws(ws, tmp_path):
    folder = tmp_path / "labeled"
    for i, cls in enumerate(("chair", "table")):
        for j in range(3):
            make_image(folder / cls / f"{j}.jpg", (40 * i + 10 * j, 90, 200 - 30 * j))
    ingest_folder(ws, folder, labeled=True)
    return ws


@pytest.mark.parametrize(("option", "typo", "valid", "guess"), [
    ("--label", "chiar", "chair, none, table", "chair"),
    ("--flag", "low_confidense", "low_confidence, none, selected, suspected_mislabel, unfamiliar, user_moved",
     "low_confidence"),
    ("--review", "reviewd", "none, pushed, queued, reviewed, skipped", "reviewed"),
    ("--source", "usr", "none, user, web", "user"),
    ("--label-source", "folders", "folder, none, review, user_move", "folder"),
    ("--split", "vaild", "none, train, valid", "valid"),
])
def test_a_typo_in_a_labels_filter_names_the_valid_values(labeled_ws, option, typo, valid, guess):
    result = run("-w", str(labeled_ws.root), "labels", option, typo)
    assert result.exit_code == 2, result.output
    assert f"no such value {typo!r} (did you mean {guess!r}?); valid: {valid}" in result.output
    assert "photo(s)" not in result.output and "Traceback" not in result.output
    ok = run("-w", str(labeled_ws.root), "labels", option, guess)  # the right spelling still works
    assert ok.exit_code == 0, ok.output


def test_a_declared_class_with_no_photo_yet_is_a_valid_filter(ws):
    assert run("init", str(ws.root), "--classes", "table,console").exit_code == 0
    result = run("-w", str(ws.root), "labels", "--label", "console")
    assert result.exit_code == 0 and "0 photo(s)" in result.output


def test_a_workspace_that_is_a_file_is_one_line_for_every_command_and_for_init(tmp_path):
    afile = tmp_path / "afile.json"
    afile.write_text("{}")
    for args in (["-w", str(afile), "status"], ["init", str(afile)], ["-w", str(afile / "ws"), "init"]):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.strip().splitlines() == [
            f"error: {afile} is a file, not a workspace folder; give a folder (e.g. -w ./data)"], args
    assert afile.read_text() == "{}"


def test_init_declares_categories_and_rejects_a_bad_list(tmp_path):
    root = tmp_path / "ws"
    result = run("init", str(root), "--classes", "table, console,cabinet,table")
    assert result.exit_code == 0 and "categories: table, console, cabinet" in result.output
    again = run("init", str(root), "--classes", "desk")  # adds, keeps the config
    assert again.exit_code == 0 and "categories: table, console, cabinet, desk" in again.output
    for bad, why in (("a/b,c", "path separator"), (" , ,", "give your categories")):
        result = run("init", str(tmp_path / "other"), "--classes", bad)
        assert result.exit_code == 1 and why in result.output
        assert not (tmp_path / "other").exists()  # a bad list creates nothing


class _ForeignLabelStudio(BaseHTTPRequestHandler):
    """A Label Studio that is someone else's: healthy, but it refuses this workspace's token."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/health" else 401)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


def test_status_says_the_label_studio_it_reached_belongs_to_another_workspace(ws, monkeypatch):
    from labeling import server

    httpd = HTTPServer(("127.0.0.1", 0), _ForeignLabelStudio)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("SORTLOOP_LABELSTUDIO__PORT", str(httpd.server_port))
        server.write_credentials(server.credentials_path(ws), server.Credentials("admin@x", "pw", "our-token"))
        result = run("-w", str(ws.root), "status")
        assert result.exit_code == 0, result.output
        line = next(x for x in result.output.splitlines() if x.startswith("labelstudio"))
        assert "reachable" in line and "NOT this workspace's server" in line and "labelstudio.port" in line
        json_out = run("-w", str(ws.root), "--json", "status")
        assert '"whose": "another"' in json_out.output
    finally:
        httpd.shutdown()
