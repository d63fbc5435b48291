"""Manifest storage: atomic, locked writes; label history; config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from loop.data import manifest
from loop.errors import ConfigError, ManifestError
from loop.workspace import init_workspace, open_workspace

WRITER = textwrap.dedent(
    """
    import sys, pandas as pd
    from loop.data import manifest
    from loop.workspace import open_workspace
    ws = open_workspace(sys.argv[1]); tag = sys.argv[2]; n = int(sys.argv[3]); rows = int(sys.argv[4])
    for i in range(n):
        def add(df, i=i):
            new = pd.DataFrame({"image_id": [f"{tag}-{i}-{k}" for k in range(rows)], "path": "p", "source": "user"})
            return pd.concat([df, new], ignore_index=True)
        manifest.update(ws, add)
        print(i, flush=True)
    """
)


def run_writer(ws_root, tag: str, n: int, rows: int = 1) -> subprocess.Popen:
    args = [sys.executable, "-c", WRITER, str(ws_root), tag, str(n), str(rows)]
    return subprocess.Popen(args, stdout=subprocess.PIPE)


def test_two_writer_processes_never_lose_each_others_rows(ws):
    a, b = run_writer(ws.root, "a", 25), run_writer(ws.root, "b", 25)
    assert a.wait(120) == 0 and b.wait(120) == 0
    ids = set(manifest.load(ws)["image_id"])
    assert {f"a-{i}-0" for i in range(25)} <= ids
    assert {f"b-{i}-0" for i in range(25)} <= ids
    assert len(ids) == 50


def test_kill_9_during_writes_leaves_the_last_good_manifest(ws):
    rows = 20000  # big enough that each write takes a while, so the kill lands mid-write sometimes
    proc = run_writer(ws.root, "k", 10_000, rows)
    completed = -1
    deadline = time.time() + 60
    while completed < 3 and time.time() < deadline:  # let a few writes finish
        completed = int(proc.stdout.readline() or -1)
    time.sleep(0.137)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    df = manifest.load(ws)  # must not raise: the file is always a complete parquet
    assert len(df) % rows == 0 and len(df) >= 4 * rows
    batches = df["image_id"].str.split("-").str[1].astype(int)
    assert sorted(batches.unique()) == list(range(len(df) // rows))  # every batch whole, none missing


def test_set_labels_records_history_and_is_idempotent(ws):
    manifest.update(ws, lambda df: pd.concat([df, pd.DataFrame({"image_id": ["h1", "h2"], "path": ["x", "y"]})]))
    change = manifest.LabelChange("h1", "table", source="review", by="ana@example.com")
    assert manifest.set_labels(ws, [change]) == 1
    assert manifest.set_labels(ws, [change]) == 0  # same label, same source: nothing new
    assert manifest.set_labels(ws, [manifest.LabelChange("h1", "console", "review", "bo@example.com")]) == 1
    row = manifest.load(ws).set_index("image_id").loc["h1"]
    assert (row["label"], row["label_source"], row["label_by"]) == ("console", "review", "bo@example.com")
    hist = manifest.history(ws)
    assert list(zip(hist["old_label"], hist["new_label"], strict=True)) == [(None, "table"), ("table", "console")]
    assert list(hist["by"]) == ["ana@example.com", "bo@example.com"]


def test_set_labels_refuses_unknown_images(ws):
    with pytest.raises(ManifestError, match="not in the manifest"):
        manifest.set_labels(ws, [manifest.LabelChange("nope", "table", "review", "x")])


def test_bad_config_value_is_one_line_naming_the_key(tmp_path, monkeypatch):
    ws = init_workspace(tmp_path / "w")
    ws.config_file.write_text("[sort]\nbatch_size = 'many'\n")
    with pytest.raises(ConfigError) as err:
        open_workspace(ws.root).settings  # noqa: B018
    assert str(err.value).startswith("sort.batch_size:") and "\n" not in str(err.value)
    ws.config_file.write_text("")
    monkeypatch.setenv("SORTLOOP_SPLIT__USER_VALID_FRACTION", "2")
    with pytest.raises(ConfigError, match=r"^split\.user_valid_fraction"):
        open_workspace(ws.root).settings  # noqa: B018


def test_environment_overrides_toml(tmp_path, monkeypatch):
    ws = init_workspace(tmp_path / "w")
    ws.config_file.write_text("[sort]\nflag_threshold = 0.3\n")
    assert open_workspace(ws.root).settings.sort.flag_threshold == 0.3
    monkeypatch.setenv("SORTLOOP_SORT__FLAG_THRESHOLD", "0.7")
    assert open_workspace(ws.root).settings.sort.flag_threshold == 0.7


def test_a_first_label_gives_the_photo_a_stable_split(ws):
    rows = pd.DataFrame({"image_id": ["r1", "r2"], "path": ["x", "y"], "source": "user", "item_id": ["i1", "i2"]})
    manifest.update(ws, lambda df: pd.concat([df, rows]))
    assert manifest.load(ws)["split"].isna().all()  # unlabeled: no side yet
    manifest.set_labels(ws, [manifest.LabelChange("r1", "bed", "review", "ana")])
    first = manifest.load(ws).set_index("image_id")
    assert first.at["r1", "split"] == "train" and pd.isna(first.at["r2", "split"])
    manifest.set_labels(ws, [manifest.LabelChange("r1", "sofa", "review", "bo")])  # relabel keeps its side
    assert manifest.load(ws).set_index("image_id").at["r1", "split"] == "train"


def test_a_history_line_torn_by_a_crash_does_not_hide_the_others(ws):
    manifest.update(ws, lambda df: pd.concat([df, pd.DataFrame({"image_id": ["t1"], "path": ["x"]})]))
    manifest.set_labels(ws, [manifest.LabelChange("t1", "desk", "review", "ana")])
    with open(manifest.history_path(ws), "a", encoding="utf-8") as fh:
        fh.write('{"image_id": "t1", "old_lab')  # a kill -9 in the middle of an append
    hist = manifest.history(ws)
    assert list(hist["new_label"]) == ["desk"]
