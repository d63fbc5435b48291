"""Ray cluster plumbing shared by the Ray sort and Ray feature extraction (the optional extra `sortloop[ray]`).

`connected` joins (or starts) a cluster for the duration; `pooled` maps rows in batches through a pool of
actors with Ray Data; `results` yields the finished batches and turns a failed job into one SortloopError.
Ray is imported only inside these functions, so `pip install sortloop` without Ray still works.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from loop.errors import SortloopError

MAX_BLOCKS = 4096  # input blocks for Ray Data: small blocks balance the actors, too many cost the driver
LOCAL = "local"  # the `ray.address` that starts a fresh local instance


@contextmanager
def connected(address: str = "") -> Iterator[None]:
    """Connect to Ray for the duration (unless this process already is); disconnect only what we connected.

    Args:
        address: "" = `$RAY_ADDRESS` or Ray's default (a running local cluster, else a new instance);
            "local" = a fresh local instance; "host:6379" or "ray://host:10001" = an existing cluster.
    Raises:
        SortloopError: Ray is not installed, or the cluster cannot be reached.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise SortloopError("Ray is not installed: `pip install 'sortloop[ray]'`, or run without --ray "
                            "(sort.engine / model.feature_engine = \"local\")") from None
    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False} if address == LOCAL else {}
        try:
            ray.init(address=address or None, log_to_driver=False, logging_level=logging.WARNING, **options)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            raise SortloopError(f"cannot reach the Ray cluster at {address or '$RAY_ADDRESS / default'} "
                                f"({str(exc)[:200]}); start one with `ray start --head` or fix ray.address") from None
        started = True
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # sortloop shows its own progress
    context.print_on_execution_start = False
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def pooled(rows: list[dict], actor: type, init: dict[str, Any], batch_size: int, actors: int) -> Any:
    """A Ray Dataset of `rows` mapped in batches by a pool of `actor`s (1 CPU each) built with `init`.

    Pass object refs in `init` inside a list: the actor then fetches them itself (once, at start), and they
    stay alive for actors Ray restarts as long as the driver holds them. Batches shrink for small inputs so
    that every actor gets work.
    """
    import ray
    import ray.data

    size = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))  # 0: one per CPU in the cluster
    batch = max(1, min(batch_size, math.ceil(len(rows) / size)))
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(rows) / batch)))
    return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        actor, fn_constructor_kwargs=init, batch_size=batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1,
    )


def results(dataset: Any, what: str) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's output batches as they finish; a failure of the job itself (not of one file: those
    come back as per-file errors) becomes one SortloopError instead of a Ray traceback."""
    import ray.exceptions

    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as exc:
        reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        raise SortloopError(f"the Ray {what} job failed ({reason}); what finished is kept, run it again to "
                            "resume (worker logs: /tmp/ray/session_latest/logs on each node)") from exc
