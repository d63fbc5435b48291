"""The label history says exactly what the manifest committed, whatever moment a process is killed at.

A child process is SIGKILLed (kill -9) at a chosen moment of a label write (`SORTLOOP_TEST_KILL_AT`: when an
atomic write's temp file is created, or around the history append); then the history must equal the
manifest's labels, the next start removes the dead write's temp file, and retries never add a line twice.
"""

from __future__ import annotations

import signal

import pytest

from loop.data import manifest
from loop.data.ingest import ingest_folder
from loop.workspace import open_workspace
from tests.conftest import make_image
from tests.helpers.faults import hidden_temps, run_child

N = 80
LABEL = """
import sys
from loop.data import manifest
from loop.workspace import open_workspace
ws = open_workspace(sys.argv[1])
ids = list(manifest.load(ws)["image_id"])
manifest.set_labels(ws, [manifest.LabelChange(i, "chair", "review", "ana@example.com") for i in ids])
"""
INGEST = """
import sys
from loop.data.ingest import ingest_folder
from loop.workspace import open_workspace
ingest_folder(open_workspace(sys.argv[1]), sys.argv[2], labeled=True)
"""
KILL_POINTS = [
    "tmp:labels.pending.jsonl",  # before anything is written
    "tmp:manifest.parquet",  # intents written, manifest not replaced
    "append:labels.jsonl",  # manifest replaced, history not appended
    "appended:labels.jsonl",  # history appended, intents not removed
]


def review_lines(ws) -> dict[str, str]:
    """image_id -> label of the history's review lines; fails if an image has two."""
    hist = manifest.history(ws)
    hist = hist[hist["source"] == "review"]
    assert not hist["image_id"].duplicated().any(), "a label change logged twice"
    return dict(zip(hist["image_id"], hist["new_label"], strict=True))


def review_labels(ws) -> dict[str, str]:
    df = manifest.load(ws)
    df = df[df["label_source"] == "review"]
    return dict(zip(df["image_id"], df["label"], strict=True))


@pytest.fixture
def unlabeled(ws, tmp_path):
    for i in range(N):
        make_image(tmp_path / "photos" / f"p{i:03d}.jpg", (3 * i, 255 - 3 * i, (7 * i) % 256))
    assert ingest_folder(ws, tmp_path / "photos").added == N
    return ws


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_kill_during_a_label_write_leaves_history_equal_to_manifest(unlabeled, kill_at) -> None:
    ws = unlabeled
    killed = run_child(LABEL, str(ws.root), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it really died at that moment

    if kill_at.startswith("tmp:"):
        assert hidden_temps(ws.root), "the killed write left no temp file (the kill came at the wrong moment)"
    open_workspace(ws.root)  # the next start removes the dead process's temp files
    assert not hidden_temps(ws.root)
    assert review_lines(ws) == review_labels(ws)  # no phantom line, no missing line
    committed = kill_at.endswith("labels.jsonl")
    assert len(review_labels(ws)) == (N if committed else 0)

    retry = [manifest.LabelChange(i, "chair", "review", "ana@example.com") for i in manifest.load(ws)["image_id"]]
    assert manifest.set_labels(ws, retry) == (0 if committed else N)
    assert manifest.set_labels(ws, retry) == 0  # a second retry changes nothing
    assert review_lines(ws) == review_labels(ws)
    assert len(manifest.history(ws)) == N  # 80 labels, 80 lines


def test_retries_that_keep_dying_add_no_lines(unlabeled) -> None:
    """The red team's case: each retry killed between the history and the manifest write (80 -> 280 lines)."""
    ws = unlabeled
    for _ in range(3):
        assert run_child(LABEL, str(ws.root), kill_at="tmp:manifest.parquet").returncode == -signal.SIGKILL
        assert review_lines(ws) == review_labels(ws) == {}
    assert run_child(LABEL, str(ws.root)).returncode == 0
    assert len(manifest.history(ws)) == N and review_lines(ws) == review_labels(ws)


def test_kill_during_a_labeled_ingest(ws, tmp_path) -> None:
    for i in range(10):
        make_image(tmp_path / "photos" / ("desk" if i % 2 else "bed") / f"p{i}.jpg", (20 * i, 90, 160))
    killed = run_child(INGEST, str(ws.root), str(tmp_path / "photos"), kill_at="tmp:manifest.parquet")
    assert killed.returncode == -signal.SIGKILL
    assert manifest.load(ws).empty and manifest.history(ws).empty  # not committed: no history line
    assert run_child(INGEST, str(ws.root), str(tmp_path / "photos")).returncode == 0
    assert ingest_folder(ws, tmp_path / "photos", labeled=True).added == 0
    hist, df = manifest.history(ws), manifest.load(ws)
    assert len(hist) == 10 and dict(zip(hist["image_id"], hist["new_label"], strict=True)) == dict(
        zip(df["image_id"], df["label"], strict=True))


def test_a_torn_history_line_does_not_swallow_the_next_one(unlabeled) -> None:
    ws = unlabeled
    first, second = list(manifest.load(ws)["image_id"])[:2]
    manifest.set_labels(ws, [manifest.LabelChange(first, "desk", "review", "ana")])
    with open(manifest.history_path(ws), "a", encoding="utf-8") as fh:
        fh.write('{"image_id": "x", "old_lab')  # a kill -9 in the middle of an append
    manifest.set_labels(ws, [manifest.LabelChange(second, "bed", "review", "ana")])
    assert review_lines(ws) == {first: "desk", second: "bed"}
