"""Benchmark: what serving copies costs. `labeling.served.publish` (a copy of each photo, hashed) against the
hard link + hash an earlier version published, on the same photos in the same run.

Why: a hard-linked entry changes when the photo is rewritten in place after push (a text file's bytes
served as a task image), so entries are copies now. This prints the price in seconds and in disk space.
Photos are real ones from ../shared/data/ikea_products (small) and, with `--megapixels`, the same photos
re-encoded at that size (what a phone or camera writes), each with a few unique bytes appended so each
has its own sha256. Rounds alternate the two ways into emptied served folders; the median ratio is printed.

usage: .venv/bin/python bench/served_copy.py [--n 500] [--megapixels 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import scratch_folder  # noqa: E402
from labeling import served  # noqa: E402
from loop.workspace import init_workspace  # noqa: E402

IKEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ikea_products"


def make_photos(folder: Path, n: int, megapixels: float) -> dict[str, str]:
    """`n` unique JPEGs (image_id -> path) made from the shared ikea photos."""
    sources = sorted(IKEA.rglob("*.jpg"))
    folder.mkdir(parents=True)
    photos = {}
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if megapixels:
            with Image.open(sources[i % len(sources)]) as img:
                scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
                img.convert("RGB").resize((int(img.width * scale), int(img.height * scale))).save(path, quality=90)
        else:
            path.write_bytes(sources[i % len(sources)].read_bytes())
        with open(path, "ab") as fh:
            fh.write(f"unique {i}".encode())
        photos[hashlib.sha256(path.read_bytes()).hexdigest()] = str(path)
    return photos


def link_and_hash(storage: Path, photos: dict[str, str]) -> None:
    """The earlier way: a hard link into the storage folder, then its bytes hashed."""
    for image_id, path in photos.items():
        target = storage / served.served_name(image_id, path)
        os.link(path, target)
        assert hashlib.sha256(target.read_bytes()).hexdigest() == image_id


def empty(storage: Path) -> None:
    for entry in storage.iterdir():
        entry.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description="served copies vs hard links")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--megapixels", type=float, default=12.0, help="0: the small shared photos as they are")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with scratch_folder("sortloop-bench-served-") as tmp:
        photos = make_photos(tmp / "photos", args.n, args.megapixels)
        size_mb = sum(Path(p).stat().st_size for p in photos.values()) / 1e6
        ws = init_workspace(tmp / "ws")
        storage = served.prepare(ws)
        ratios = []
        for r in range(args.rounds):
            os.sync()
            empty(storage)
            t = time.perf_counter()
            link_and_hash(storage, photos)
            linked = time.perf_counter() - t
            empty(storage)
            os.sync()
            t = time.perf_counter()
            names, refused = served.publish(ws, photos)
            copied = time.perf_counter() - t
            assert len(names) == len(photos) and not refused
            ratios.append(copied / linked)
            print(f"round {r + 1}: link+hash {linked:.2f} s, copy (publish) {copied:.2f} s, "
                  f"ratio {copied / linked:.2f}")
        print(f"{args.n} photos, {size_mb:.0f} MB ({size_mb / args.n:.2f} MB each): publishing copies costs "
              f"{statistics.median(ratios):.2f}x the hard links (median of {args.rounds}), "
              f"{(copied - linked) / args.n * 1000:.1f} ms per photo more in the last round, and {size_mb:.0f} MB "
              "of disk for the photos in review")


if __name__ == "__main__":
    main()
