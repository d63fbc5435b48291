"""A tree deeper than the system's path limit: its unlisted folder is reported, never silently missing."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from loop.data.ingest import ingest_folder
from sortloop.cli import app
from tests.conftest import make_image
from tests.helpers.sorting import deploy_copy

PATH_MAX = os.pathconf("/", "PC_PATH_MAX")


def deep_tree(root: Path) -> Path:
    """`root/shallow.jpg` and one photo below folders whose path exceeds PATH_MAX; returns the top folder."""
    make_image(root / "shallow.jpg", (10, 200, 10))
    here = os.open(root, os.O_RDONLY)
    depth = PATH_MAX // 200 + 2
    for _ in range(depth):  # made relative to each folder's descriptor: no long path is ever passed
        os.mkdir("d" * 200, dir_fd=here)
        nxt = os.open("d" * 200, os.O_RDONLY, dir_fd=here)
        os.close(here)
        here = nxt
    fd = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=here)
    os.write(fd, (root / "shallow.jpg").read_bytes())
    os.close(fd)
    os.close(here)
    return root


def test_ingest_reports_a_folder_too_deep_to_list_and_exits_1(ws, tmp_path) -> None:
    root = deep_tree(tmp_path / "photos")
    report = ingest_folder(ws, root)
    assert report.added == 1
    assert any("folder not read" in why for _, why in report.unreadable)  # silently missing before
    result = CliRunner().invoke(app, ["ingest", str(root), "--workspace", str(ws.root)])
    assert result.exit_code == 1 and "folder not read" in result.output


def test_sort_reports_a_folder_too_deep_to_list_and_exits_1(ws, sort_model, tmp_path) -> None:
    root = deep_tree(tmp_path / "photos")
    deploy_copy(ws, sort_model)
    result = CliRunner().invoke(app, ["sort", str(root), str(tmp_path / "sorted"), "--workspace", str(ws.root)])
    assert result.exit_code == 1, result.output  # "sorted 1 files", exit 0 before
    assert "folder not read" in result.output
