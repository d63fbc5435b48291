"""A streaming, bounded-memory decode pipeline: paths in, model inputs out, in order, in worker processes.

Each file is read once (`read_hashed`) and becomes a `Decoded` record: its sha256 (`image_id`), the model's
view of it (uint8 (size, size, 3), exactly what `loop.data.images.load_model_input` returns: JPEG draft +
EXIF transpose + RGB + resize + centre crop), its perceptual hash and EXIF time (for the manifest), or, if
it cannot be read, a one-line `error`. A broken file never raises out of the pipeline — not even one that crashes
the decoder process: the pool is rebuilt and the culprit is reported.

Why processes: decoding is CPU-bound Python/C that holds the GIL in places; worker processes decode the
next images while the main process runs the model, and at most `prefetch` chunks are in flight, so
memory stays flat however many files there are. Workers are forked from a fork server where the platform
has one, else spawned (`pool_context`); never forked from the main process, which may hold ONNX Runtime /
torch threads.
Caveat: results come back in input order, so one slow file (a huge PNG) delays the ones behind it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loop.data.images import (
    check_regular_file,
    exif_time_raw,
    open_image,
    perceptual_hash,
    read_ahead,
    read_hashed,
    resize_and_crop,
)
from loop.errors import ImageError, SortloopError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

POOL_START_TIMEOUT_S = 120.0
CRASH_RETRIES = 1  # a file that crashed its decoder process while alone in the pool is retried this many times


@dataclass
class Decoded:
    """One file after decoding. `pixels` is None (and `error` set) when it could not be read."""

    path: Path
    image_id: str | None = None
    pixels: np.ndarray | None = None  # uint8 (size, size, 3)
    phash: str | None = None
    taken_raw: str | None = None  # EXIF DateTimeOriginal as written; `taken_at` parses it
    size_bytes: int = -1
    mtime_ns: int = -1
    error: str | None = None
    # worker seconds hashing, decoding, and on pHash + EXIF time: the sort's profile
    hash_s: float = 0.0
    decode_s: float = 0.0
    describe_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def taken_at(self) -> pd.Timestamp | None:
        """EXIF capture time as a UTC timestamp (camera local time taken as UTC), or None."""
        from loop.data.items import parse_exif_time  # pandas: only in the main process, never in workers

        return parse_exif_time(self.taken_raw)


def decode_one(path: Path, size: int, describe: bool = True) -> Decoded:
    """Hash and decode one file into a `Decoded`; never raises (a failure becomes `error`).

    Args:
        path: the image file.
        size: the model's input size (square).
        describe: also compute the perceptual hash and EXIF time the manifest wants for new images.
    """
    path = Path(path)
    rec = Decoded(path=path)
    try:
        st = check_regular_file(path)
        rec.size_bytes, rec.mtime_ns = st.st_size, st.st_mtime_ns
        started = time.perf_counter()
        rec.image_id, data = read_hashed(path, st.st_size)
        hashed = time.perf_counter()
        # Same steps as loop.data.images.load_model_input, split so the oriented image also feeds pHash.
        img = open_image(path, draft_size=size, data=data)
        rec.pixels = np.asarray(resize_and_crop(img, size), dtype=np.uint8)
        decoded = time.perf_counter()
        if describe:
            rec.phash, rec.taken_raw = perceptual_hash(img), exif_time_raw(img)
        rec.hash_s, rec.decode_s, rec.describe_s = hashed - started, decoded - hashed, time.perf_counter() - decoded
    except ImageError as exc:
        rec.error = exc.reason
    except OSError as exc:  # vanished, permission denied, symlink loop, I/O error while hashing
        rec.error = f"unreadable ({exc.strerror or exc})"
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one odd file must not stop a sort of thousands
        logger.warning("unexpected error decoding %s", path, exc_info=True)
        rec.error = f"unexpected decoder error ({type(exc).__name__}: {exc})"
    if rec.error is not None:
        rec.pixels = None
    return rec


def decode_chunk(paths: list[Path], size: int, describe: bool = True) -> list[Decoded]:
    """`decode_one` over a few paths: one inter-process round trip for several files."""
    return [decode_one(p, size, describe) for p in paths]


DecodeFn = Callable[[list[Path], int, bool], list[Decoded]]


@dataclass
class _Task:
    paths: list[Path]
    future: Future | None
    pool_generation: int
    attempts: int = 0
    suspect: bool = False  # in flight when a decoder died: runs alone, one file, so a crash is its own


def _succeeded(future: Future | None) -> bool:
    return future is not None and future.done() and not future.cancelled() and future.exception() is None


def _ping() -> bool:
    return True


def pool_context(preload: tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """How decode workers start: "forkserver" where the platform has it (Linux, macOS), else "spawn"
    (Windows, and a frozen app, whose executable cannot run the server's `-c` command).

    Why not "fork": the main process may hold ONNX Runtime / torch threads. Why not "spawn" everywhere: every
    spawned worker is a fresh interpreter that imports numpy, Pillow and this module (and re-imports the
    main script) before its first photo, ~0.3 s of CPU each, per sort. The fork server is started once per
    process (a fresh interpreter too, so no threads), imports them once, and forks each worker from that.

    Caveat: before Python 3.13 the server never imports "__main__" (CPython gh-126631: it looks for a key
    that `spawn.get_preparation_data` no longer writes), so every worker re-runs the main script's top level
    before its first task. Keep an entry script's module level light: the `sortloop` command's costs 2 ms,
    `bench/sort.py`'s 11 ms; a script importing pandas there made each worker 0.5 s late.

    Args:
        preload: names of modules (already imported here) the workers need beyond this one; only the
            first pool of a process starts the server, so later pools' modules are imported per worker."""
    if getattr(sys, "frozen", False) or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__, *preload])  # no effect once the server runs
    return context


@dataclass(frozen=True)
class WorkerSetup:
    """What each worker process runs once before its first task (`loop.sorting.model_workers` loads the model)."""

    initializer: Callable[..., None] | None = None
    initargs: tuple = ()
    preload: tuple[str, ...] = ()  # modules for the fork server to import (`pool_context`)
    # Run in a worker once it started: what it raises is the run's error (a model that did not load), raised
    # at the first read as it is, instead of "did not start"
    check: Callable[[], object] = _ping


def _start_pool(workers: int, setup: WorkerSetup) -> tuple[ProcessPoolExecutor, list[Future]]:
    """A pool of `workers` decode processes, all started (one check each: a pool starts its processes as
    tasks arrive); the returned futures say whether they started."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=pool_context(setup.preload),
                               initializer=setup.initializer, initargs=setup.initargs)
    return pool, [pool.submit(setup.check) for _ in range(workers)]


def _check_started(pool: ProcessPoolExecutor, pings: list[Future]) -> None:
    """A pool whose processes cannot start is an error for the whole run, not N failed files; so is what
    the setup's `check` raised there (e.g. a ModelError)."""
    try:
        for ping in pings:
            ping.result(timeout=POOL_START_TIMEOUT_S)
    except (BrokenProcessPool, TimeoutError) as exc:
        pool.shutdown(wait=False, cancel_futures=True)
        raise SortloopError(
            f"decoder worker processes did not start ({type(exc).__name__}). If you call sortloop from a "
            "script, put the call under `if __name__ == \"__main__\":`; or set sort.workers = 0"
        ) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


class PoolStart:
    """Decode worker processes starting in a thread, before their stream has paths.

    Why a thread: the first start of a fork server blocks ~0.3 s (it imports numpy, Pillow and the model
    runtime before it forks), and each worker then runs the setup (loads the model); the caller meanwhile
    reads its records and checks its folders. A `DecodeStream` takes the pool over (`decode_stream(...,
    start=...)`); `close` stops it if none did, and is safe to call twice.
    """

    def __init__(self, workers: int, setup: WorkerSetup) -> None:
        self.workers, self.setup = workers, setup
        self.pool: ProcessPoolExecutor | None = None
        self.pings: list[Future] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="sortloop-decode-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self.pool, self.pings = _start_pool(self.workers, self.setup)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread, by `wait`
            self.error = exc

    def started(self) -> ProcessPoolExecutor | None:
        """The pool once its processes were asked to start (None: they could not be; `wait` says why)."""
        self._thread.join()
        return self.pool

    def wait(self) -> ProcessPoolExecutor:
        """The started pool, its workers' checks passed, or the error that stopped it (one line)."""
        if self.started() is None:
            raise SortloopError(f"decoder worker processes did not start ({self.error}); "
                                "or set sort.workers = 0") from self.error
        assert self.pool is not None
        _check_started(self.pool, self.pings)
        return self.pool

    def close(self) -> None:
        if self.started() is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]

    def __enter__(self) -> PoolStart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DecodeStream:
    """The parallel pipeline behind `decode_stream`: its worker processes start (`PoolStart`) and, as soon as
    they exist, the first tasks are submitted, in a thread (so they warm up while the caller prepares), and
    it yields `Decoded` in input order."""

    def __init__(self, paths: Iterable[Path], size: int, *, workers: int, chunk: int, prefetch: int,
                 describe: bool, decode_fn: DecodeFn, setup: WorkerSetup, start: PoolStart | None = None) -> None:
        self.source = iter(paths)
        self.size, self.workers, self.chunk, self.prefetch = size, workers, chunk, prefetch
        self.describe, self.decode_fn, self.setup = describe, decode_fn, setup
        self.generation = 0
        self.queue: deque[_Task] = deque()
        self._closed = False
        self.pool: ProcessPoolExecutor | None = None
        self._start = start or PoolStart(workers, setup)
        self._first_error: BaseException | None = None
        self._first_tasks = threading.Thread(target=self._submit_first, name="sortloop-decode-first", daemon=True)
        self._first_tasks.start()
        self._gen = self._run()

    def _submit_first(self) -> None:
        self.pool = self._start.started()
        if self.pool is not None:
            try:
                self._refill()
            except BaseException as exc:  # noqa: BLE001 - a failing source: raised at the first read
                self._first_error = exc

    def __iter__(self) -> DecodeStream:
        return self

    def __next__(self) -> Decoded:
        return next(self._gen)

    def __enter__(self) -> DecodeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop: cancel what is queued and let the worker processes exit."""
        if not self._closed:
            self._closed = True
            self._first_tasks.join()
            self._gen.close()
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
            self._start.close()

    def _submit(self, task: _Task) -> None:
        task.future = self.pool.submit(self.decode_fn, task.paths, self.size, self.describe)  # type: ignore[union-attr]
        task.pool_generation = self.generation

    def _refill(self) -> None:
        while len(self.queue) < self.prefetch:
            block = [Path(p) for p in islice(self.source, self.chunk)]
            if not block:
                return
            task = _Task(block, None, self.generation)
            read_ahead(block)  # the disk reads these while the workers decode the tasks before them
            self._submit(task)
            self.queue.append(task)

    def _restart_pool(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]
        self.pool, pings = _start_pool(self.workers, self.setup)
        _check_started(self.pool, pings)
        self.generation += 1
        logger.warning("a decoder process died; restarted the pool")

    def _run(self) -> Iterator[Decoded]:
        self._first_tasks.join()
        self.pool = self._start.wait()
        if self._first_error is not None:
            raise self._first_error
        queue = self.queue
        while True:
            if not any(t.suspect for t in queue):  # new work waits until every suspect has run alone
                self._refill()
            if not queue:
                return
            task = queue[0]
            if task.future is None:  # a suspect: submitted only now, with nothing else in flight
                self._submit(task)
            try:
                results = task.future.result()  # type: ignore[union-attr]
            except BrokenProcessPool:
                # A decoder process died (a crashing codec, the OOM killer) and took every task in flight
                # with it. Rebuild the pool once per breakage. A suspect ran alone, so the crash was its file's:
                # retry it CRASH_RETRIES times, then fail it. Otherwise which file crashed is unknown: every
                # file not decoded yet becomes a suspect and runs alone, in order, so only the culprit fails.
                if task.pool_generation == self.generation:
                    self._restart_pool()
                queue.popleft()
                if task.suspect:
                    if task.attempts >= CRASH_RETRIES:
                        yield Decoded(path=task.paths[0], error="the decoder process crashed on this file")
                        continue
                    queue.appendleft(_Task(task.paths, None, self.generation, task.attempts + 1, suspect=True))
                    continue
                pending = [task, *queue]
                queue.clear()
                for t in pending:
                    queue.extend([t] if _succeeded(t.future) else
                                 [_Task([p], None, self.generation, suspect=True) for p in t.paths])
                continue
            queue.popleft()
            if not any(t.suspect for t in queue):  # keep the workers busy while the caller takes these
                self._refill()
            yield from results


def decode_stream(
    paths: Iterable[Path],
    size: int,
    *,
    workers: int = 2,
    chunk: int = 4,
    prefetch: int | None = None,
    describe: bool = True,
    decode_fn: DecodeFn = decode_chunk,
    setup: WorkerSetup | None = None,
    start: PoolStart | None = None,
) -> DecodeStream | SerialStream:
    """Decode `paths` lazily, in order, with at most `prefetch` chunks of `chunk` files in flight.

    With workers > 0 the processes start and the first `prefetch` chunks are taken from `paths` and
    submitted right away (call `.close()` on the result, or use it as a context manager, to stop early).

    Args:
        paths: any iterable (a generator over a huge tree is fine: it is consumed as needed).
        size: model input size.
        workers: decoder processes; 0 decodes in this process (no overlap with inference).
        chunk: files per task sent to a worker.
        prefetch: chunks in flight (default 4 per worker).
        describe: compute pHash and EXIF time too.
        decode_fn: module-level function (picklable) doing the work; tests swap it.
        setup: what each worker process runs first (ignored with workers = 0).
        start: its workers, started earlier with `workers` and `setup` (`PoolStart`); the stream owns them now.
    Yields:
        One `Decoded` per path, in input order.
    Raises:
        SortloopError: the worker processes cannot start at all.

    Example:
        >>> with decode_stream(iter_image_files(folder), 224, workers=2) as stream:   # doctest: +SKIP
        ...     for rec in stream:
        ...         print(rec.path, rec.error or rec.pixels.shape)
    """
    if workers <= 0:
        return _serial(iter(paths), size, describe, decode_fn)
    return DecodeStream(paths, size, workers=workers, chunk=chunk, prefetch=prefetch or 4 * workers,
                        describe=describe, decode_fn=decode_fn, setup=setup or WorkerSetup(), start=start)


class SerialStream:
    """`decode_stream` with no worker processes (same interface: iterator with close and with-support)."""

    def __init__(self, gen: Iterator[Decoded]) -> None:
        self._gen = gen

    def __iter__(self) -> SerialStream:
        return self

    def __next__(self) -> Decoded:
        return next(self._gen)

    def __enter__(self) -> SerialStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]


def _serial(source: Iterator, size: int, describe: bool, decode_fn: DecodeFn) -> SerialStream:
    def run() -> Iterator[Decoded]:
        for path in source:
            yield from decode_fn([Path(path)], size, describe)

    return SerialStream(run())


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a container's or `taskset`'s limit), not the host's
    count, which `os.cpu_count` gives; more decode workers than CPUs only contend with the model."""
    if hasattr(os, "sched_getaffinity"):  # Linux; Windows and macOS have no affinity call in `os`
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers(configured: int) -> int:
    """The configured worker count, capped at the CPUs available to this process (at least 0)."""
    return max(0, min(configured, available_cpus()))


def model_threads(workers: int) -> int:
    """Intra-op threads for the model beside `workers` decode processes: the CPUs they leave, at least one.

    Why: the runtimes default to every core, so on 2 CPUs a 2-thread forward pass and 2 decoders ran 4
    threads on 2 CPUs; one thread measured as fast or faster (`bench/sort.py`, 29 vs 26-29 images/s)."""
    return max(1, available_cpus() - workers)
