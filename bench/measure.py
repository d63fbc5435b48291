"""Helpers shared by the benchmarks: peak resident memory of this process and its children, a scratch folder.

Caveat: Linux only (reads /proc); sampling every 0.1 s can miss a spike shorter than that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PeakRSS:
    """Samples VmRSS of this process and of its descendants every 0.1 s (Linux /proc): the decode workers
    are the fork server's children, not this process's."""

    def __init__(self) -> None:
        self.main_mb = 0.0
        self.child_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status(pid: str) -> dict[str, str]:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return {}
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.1):
            mine = self._status(me)
            if "VmRSS" in mine:
                self.main_mb = max(self.main_mb, int(mine["VmRSS"].split()[0]) / 1024)
            every = {pid: self._status(pid) for pid in filter(str.isdigit, os.listdir("/proc"))}
            family, grew = {me}, True
            while grew:
                below = {pid for pid, f in every.items() if f.get("PPid", "").strip() in family}
                grew, family = not below <= family, family | below
            for pid in family - {me}:
                if "VmRSS" in every[pid]:
                    self.child_mb = max(self.child_mb, int(every[pid]["VmRSS"].split()[0]) / 1024)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Steal:
    """Share of CPU time the hypervisor gave to other guests while the block ran (Linux /proc/stat "steal";
    None elsewhere): a shared VM's speed drifts with it, and a round whose sort saw more of it than its
    limits did is slower for reasons outside the code."""

    def __enter__(self) -> Steal:
        self.share: float | None = None
        self._start = _cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_times()
        if self._start and end:
            total = sum(end) - sum(self._start)
            self.share = (end[7] - self._start[7]) / total if total > 0 else 0.0


def _cpu_times() -> list[int] | None:
    try:
        with open("/proc/stat") as fh:
            return [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def settle() -> None:
    """Write back the dirty pages of earlier work (the photos just generated, a baseline's unsynced copies)
    before a timed part starts, so the kernel's writeback of them does not run inside it: a timed sort still
    pays for its own copies (it fsyncs them)."""
    if hasattr(os, "sync"):  # POSIX
        os.sync()


def read_into_cache(paths: list[Path]) -> None:
    """Read every file once, so the timed part that follows reads them from memory as the parts it is compared
    with did. Why: a VM's proactive reclaim (DAMON here) pages out files untouched for about a minute, and one
    round's sort then read its photos from disk at ~20 MB/s (hashing took 198 ms a photo instead of 2)."""
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass


def evict_from_cache(paths: list[Path]) -> None:
    """Write back, then drop these files from the page cache (POSIX_FADV_DONTNEED on clean pages), so the next
    reader gets them from disk, as a sort of photos nobody opened today does. Linux only."""
    settle()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextmanager
def scratch_folder(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A temp folder for a benchmark's generated photos and workspace; removed afterwards unless `keep`."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield scratch
    finally:
        if keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
