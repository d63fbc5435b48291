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
