"""One sort at a time per destination: a second sort into the same DEST refuses clearly, and two real
`sortloop sort` processes started together never record a copy twice or list a flag twice."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from typer.testing import CliRunner

from loop.sorting import copies
from sortloop.cli import app
from tests.helpers.faults import REPO
from tests.helpers.sorting import deploy_copy, files_under, sample_ikea

HOLD_LOCK = """
import sys
from pathlib import Path
from loop.sorting import copies
from loop.workspace import open_workspace
with copies.dest_lock(open_workspace(sys.argv[1]), Path(sys.argv[2])):
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the test closes our stdin
"""


def sort_process(ws, src, dest) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from sortloop.cli import app; app()", "sort", str(src), str(dest),
                             "-w", str(ws.root)], env={**os.environ, "PYTHONPATH": str(REPO),
                                                       "SORTLOOP_SORT__FLAG_THRESHOLD": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def review_rows(dest) -> list[tuple[str, str]]:
    path = dest / "_review.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [(row["dest_path"], row["image_id"]) for row in csv.DictReader(fh)]


def test_a_second_sort_into_a_locked_dest_refuses(ws, sort_model, shared_data, tmp_path) -> None:
    deploy_copy(ws, sort_model)
    src, dest = tmp_path / "src", tmp_path / "sorted"
    sample_ikea(shared_data, src, per_class=2, classes=2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ws.root), str(dest)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"  # another process is sorting into DEST
        refused = CliRunner().invoke(app, ["sort", str(src), str(dest), "-w", str(ws.root)])
        assert refused.exit_code == 1 and "another sort is writing into" in refused.output, refused.output
        assert copies.load_records(ws).empty and not (dest.exists() and files_under(dest))
    finally:
        holder.communicate("", timeout=30)
    done = CliRunner().invoke(app, ["sort", str(src), str(dest), "-w", str(ws.root)])
    assert done.exit_code == 0, done.output
    assert len(copies.load_records(ws, dest)) == 4


def test_two_sorts_started_together_record_each_copy_once(ws, sort_model, shared_data, tmp_path) -> None:
    deploy_copy(ws, sort_model)
    src, dest = tmp_path / "src", tmp_path / "sorted"
    photos = sample_ikea(shared_data, src, per_class=4, classes=4)
    procs = [sort_process(ws, src, dest) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, outputs
    for code, output in zip(codes, outputs, strict=True):
        assert code == 0 or "another sort is writing into" in output, output
        assert "Traceback" not in output
    records = copies.load_records(ws, dest)
    assert not records.duplicated(["source_path", "dest_path", "image_id"]).any()
    assert sorted(records["source_path"]) == sorted(map(str, photos))
    assert len(files_under(dest)) == len(photos)
    rows = review_rows(dest)
    assert len(rows) == len(set(rows)) == len(photos)  # threshold 0 flags every photo, once


def test_replayed_records_are_not_added_twice(ws, tmp_path) -> None:
    row = {"record_id": "r1", "image_id": "abc", "source_path": "/in/a.jpg", "dest_path": "/out/x/a.jpg",
           "dest_root": "/out", "status": "present"}
    copies.append_records(ws, [row])
    copies.append_records(ws, [{**row, "record_id": "r2"}])
    assert list(copies.load_records(ws)["record_id"]) == ["r1"]
