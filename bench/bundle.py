"""Benchmark: the standalone sorter of `sortloop bundle` against `sortloop sort`, same photos, same run.

On N large JPEGs (default 100 of 4000x3000, made like bench/sort.py's, in a temp folder, never the repo)
with a deployed model (pretrained Lite0 body, 11-class head):

  (a) `sortloop sort SRC DEST` as a process (the CLI, in this venv): Python start-up and imports included;
  (b) the frozen `sortloop-sort SRC DEST` from the bundle, run with `env -i` (no venv, no Python on PATH).

Both run the same pipeline (`loop.sorting.pipeline`), so the ratio shows what freezing costs or saves: start-up,
the workspace's bookkeeping (manifest, records) against the DEST record. The two alternate over
`--rounds` rounds (a busy shared machine hits both alike); the median ratio is reported, with every round.
Also printed: the bundle's size (folder and zip) and the time to freeze the sorter (uncached).

usage: .venv/bin/python bench/bundle.py [--n 100] [--rounds 3] [--keep]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import scratch_folder  # noqa: E402
from bench.sort import build_model, make_large_jpegs  # noqa: E402


def timed(cmd: list[str], env: dict[str, str] | None, n: int) -> float:
    """Images per second of one sort process (wall clock, start-up included)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="number of large JPEGs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of (a) and (b)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from sortloop.bundle import EXE_NAME, build_bundle

    with scratch_folder("sortloop-bench-bundle-", keep=args.keep) as scratch:
        photos = scratch / "photos"
        paths = make_large_jpegs(photos, args.n)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        ws, _, _ = build_model(scratch)
        t0 = time.perf_counter()
        folder = build_bundle(ws, scratch / "bundle")
        build_s = time.perf_counter() - t0
        zipped = build_bundle(ws, scratch / "bundle-zip", as_zip=True)  # the cached sorter, zipped
        print(f"{len(paths)} JPEGs of 4000x3000 (mean {mb:.1f} MB) on {os.cpu_count()} CPUs; "
              f"model {folder.model_version}")
        print(f"{folder.platform} bundle: folder {folder.size_bytes / 1e6:.0f} MB, "
              f"zip {zipped.size_bytes / 1e6:.0f} MB "
              f"({zipped.unpacked_bytes / 1e6:.0f} MB unzipped: the zip stores the folder's symlinks as files); "
              f"freezing the sorter took {build_s:.0f} s (uncached)")

        exe = folder.out / EXE_NAME
        cli = [sys.executable, "-c", "from sortloop.cli import app; app()"]
        env_cli = {**os.environ, "PYTHONPATH": str(REPO)}
        rows = []
        for r in range(args.rounds):
            main_rate = timed([*cli, "sort", str(photos), str(scratch / f"main{r}"), "-w", str(ws.root)],
                              env_cli, len(paths))
            frozen_rate = timed(["env", "-i", str(exe), str(photos), str(scratch / f"frozen{r}")], None, len(paths))
            rows.append((main_rate, frozen_rate))
            print(f"round {r + 1}: sortloop sort {main_rate:.1f} images/s, frozen sorter {frozen_rate:.1f} images/s "
                  f"-> {frozen_rate / main_rate:.2f}x  (load average {os.getloadavg()[0]:.1f})", flush=True)
        ratios = [f / m for m, f in rows]
        print()
        print(f"median of {args.rounds} rounds: sortloop sort {np.median([m for m, _ in rows]):.1f} images/s, "
              f"frozen sorter {np.median([f for _, f in rows]):.1f} images/s; "
              f"frozen / sortloop sort = {np.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
