"""read_ahead: the decode stream asks the kernel to read queued photos before the workers get to them, so a sort
from a cold disk decodes while the disk reads. Residency is read with util-linux `fincore` (mincore: it reads
nothing itself, unlike a probing read, which starts a read-ahead of its own)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from loop.data import decode
from loop.data.images import read_ahead

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise") or shutil.which("fincore") is None,
                                reason="posix_fadvise and util-linux fincore: Linux")

SIZE = 4 << 20


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def _cold_file(path: Path) -> Path:
    with open(path, "wb") as fh:
        fh.write(os.urandom(SIZE))
        fh.flush()
        os.fsync(fh.fileno())  # clean pages: the advice below can drop them
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def _wait_resident(path: Path, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (resident := _resident_bytes(path)) < SIZE and time.monotonic() < deadline:
        time.sleep(0.02)
    return resident


def test_advised_files_come_into_memory_and_others_stay_on_disk(tmp_path):
    advised, control = _cold_file(tmp_path / "advised.jpg"), _cold_file(tmp_path / "control.jpg")
    if _resident_bytes(advised) or _resident_bytes(control):
        pytest.skip("this file system keeps the pages of fsynced files (the advice to drop them was ignored)")

    read_ahead([advised])

    assert _wait_resident(advised) == SIZE
    assert _resident_bytes(control) == 0  # nothing else read them: the advice did


def test_what_cannot_be_read_ahead_is_left_to_the_decoder(tmp_path):
    """A FIFO named like a photo (opening it would block), a missing file and a folder: skipped, no error."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "folder.jpg").mkdir()
    read_ahead([fifo, tmp_path / "missing.jpg", tmp_path / "folder.jpg"])  # returns: a blocking open would hang


def test_the_decode_stream_reads_every_queued_photo_ahead_once(tmp_path, monkeypatch):
    advised: list[Path] = []
    monkeypatch.setattr(decode, "read_ahead", lambda paths: advised.extend(paths))
    paths = [tmp_path / f"missing_{i}.jpg" for i in range(10)]  # unreadable: each comes back with its error
    with decode.decode_stream(paths, 32, workers=1, chunk=3, prefetch=2) as stream:
        out = list(stream)
    assert [rec.path for rec in out] == paths and not any(rec.ok for rec in out)
    assert advised == paths
