"""Decode workers started before their stream (`loop.data.decode.PoolStart`): taken over, or stopped unused,
and a start that fails is one line at the first read."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from loop.data.decode import PoolStart, WorkerSetup, decode_one, decode_stream
from loop.errors import SortloopError
from tests.conftest import make_image


def broken_initializer() -> None:
    raise RuntimeError("no codec here")


def photos(folder: Path, n: int) -> list[Path]:
    return [make_image(folder / f"p{i}.jpg", (20 * i, 100, 50)) for i in range(n)]


def test_a_stream_takes_over_workers_started_before_it(tmp_path: Path) -> None:
    paths = photos(tmp_path, 7)
    start = PoolStart(2, WorkerSetup())
    pool = start.wait()  # both started, checked
    with decode_stream(paths, 64, workers=2, chunk=2, start=start) as stream:
        got = list(stream)
    assert [r.path for r in got] == paths and all(r.ok for r in got)
    assert [r.image_id for r in got] == [decode_one(p, 64).image_id for p in paths]
    assert stream.pool is pool  # the same processes, not a second pool
    start.close()  # a second close is harmless


def test_workers_started_and_never_used_are_stopped(tmp_path: Path) -> None:
    with PoolStart(2, WorkerSetup()) as start:
        processes = list(start.wait()._processes.values())
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in processes)


def test_workers_that_cannot_start_are_one_error_at_the_first_read(tmp_path: Path) -> None:
    paths = photos(tmp_path, 3)
    stream = decode_stream(paths, 64, workers=2, chunk=1, setup=WorkerSetup(broken_initializer))
    with pytest.raises(SortloopError, match="did not start"):
        next(stream)
    stream.close()
