"""kill -9 in the middle of an apply or a re-sort: every copy stays in one place, and the next run finishes.

A child process runs the real `apply_labels` / `resort` and SIGKILLs itself at a chosen moment: right after
the n-th move (an atomic no-replace rename), right after the n-th hard link on the link + unlink path
(systems without renameat2; the old name is not removed yet), or after every file moved but before the
copy records were written. The parent then checks the tree as the kill left it and after the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from loop.data import manifest
from loop.folders import corrections, moves
from loop.folders.apply import apply_labels
from loop.folders.resort import resort, resort_runs, undo_resort
from loop.sorting import copies
from tests.helpers.sorting import files_under, ikea_classes, sort_sample
from tests.unit.folders.test_resort import deploy_reversed, tree_state

REPO = Path(__file__).resolve().parents[3]

CHILD = """
import os, signal, sys
from loop.sorting import copies
from loop.folders import moves
from loop.workspace import open_workspace

root, dest, job, moment, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
ws = open_workspace(root)
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
count = [0]
if moment == "after_move":  # the n-th copy was just renamed (atomic), nothing recorded yet
    real_rename = moves.rename_noreplace
    def rename(src, dst):
        done = real_rename(src, dst)
        count[0] += 1
        if count[0] == n:
            die()
        return done
    moves.rename_noreplace = rename
elif moment == "after_link":  # no renameat2 here: the n-th copy has its new name, the old one not removed yet
    moves._RENAMEAT2 = None
    real_link = os.link
    def link(src, dst, *a, **k):
        real_link(src, dst, *a, **k)
        count[0] += 1
        if count[0] == n:
            die()
    moves.os.link = link
elif moment == "before_records":  # every file moved, nothing recorded yet
    moves.copies.update_records = die
if job == "apply":
    from loop.folders.apply import apply_labels
    apply_labels(ws)
else:
    from loop.folders.resort import resort
    resort(ws, dest)
raise SystemExit("not killed")
"""


def kill_child(ws, dest: Path, job: str, moment: str, n: int = 2) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ws.root), str(dest), job, moment, str(n)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert moves.journal_path(ws).exists()  # the job was left half done


def places(dest: Path) -> dict[str, list[Path]]:
    """image_id -> the files under dest holding its bytes."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in files_under(dest):
        found[hashlib.sha256(path.read_bytes()).hexdigest()].append(path)
    return found


def assert_each_copy_in_one_place(ws, dest: Path, *, hard_links_allowed: bool = False) -> None:
    records = copies.load_records(ws, dest)
    where = places(dest)
    for image_id in set(records.image_id):
        paths = where.get(image_id, [])
        assert paths, f"copy of {image_id[:12]} lost"
        inodes = {os.stat(p).st_ino for p in paths}
        assert len(inodes) == 1, f"copy of {image_id[:12]} duplicated: {paths}"
        if not hard_links_allowed:
            assert len(paths) == 1, f"copy of {image_id[:12]} has two names: {paths}"


def assert_records_match_disk(ws, dest: Path) -> None:
    records = copies.load_records(ws, dest)
    assert sorted(records.dest_path) == sorted(str(p) for p in files_under(dest))
    for rec in records.itertuples():
        assert hashlib.sha256(Path(rec.dest_path).read_bytes()).hexdigest() == rec.image_id
        assert Path(rec.dest_path).relative_to(dest).parts[0] == rec.category
    scanned = corrections.scan(ws, dest)
    assert scanned.moves == [] and scanned.deleted == []  # no move of sortloop's taken for a person's


@pytest.fixture
def tree(ws, sort_model, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SORTLOOP_SORT__WORKERS", "0")  # a handful of photos: no decoder processes to start
    fresh, _, dest = sort_sample(ws, sort_model, shared_data, tmp_path)
    return fresh, dest, copies.load_records(fresh, dest), ikea_classes(shared_data)


@pytest.mark.parametrize("moment", ["after_move", "after_link", "before_records"])
def test_kill_mid_apply(tree, moment) -> None:
    ws, dest, records, classes = tree
    changes = [manifest.LabelChange(r.image_id, next(c for c in classes if c != r.label), "review", "r@test")
               for r in records.itertuples()]
    manifest.set_labels(ws, changes)

    kill_child(ws, dest, "apply", moment)

    assert_each_copy_in_one_place(ws, dest, hard_links_allowed=moment == "after_link")
    again = apply_labels(ws)  # recovers the interrupted run first, then finds nothing left to do
    assert again.moved == [] and not moves.journal_path(ws).exists()
    assert_each_copy_in_one_place(ws, dest)
    assert_records_match_disk(ws, dest)
    labels = manifest.load(ws).set_index("image_id")["label"]
    for rec in copies.load_records(ws, dest).itertuples():
        assert rec.category == labels[rec.image_id] and rec.placed_by == "apply"


@pytest.mark.parametrize("moment", ["after_move", "before_records"])
def test_kill_mid_resort_then_undo(tree, sort_model, moment) -> None:
    ws, dest, records, _ = tree
    before = tree_state(dest)
    deploy_reversed(ws, sort_model)

    kill_child(ws, dest, "resort", moment)

    assert_each_copy_in_one_place(ws, dest, hard_links_allowed=moment == "after_link")
    assert resort(ws, dest).moves == []  # the interrupted run is finished first: nothing left to move
    assert not moves.journal_path(ws).exists()
    assert_each_copy_in_one_place(ws, dest)
    assert_records_match_disk(ws, dest)
    (run,) = resort_runs(ws)
    assert len([m for m in run["moves"] if m["final"]]) >= 2
    assert all(r == "v0002" for r in copies.load_records(ws, dest).query("placed_by == 'resort'").model_version)

    undone = undo_resort(ws, run["run_id"])
    assert undone.left == [] and tree_state(dest) == before
    assert json.loads(moves.log_path(ws, undone.run_id).read_text())["info"]["undoes"] == run["run_id"]
