"""Reproduce the report figures shown in the README: four rounds of the loop on real photos.

Round 0 labels a quarter of `ikea_products` (as if from labeled folders; the rest arrives unlabeled, as
sorting registers it), trains and deploys. Each later round plays the reviewer with the dataset's own
class of another quarter of the photos (label source "review"), then runs the nightly retrain exactly as
`sortloop serve` does (`sortloop.jobs.retrain_step`: pull, train, gate, deploy or
refuse). Then `sortloop report` draws the plots; the accuracy and labels-per-round PNGs are copied next
to this script (measured 2026-11-28: v0001 0.489 deployed, v0002 0.681 promoted, v0003 refused for
accuracy, v0004 refused for a recall drop on `bench` despite higher accuracy).

Caveat: the reviewer is simulated (no Label Studio here) and photos are labeled in a fixed pseudo-random
order, so the numbers show how the loop behaves on this dataset, not on yours. Takes a few minutes on 2 cores.

Usage:  .venv/bin/python bench/report_figure.py [--data ../shared/data/ikea_products] [--rounds 4]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "ikea_products")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workspace", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()

    from dataclasses import replace

    from loop.data.images import iter_image_files
    from loop.data.ingest import describe_image, register_images
    from loop.data.manifest import LabelChange, set_labels
    from loop.learning.deployment import deploy
    from loop.learning.train import train
    from loop.workspace import init_workspace
    from sortloop import jobs
    from sortloop.report import PLOTS, write_report

    jobs.STEPS["pull"] = lambda ws: "reviews set directly by the simulated reviewer"  # no Label Studio here
    ws = init_workspace(args.workspace or Path(tempfile.mkdtemp(prefix="sortloop-figure-")) / "ws")
    infos = [describe_image(path) for path in iter_image_files(args.data)]
    truth = {info.image_id: Path(info.path).parent.name for info in infos}
    infos.sort(key=lambda info: hashlib.sha256(f"figure:{info.image_id}".encode()).hexdigest())
    chunks = [infos[i :: args.rounds] for i in range(args.rounds)]

    # round 0: labeled folders, trained and deployed by hand; the other photos arrive unlabeled (as sorted)
    first = {info.image_id for info in chunks[0]}
    register_images(ws, [replace(info, label=truth[info.image_id]) if info.image_id in first else info
                         for info in infos])
    result = train(ws)
    decision = deploy(ws, result.version)
    print(f"round 0: {result.summary()}; {'deployed' if decision.promoted else 'refused'}")
    for round_no, chunk in enumerate(chunks[1:], start=1):
        set_labels(ws, [LabelChange(i.image_id, truth[i.image_id], "review", "simulated reviewer") for i in chunk])
        print(f"round {round_no}: {jobs.retrain_step(ws).summary}")

    page = write_report(ws)
    for name in ("accuracy", "labels"):
        shutil.copy(page.parent / PLOTS[name], HERE / "figures" / f"report-{PLOTS[name]}")
    print(f"report: {page}; copied report-{PLOTS['accuracy']} and report-{PLOTS['labels']} to {HERE / 'figures'}")


if __name__ == "__main__":
    main()
