"""The command line: every command is listed, and library errors become one line with a non-zero exit."""

from __future__ import annotations

from typer.testing import CliRunner

from sortloop.cli import app

runner = CliRunner()

COMMANDS = ["init", "ingest", "train", "deploy", "rollback", "models", "sort", "scan", "serve", "status",
            "report", "demo", "labelstudio", "review", "labels", "history", "watch"]


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in result.output, name


def test_commands_on_a_missing_workspace_fail_with_one_line_and_the_fix(tmp_path):
    for args in (["status"], ["train"], ["sort", str(tmp_path), str(tmp_path / "out")], ["review", "push"]):
        result = runner.invoke(app, [*args, "-w", str(tmp_path / "nowhere")])
        assert result.exit_code == 1, args
        assert "not a sortloop workspace; run `sortloop init" in result.output, args
        assert "Traceback" not in result.output


def test_sort_without_a_deployed_model_says_how_to_get_one(ws, tmp_path):
    result = runner.invoke(app, ["sort", str(tmp_path), str(tmp_path / "out"), "-w", str(ws.root)])
    assert result.exit_code == 1
    assert "no model is deployed yet; run `sortloop train` then `sortloop deploy`" in result.output
