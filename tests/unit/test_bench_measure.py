"""bench.measure.PeakRSS: the benchmarks' memory figures include the decode workers (grandchildren, through
the fork server), whichever way the family is found."""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from bench.measure import PeakRSS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def _hold_memory(mb: int) -> int:
    block = bytearray(mb << 20)
    block[::4096] = b"x" * len(block[::4096])  # touched: resident, not only reserved
    time.sleep(0.4)
    return len(block)


@pytest.mark.parametrize("by_children_files", [True, False])
def test_peak_rss_sees_the_fork_servers_children(by_children_files: bool) -> None:
    context = multiprocessing.get_context("forkserver")
    with PeakRSS() as rss:
        rss._by_children_files = by_children_files and rss._by_children_files
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            assert pool.submit(_hold_memory, 120).result() == 120 << 20
    assert rss.child_mb >= 120  # the worker, a child of the fork server, not of this process
    assert rss.main_mb > 0


def test_cpu_summary_names_the_model_and_whether_it_has_vnni(tmp_path) -> None:
    from bench.measure import cpu_summary

    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 sha_ni\n\n"
                   "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 sha_ni\n")
    intel = tmp_path / "intel"
    intel.write_text("model name\t: Intel(R) Xeon(R) Platinum 8375C\nflags\t\t: avx2 avx512f avx512_vnni\n")
    assert cpu_summary(amd) == "AMD EPYC (avx2, no VNNI)"
    assert cpu_summary(intel) == "Intel(R) Xeon(R) Platinum 8375C (avx512, VNNI: avx512_vnni)"
    assert cpu_summary(tmp_path / "missing") == "unknown CPU"
