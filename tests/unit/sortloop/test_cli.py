"""The command line: every command is listed and tested, and library errors become one line with a non-zero
exit."""

from __future__ import annotations

import ast
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from sortloop.cli import app

runner = CliRunner()
TESTS = Path(__file__).resolve().parents[2]


def _commands() -> list[tuple[str, ...]]:
    """Every command of the typer app, as its words: ("sort",), ("review", "push"), ..."""
    found: list[tuple[str, ...]] = []
    for name, command in typer.main.get_command(app).commands.items():
        subcommands = getattr(command, "commands", None)
        found += [(name, sub) for sub in subcommands] if subcommands else [(name,)]
    return found


def _argument_lists() -> list[list[str]]:
    """The string words (options dropped) of every list literal in the tests: the command lines they run."""
    lists = []
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List):
                words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                lists.append([w for w in words if not w.startswith("-")])
    return lists


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in sorted({words[0] for words in _commands()}):
        assert f" {name} " in result.output, name


def test_every_command_is_run_by_a_test():
    lists = _argument_lists()

    def run_somewhere(words: tuple[str, ...]) -> bool:
        n = len(words)
        return any(tuple(seq[i:i + n]) == words for seq in lists for i in range(len(seq) - n + 1))

    untested = [" ".join(words) for words in _commands() if not run_somewhere(words)]
    assert len(_commands()) > 20 and not untested, f"commands no test runs: {untested}"


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


def test_the_console_script_entry_imports_nothing_heavy() -> None:
    """Each decode worker of a sort re-imports the console script (spawn); its module must stay light."""
    import subprocess
    import sys

    code = ("import sys, sortloop; heavy = {'typer', 'rich', 'pandas', 'pydantic', 'numpy', 'torch'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
