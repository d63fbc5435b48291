"""Benchmark: `sortloop sort --ray` against the local engine on this one machine, and a projection for N nodes.

On N large JPEGs (default 200 of 4000x3000, ~2 MB, made like bench/sort.py; written to a temp folder):

  (a) local      - `sort_folder(engine="local")`: decode worker processes, each with its own ONNX Runtime model;
  (b) ray        - `sort_folder(engine="ray")` on a local Ray instance with every CPU of this machine: the
                   same photos, decoded, predicted and copied by an actor pool (actor start-up included;
                   Ray's own start is timed once, apart: a cluster is started once, not per sort);
  (c) scheduling - the same Ray Data pipeline (driver listing, blocks, actor pool, results back to the driver)
                   with a no-op actor, on 2,000 and 20,000 rows: per-photo scheduling overhead = the slope,
                   fixed cost per run = the intercept; and the driver's own CPU time per photo in (b)
                   (listing, Ray client, records, manifest, flags: what one driver can keep up with);
  (d) copy       - `loop.sorting.copies.safe_copy` of the photos into the destination's file system, alone: MB/s.

(a) and (b) alternate over `--rounds` rounds (the machine is shared); medians are printed with every round.
The projection for N nodes is min(N x the per-node Ray rate, what the destination takes at the measured copy
bandwidth, what the driver can record at its measured per-photo cost): a PROJECTION from one node's numbers,
not a cluster measurement; on a real cluster measure (d) on the shared storage itself.

usage: .venv/bin/python bench/ray_sort.py [--n 200] [--rounds 2]   (quick check: --n 40 --rounds 1)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import scratch_folder  # noqa: E402
from bench.sort import SIZE, build_model, make_large_jpegs  # noqa: E402


class _NoOp:
    """A Ray Data actor that does nothing: what is left is scheduling and transport."""

    def __call__(self, batch: dict) -> dict:
        return {"path": batch["path"]}


def scheduling(rows: int, batch_size: int) -> float:
    """Seconds for the sort's Ray Data pipeline shape over `rows` paths with a no-op actor pool."""
    import ray

    from loop.cluster import pooled

    start = time.perf_counter()
    data = pooled([{"path": f"/photos/IMG_{i:07d}.jpg"} for i in range(rows)], _NoOp, {}, batch_size, 0)
    n = sum(len(b["path"]) for b in data.iter_batches(batch_size=None, batch_format="numpy"))
    assert n == rows and ray.is_initialized()
    return time.perf_counter() - start


def copy_bandwidth(paths: list[Path], dest: Path) -> tuple[float, float]:
    """(MB/s, files/s) of safe copies (temp + fsync + link) of `paths` into `dest`, directory fsync included."""
    from loop.data.images import file_sha256
    from loop.sorting.copies import fsync_dir, safe_copy

    ids = [file_sha256(p) for p in paths]  # the sort has these already; not timed
    start = time.perf_counter()
    for path, image_id in zip(paths, ids, strict=True):
        st = path.stat()
        safe_copy(path, dest, path.name, image_id=image_id, size=st.st_size, mtime_ns=st.st_mtime_ns, sync_dir=False)
    fsync_dir(dest)
    seconds = time.perf_counter() - start
    return sum(p.stat().st_size for p in paths) / 1e6 / seconds, len(paths) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="number of large JPEGs")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of local and Ray sorts")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    from loop.sorting.folder import sort_folder

    cpus = os.cpu_count() or 1
    with scratch_folder("sortloop-raybench-", keep=args.keep) as scratch:
        try:
            paths = make_large_jpegs(scratch / "photos", args.n)
            mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
            print(f"{len(paths)} JPEGs of {SIZE[0]}x{SIZE[1]} (mean {mb:.1f} MB) on {cpus} CPUs")
            ws, _, _ = build_model(scratch)
            batch = ws.settings.sort.batch_size

            start = time.perf_counter()
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
            ray_start = time.perf_counter() - start
            rows = []
            for r in range(args.rounds):
                row = {}
                for engine in ("local", "ray"):
                    start, cpu = time.perf_counter(), time.process_time()
                    report = sort_folder(ws, scratch / "photos", scratch / f"sorted-{engine}-{r}", engine=engine)
                    row[engine] = len(paths) / (time.perf_counter() - start)
                    row[f"{engine}_cpu"] = (time.process_time() - cpu) / len(paths)
                    if not report.ok or report.copied != len(paths):
                        raise SystemExit(f"{engine} sort did not copy everything: {report.summary()}")
                rows.append(row)
                print(f"round {r + 1}: local {row['local']:.1f}, ray {row['ray']:.1f} images/s -> local/ray "
                      f"{row['local'] / row['ray']:.2f}x  (load average {os.getloadavg()[0]:.1f})", flush=True)

            small, large = 2_000, 20_000
            scheduling(small, batch)  # warm-up: first-use imports and worker processes
            t_small = min(scheduling(small, batch) for _ in range(2))
            t_large = min(scheduling(large, batch) for _ in range(2))
            per_photo = max(0.0, (t_large - t_small) / (large - small))
            fixed = max(0.0, t_small - small * per_photo)
            copy_mb_s, copy_files_s = copy_bandwidth(paths, scratch / "copy-test")
            ray.shutdown()

            local, on_ray, driver_cpu = (float(np.median([row[k] for row in rows]))
                                         for k in ("local", "ray", "ray_cpu"))
            print()
            print(f"median of {args.rounds} rounds, one node of {cpus} CPUs "
                  f"(load average now {os.getloadavg()[0]:.1f})")
            print(f"(a) local engine                  {local:8.1f} images/s")
            print(f"(b) Ray engine, {cpus} actors          {on_ray:8.1f} images/s  "
                  f"(Ray start, once: {ray_start:.1f} s)")
            print(f"    overhead ratio on one node: local / Ray = {local / on_ray:.2f}x")
            print(f"(c) Ray scheduling, no-op actors: {per_photo * 1e3:.2f} ms per photo on the driver "
                  f"(slope over {small}->{large} rows) + {fixed:.1f} s fixed per run")
            print(f"    driver CPU in (b): {driver_cpu * 1e3:.1f} ms per photo "
                  "(listing, Ray client, records, manifest)")
            print(f"(d) safe copy into the destination's file system: {copy_mb_s:.0f} MB/s = "
                  f"{copy_files_s:.0f} photos/s "
                  f"of {mb:.1f} MB")
            print()
            driver_cap = 1.0 / max(driver_cpu, per_photo)
            print("PROJECTION (not measured on a cluster): N nodes like this one, DEST on storage as fast as (d)")
            print(f"  rate(N) = min(N x {on_ray:.1f}, copy {copy_files_s:.0f}, driver {driver_cap:.0f}) images/s")
            for nodes in (1, 2, 4, 8, 16, 32):
                rate = min(nodes * on_ray, copy_files_s, driver_cap)
                hours = 5e6 / rate / 3600
                print(f"  {nodes:3d} nodes: {rate:7.1f} images/s -> 5 million photos in {hours:6.1f} h")
        finally:
            if ray.is_initialized():
                ray.shutdown()


if __name__ == "__main__":
    main()
