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
    are the fork server's children, not this process's.

    Why the family is found through each thread's `children` file: reading the status of every process on
    the machine took 2.5 ms of CPU a sample here, in the process being measured (~1% of the CPUs a sort
    shares with its decoders); the kernels without those files still get that scan."""

    def __init__(self) -> None:
        self.main_mb = 0.0
        self.child_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        me = os.getpid()
        self._by_children_files = Path(f"/proc/{me}/task/{me}/children").exists()

    @staticmethod
    def _rss_mb(pid: str) -> float | None:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        line = next((line for line in text.splitlines() if line.startswith("VmRSS:")), None)
        return int(line.split()[1]) / 1024 if line else None

    @staticmethod
    def _children(pid: str) -> list[str]:
        """The processes started by any thread of `pid` (the fork server is started by a helper thread)."""
        found: list[str] = []
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return found
        for tid in tasks:
            try:
                found += Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            except OSError:  # the thread ended meanwhile
                continue
        return found

    def _descendants(self, me: str) -> set[str]:
        if self._by_children_files:
            family, todo = {me}, [me]
            while todo:
                for child in self._children(todo.pop()):
                    if child not in family:
                        family.add(child)
                        todo.append(child)
            return family - {me}
        parents = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            parents[pid] = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        family, grew = {me}, True
        while grew:
            below = {pid for pid, parent in parents.items() if parent in family}
            grew, family = not below <= family, family | below
        return family - {me}

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.1):
            self.main_mb = max(self.main_mb, self._rss_mb(me) or 0.0)
            for pid in self._descendants(me):
                self.child_mb = max(self.child_mb, self._rss_mb(pid) or 0.0)

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


def cpu_summary(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model and its integer-SIMD level, e.g. "AMD EPYC (avx2, no VNNI)": INT8 speed and, with 8-bit
    weights, INT8 answers differ between CPUs with and without VNNI (loop.model.quantize), so a run says which."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    simd = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    vnni = [f for f in ("avx512_vnni", "avx_vnni") if f in flags]
    return f"{model} ({simd}, {'VNNI: ' + ' '.join(vnni) if vnni else 'no VNNI'})"


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
