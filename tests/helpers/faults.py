"""Helpers for the fault tests: a small real disk (tmpfs) that fills up, and child processes that run a
snippet of sortloop and may be killed (SIGKILL) at a chosen moment (`loop.atomic.fault_point`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (e.g. "400k") at `path` for the block; skip the test where that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("disk-full tests mount a small tmpfs, which needs root (run the tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_disk(path: Path, size: str) -> None:
    """Give the tmpfs at `path` more (or less) room: the user freed space."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill_disk(path: Path) -> Path:
    """Write a filler file under `path` until the disk is full; returns it (delete it to free the space)."""
    filler = path / "filler.bin"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError:
            pass
    return filler


def run_child(code: str, *args: str, kill_at: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process (this checkout first on the path); with `kill_at`
    ("event:file-name[:n]") it SIGKILLs itself at that moment."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SORTLOOP_TEST_KILL_AT", None)
    if kill_at:
        env["SORTLOOP_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def hidden_temps(folder: Path) -> list[Path]:
    """Temp files of killed or failed writes under `folder` (atomic writes and safe copies)."""
    return sorted(p for p in folder.rglob(".*.tmp") if p.is_file())
