"""CLI conventions: global options before the command, help that lists choices, output that survives a pipe,
progress bars only when there is something to count, and the small messages that must say the truth."""

from __future__ import annotations

import io
import json

import numpy as np
from rich.console import Console
from typer.testing import CliRunner

from sortloop import console as app_console
from sortloop.cli import app

runner = CliRunner()


# --- 2. global options ---------------------------------------------------------------------------------


def test_workspace_json_and_verbose_work_before_the_command(ws):
    before = runner.invoke(app, ["-w", str(ws.root), "--json", "status"])
    after = runner.invoke(app, ["status", "-w", str(ws.root), "--json"])
    assert before.exit_code == 0 and after.exit_code == 0, before.output + after.output
    assert json.loads(before.stdout)["workspace"] == json.loads(after.stdout)["workspace"] == str(ws.root)
    assert runner.invoke(app, ["-v", "-w", str(ws.root), "models"]).exit_code == 0


def test_the_commands_own_workspace_option_wins_over_the_global_one(ws, tmp_path):
    result = runner.invoke(app, ["-w", str(tmp_path / "nowhere"), "status", "-w", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["workspace"] == str(ws.root)


def test_printed_commands_name_a_sortloop_that_runs(ws, monkeypatch):
    monkeypatch.setattr(app_console.shutil, "which", lambda name: None)  # not on PATH: print the script's path
    hint = app_console.cli_hint("serve", ws.root)
    assert hint.split()[0].endswith("sortloop") and hint.split()[0] != "sortloop"
    assert hint.endswith(f"-w {ws.root} serve")


# --- 7. help shows choices, not <bool> or {src} -------------------------------------------------------------


def test_help_lists_choices_and_no_type_placeholders():
    for args in (["sort"], ["ingest"], ["train"], ["deploy"], ["init"], []):
        text = runner.invoke(app, [*args, "--help"]).output
        assert "<bool>" not in text and "{" not in text, (args, text)
    assert "user|web" in runner.invoke(app, ["ingest", "--help"]).output
    assert "head|finetune" in runner.invoke(app, ["train", "--help"]).output
    assert runner.invoke(app, ["ingest", "x", "--source", "phone"]).exit_code == 2  # refused by the parser


# --- 5. output that survives a pipe -------------------------------------------------------------------------


def test_long_lines_are_not_wrapped_when_stdout_is_not_a_terminal(tmp_path):
    deep = tmp_path / ("a-very-long-folder-name-" * 5) / "workspace"
    result = runner.invoke(app, ["init", str(deep)])
    assert result.exit_code == 0
    assert f"workspace ready: {deep}  (settings: {deep / 'sortloop.toml'})" in result.output.splitlines()


def _capture(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(app_console, "console", Console(file=buffer, width=100))
    return buffer


def test_no_progress_bar_when_nothing_is_counted(monkeypatch):
    buffer = _capture(monkeypatch)
    with app_console.progress_bar("sorting") as update:
        update(0, 0)
        update(0, None)
    assert buffer.getvalue() == ""
    with app_console.progress_bar("training") as update:  # a later phase with nothing to do keeps the bar
        update(16, 16)
        update(0, 0)
    assert "16/16" in buffer.getvalue() and "0/0" not in buffer.getvalue()


def test_a_progress_bar_is_erased_when_the_work_fails(monkeypatch):
    buffer = _capture(monkeypatch)
    try:
        with app_console.progress_bar("sorting") as update:
            update(1, 10)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert "1/10" not in buffer.getvalue()
    buffer = _capture(monkeypatch)
    with app_console.progress_bar("sorting") as update:
        update(10, 10)
    assert "10/10" in buffer.getvalue()


def test_an_error_is_one_line_without_a_bar_before_it(ws, tmp_path):
    result = runner.invoke(app, ["-w", str(ws.root), "sort", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith("error: no model is deployed yet")


# --- 7. small truths -----------------------------------------------------------------------------------------


def test_rollback_on_an_empty_workspace_says_nothing_was_deployed(ws):
    result = runner.invoke(app, ["-w", str(ws.root), "rollback"])
    assert result.exit_code == 1
    assert "no model has been deployed yet (run `sortloop train` then `sortloop deploy`)" in result.output


def test_a_sort_that_copied_nothing_does_not_report_a_rate():
    from loop.sorting.folder import SortReport

    assert "images/s" not in SortReport(src="a", dest="b", seen=3, already_sorted=3, seconds=0.4).summary()
    assert "5.0 images/s" in SortReport(src="a", dest="b", seen=2, copied=2, seconds=0.4).summary()


def test_precision_of_a_class_never_predicted_is_null():
    from loop.model.evaluate import classification_metrics

    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]])
    per_class = classification_metrics(["a", "b"], probs, ["a", "b", "c"])["per_class"]
    assert per_class["a"]["precision"] == 0.5
    assert per_class["b"]["precision"] is None and per_class["c"]["precision"] is None
    assert per_class["c"]["recall"] is None


def test_labelstudio_status_does_not_call_another_workspaces_server_ours(ws, monkeypatch):
    from labeling import server

    monkeypatch.setattr(server, "is_healthy", lambda url, timeout=2.0: True)  # something answers on the port
    info = server.status(ws)  # ...but this workspace started nothing
    assert not info.running and info.foreign
    result = runner.invoke(app, ["-w", str(ws.root), "labelstudio", "status"])
    assert result.exit_code == 1
    assert "this workspace's Label Studio is NOT running; something else answers" in result.output


def test_the_sortloop_command_s_entry_imports_nothing_heavy_for_each_worker_to_repeat():
    """Every decode worker re-runs the parent's main script (a spawned one always; a forked one too before
    Python 3.13, `pool_context`), and the `sortloop` command's script only imports `sortloop`: had that pulled
    in the CLI, pandas or the model runtime, each worker of each sort would import them again first."""
    import subprocess
    import sys

    heavy = ["pandas", "typer", "rich", "torch", "fastai", "onnxruntime", "label_studio_sdk", "loop"]
    code = ("import sys, sortloop; print(','.join(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:]))))")
    out = subprocess.run([sys.executable, "-c", code, *heavy], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`import sortloop` imports {out.stdout.strip()}"
