"""Benchmark: does `sortloop sort` stay flat in memory and steady in speed from 1,000 to 20,000 photos?

Makes N1 (default 1,000) and N2 (default 20,000) small real-looking JPEGs (640x480, from the shared ikea
photos with random crops, flips, colour jitter and noise; written to a temp folder, never the repo), then
in one run:

  - sorts each folder, recording images/s, peak RSS of the main process (sampled, since ru_maxrss never
    decreases) and of the largest decode worker; prints RSS(N2) / RSS(N1) per process: target <= 1.2; and the
    time its flushes took (manifest, copy records, `_review.csv`: they rewrite tables that grow with the
    workspace, the N2 sort's from N1 to N1 + N2 rows);
  - `scan` of the N2 tree and a rerun of the N2 sort that has nothing to do, each against a plain
    `os.walk` + `stat` of the same tree (the least any tool must do to notice changes): the ratio is
    their cost over that floor.

A deployed model is needed: the bench trains one (head mode) on the shared ikea photos in its temp
workspace, so the INT8 gate (`loop.model.quantize`) runs exactly as in production.

usage: .venv/bin/python bench/sort_scale.py [--n1 1000] [--n2 20000] [--keep]
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

from bench.measure import PeakRSS, scratch_folder  # noqa: E402

IKEA = REPO.parent / "shared" / "data" / "ikea_products"


def make_photos(out: Path, n: int, seed: int) -> None:
    """n distinct 640x480 JPEGs in sub-folders of 500, varied from the shared photos (not copies of them)."""
    from PIL import Image, ImageEnhance, ImageOps

    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(IKEA.rglob("*.jpg"))]
    for i in range(n):
        img = sources[int(rng.integers(len(sources)))]
        w, h = img.size
        crop = rng.uniform(0.7, 1.0)
        cw, ch = int(w * crop), int(h * crop)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        photo = img.crop((x, y, x + cw, y + ch)).resize((640, 480))
        if rng.random() < 0.5:
            photo = ImageOps.mirror(photo)
        photo = ImageEnhance.Color(photo).enhance(rng.uniform(0.7, 1.3))
        pixels = np.asarray(photo, np.int16) + rng.normal(0, 4, (480, 640, 3)).astype(np.int16)
        path = out / f"roll{i // 500:03d}" / f"IMG_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=85)


def walk_and_stat(root: Path) -> float:
    """Seconds for the floor: every file under `root` listed and stat-ed."""
    start = time.perf_counter()
    for folder, _, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(folder, name))
    return time.perf_counter() - start


def trained_workspace(root: Path):
    """A workspace with a model trained (head mode) and deployed on the shared ikea photos."""
    from loop.data.ingest import ingest_folder
    from loop.learning.deployment import deploy
    from loop.learning.train import train
    from loop.workspace import init_workspace

    ws = init_workspace(root / "ws")
    ingest_folder(ws, IKEA, source="user", labeled=True)
    result = train(ws)
    deploy(ws, result.version, force=True)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n1", type=int, default=1000)
    parser.add_argument("--n2", type=int, default=20000)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from loop.folders.corrections import scan
    from loop.learning.registry import current_model_dir
    from loop.model.artifact import read_spec
    from loop.sorting.folder import sort_folder

    with scratch_folder("sortloop-scale-", keep=args.keep) as scratch:
        ws = trained_workspace(scratch)
        int8 = read_spec(current_model_dir(ws)).get("int8") or {}
        print(f"model: INT8 {'used' if int8.get('passed') else 'not used'} ({int8.get('reason', 'no INT8 entry')})")
        rows = {}
        for n in (args.n1, args.n2):
            t0 = time.perf_counter()
            make_photos(scratch / f"in{n}", n, seed=n)
            print(f"made {n} photos in {time.perf_counter() - t0:.0f} s", flush=True)
            start = time.perf_counter()
            with PeakRSS() as rss:
                report = sort_folder(ws, scratch / f"in{n}", scratch / f"out{n}")
            seconds = time.perf_counter() - start
            if not report.ok or report.copied != n:
                raise SystemExit(f"sort did not copy everything: {report.summary()}")
            rows[n] = {"rate": n / seconds, "main": rss.main_mb, "worker": rss.child_mb}
            record_s = report.stages.get("record", 0.0)  # the flushes of manifest, copy records and _review.csv
            print(f"sort {n:6d}: {n / seconds:6.1f} images/s, peak RSS main {rss.main_mb:.0f} MB, "
                  f"largest worker {rss.child_mb:.0f} MB, records {record_s:.1f} s ({record_s / seconds:.1%} of "
                  f"the sort)  (load average {os.getloadavg()[0]:.1f})", flush=True)

        a, b = rows[args.n1], rows[args.n2]
        print()
        print(f"RSS {args.n2} / {args.n1}: main {b['main'] / a['main']:.2f}, worker {b['worker'] / a['worker']:.2f}"
              "   target <= 1.2")
        print(f"images/s {args.n2} / {args.n1}: {b['rate'] / a['rate']:.2f}")

        big_in, big_out = scratch / f"in{args.n2}", scratch / f"out{args.n2}"
        floor_out = walk_and_stat(big_out)
        start = time.perf_counter()
        with PeakRSS() as rss:
            scanned = scan(ws, big_out)
        scan_s = time.perf_counter() - start
        print(f"scan of {args.n2} copies: {scan_s:.1f} s, peak RSS {rss.main_mb:.0f} MB; os.walk+stat of the tree "
              f"{floor_out:.2f} s -> {scan_s / floor_out:.1f}x the floor  ({scanned.summary().splitlines()[0]})")
        floor_in = walk_and_stat(big_in)
        start = time.perf_counter()
        with PeakRSS() as rss:
            rerun = sort_folder(ws, big_in, big_out)
        rerun_s = time.perf_counter() - start
        print(f"rerun of {args.n2} (nothing to do: {rerun.copied} copied): {rerun_s:.1f} s, peak RSS "
              f"{rss.main_mb:.0f} MB; os.walk+stat of the inbox {floor_in:.2f} s "
              f"-> {rerun_s / floor_in:.1f}x the floor")


if __name__ == "__main__":
    main()
