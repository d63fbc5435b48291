"""The nightly retrain at scale: `train` + `deploy` on 5k / 20k / 50k labeled photos, full and nightly.

    .venv/bin/python bench/train_scale.py [--sizes 5000 20000 50000] [--dataset ikea_products]
                                          [--new-labels 1000] [--new-photos 500] [--noise 1.0]
                                          [--sorted-photos 2000]

For each size N the bench builds a workspace of N labeled user photos and times, each in a fresh
process (what the scheduler's nightly job is):

1. **full**: the first `train` + `deploy` (nothing deployed yet);
2. **nightly**: then `--new-labels` reviewed labels arrive, `--new-photos` of them on photos new to the
   manifest and the rest on photos that were in it unlabeled; `train` + `deploy` again.

Both jobs also have `--sorted-photos` photos a sort predicted and nobody reviewed: they self-train the head
(`loop.model.self_training`, a second fit per fold and C), as a shop's own sorted photos do.

It prints wall time (process start to exit, imports included), peak RSS (the process's ru_maxrss), the
share of each phase (`loop.phases`: data, resize, features, cv, fit, calibration, estimates, export,
int8; `gate` is `deploy`), the chosen C and the out-of-fold accuracy, and the growth exponent of each
phase between sizes (1.0 = linear).

**What is synthetic (stated, not hidden).** The shop's photos do not exist here, so each of the N rows is
derived from one of the dataset's real photos (`../shared/data/<dataset>`, 397 for ikea_products): row k
copies photo k mod 397 into a new item (`<item>#<k // 397>`, so items stay whole and the split is the
product's own), its resized-cache PNG is a hard link to the real photo's, and its cached body features
are the real photo's Lite0 features plus Gaussian noise (`--noise` times each feature's spread over the
dataset, clipped at 0 like the ReLU6 output). Nothing is cached for the nightly's new labels: their
resized images are decoded from the real JPEGs and their features computed by the Lite0 body, as in a
real nightly. The accuracy printed is therefore of the noisy synthetic task (a timing control: copies of
one real photo sit in different items, so it is near 1), not a learning result; learning figures come from
`bench/learning.py`.
Caveat: on 2 shared cores timings vary 20-30% between runs; the base features are cached in
`.cache/bench-train-scale/` (first run: ~1 min).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import scratch_folder  # noqa: E402
from loop.data import manifest  # noqa: E402
from loop.data.ingest import ingest_folder  # noqa: E402
from loop.data.resized import ensure_resized, load_resized, resized_path  # noqa: E402
from loop.data.splits import assign_splits  # noqa: E402
from loop.model.backbones import create_network, get_backbone, pretrained_weights, weights_dir, weights_tag  # noqa: E402
from loop.model.features import cached_features, features_dir  # noqa: E402
from loop.tables import conform, write_table_atomic  # noqa: E402
from loop.workspace import Workspace, init_workspace, open_workspace  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CACHE = REPO / ".cache" / "bench-train-scale"
PHASES = ("data", "resize", "network", "features", "cv", "fit", "calibration", "estimates", "export", "int8",
          "gate")


def base_workspace(dataset: Path) -> tuple[Workspace, pd.DataFrame, np.ndarray]:
    """The real photos ingested once (labels, items), with resized images and Lite0 features cached."""
    root = CACHE / f"base-{dataset.name}"
    meta = pd.read_csv(dataset / "manifest.csv")
    if not (root / "sortloop.toml").exists():
        ws = init_workspace(root)
        items = root / "items.csv"
        with open(items, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "item_id"])
            writer.writerows(zip(meta["path"], meta["group"], strict=True))
        ingest_folder(ws, dataset, labeled=True, items_csv=items)
    ws = open_workspace(root)
    rows = manifest.load(ws)
    rows = rows[rows["label"].notna()].sort_values("path").reset_index(drop=True)
    size = ws.settings.model.image_size
    ensure_resized(ws, rows["image_id"].tolist(), rows["path"].tolist(), size)
    backbone = get_backbone(ws.settings.model.backbone)
    net = create_network(ws, backbone.name, 2)
    folder = features_dir(ws.cache_dir, backbone.name, size, weights_tag(ws, backbone.name))
    feats = cached_features(net, rows["image_id"].tolist(), lambda i: load_resized(ws, i, size), folder=folder,
                            mean=backbone.mean, std=backbone.std)
    return ws, rows, feats


def derived_id(image_id: str, copy: int) -> str:
    return hashlib.sha256(f"{image_id}:{copy}".encode()).hexdigest()


def build(base: Workspace, rows: pd.DataFrame, feats: np.ndarray, dest: Path, n: int, n_unlabeled: int,
          noise: float, seed: int, n_sorted: int = 0) -> Workspace:
    """A workspace of `n` labeled rows derived from `rows` (caches filled), `n_unlabeled` bare ones, and
    `n_sorted` unlabeled ones with a sort's prediction (caches filled): the sorted, unreviewed photos that
    self-train the head (`loop.model.self_training`, which samples at most 2,000)."""
    ws = init_workspace(dest)
    size = ws.settings.model.image_size
    backbone = get_backbone(ws.settings.model.backbone)
    weights = pretrained_weights(base, backbone.name)
    weights_dir(ws).mkdir(parents=True, exist_ok=True)
    os.link(weights, weights_dir(ws) / weights.name)
    folder = features_dir(ws.cache_dir, backbone.name, size, weights_tag(ws, backbone.name))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    spread = feats.reshape(-1, feats.shape[-1]).std(axis=0)
    now = manifest.now_utc()
    out = []
    for k in range(n + n_unlabeled + n_sorted):
        b, copy = k % len(rows), k // len(rows)
        src = rows.iloc[b]
        image_id = derived_id(src["image_id"], copy)
        labeled, predicted = k < n, k >= n + n_unlabeled
        out.append({"image_id": image_id, "path": src["path"], "source": "user",
                    "item_id": f"{src['item_id']}#{copy}", "item_rule": "csv",
                    "label": src["label"] if labeled else None, "label_source": "folder" if labeled else None,
                    "label_by": "ingest" if labeled else None, "label_at": now if labeled else None,
                    "pred_label": src["label"] if predicted else None, "pred_conf": 0.9 if predicted else None,
                    "pred_model": "v0000" if predicted else None,  # what `sort` records: the model's version
                    "added_at": now})
        if labeled or predicted:
            target = resized_path(ws, image_id, size)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(resized_path(base, src["image_id"], size), target)
            pair = feats[b] + noise * spread * rng.standard_normal(feats[b].shape, dtype=np.float32)
            np.save(folder / f"{image_id}.npy", np.clip(pair, 0, None).astype(np.float32))
    df = conform(pd.DataFrame(out), manifest.COLUMNS)
    df = assign_splits(df, ws.settings.split)
    write_table_atomic(conform(df, manifest.COLUMNS), manifest.manifest_path(ws))
    return ws


def nightly_labels(ws: Workspace, rows: pd.DataFrame, n_new_photos: int) -> int:
    """Append `n_new_photos` new photos, then label them and every unlabeled, unsorted photo as a reviewer
    would (the sorted ones stay unreviewed)."""
    df = manifest.load(ws)
    start = len(df)
    now = manifest.now_utc()
    new = []
    for k in range(start, start + n_new_photos):
        src = rows.iloc[k % len(rows)]
        new.append({"image_id": derived_id(src["image_id"], k // len(rows)), "path": src["path"], "source": "user",
                    "item_id": f"{src['item_id']}#{k // len(rows)}", "item_rule": "csv", "added_at": now})
    manifest.update(ws, lambda d: pd.concat([d, conform(pd.DataFrame(new), manifest.COLUMNS)], ignore_index=True))
    df = manifest.load(ws)
    todo = df[df["label"].isna() & df["pred_label"].isna()]
    truth = dict(zip(rows["path"], rows["label"], strict=True))
    changes = [manifest.LabelChange(i, truth[p], "review", "bench") for i, p in zip(todo["image_id"], todo["path"],
                                                                                   strict=True)]
    return manifest.set_labels(ws, changes)


def run_job(ws_root: Path) -> dict:
    """One nightly job in this process: `train` then `deploy`, with phase seconds and peak RSS."""
    import resource

    from loop.learning.deployment import deploy
    from loop.learning.train import train

    ws = open_workspace(ws_root)
    started = time.perf_counter()
    result = train(ws)
    trained = time.perf_counter()
    decision = deploy(ws)
    phases = {**result.phases, "gate": time.perf_counter() - trained}
    cv = (result.metrics.get("cv_user") or {}).get("accuracy")
    from loop.model.artifact import read_spec

    spec = read_spec(result.model_dir)
    return {"phases": phases, "job_s": time.perf_counter() - started, "version": result.version,
            "n_trained": result.n_trained, "n_new": result.n_new, "promoted": decision.promoted,
            "cv_accuracy": cv, "C": spec.get("training", {}).get("C"),
            "int8": (spec.get("int8") or {}).get("passed"),
            "self_training": (spec.get("training") or {}).get("self_training") or {},
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def timed_job(ws: Workspace) -> dict:
    """`run_job` in a fresh process (imports included in the wall time, ru_maxrss its own)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--job", str(ws.root)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"job failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out, "wall_s": wall}


def report(n: int, kind: str, r: dict) -> None:
    total = sum(r["phases"].values())
    shares = ", ".join(f"{p} {r['phases'][p] / total:.0%}" for p in PHASES if r["phases"].get(p, 0) / total >= 0.005)
    print(f"  {n:>6} {kind:<8} wall {r['wall_s']:7.1f} s  peak RSS {r['maxrss_mb'] / 1024:5.2f} GB  "
          f"trained {r['n_trained']} ({r['n_new']} new), C={r['C']}, out-of-fold acc "
          f"{r['cv_accuracy'] or 0:.3f}, int8 {'passed' if r['int8'] else 'refused'}, "
          f"{'promoted' if r['promoted'] else 'refused'}")
    guessed = r.get("self_training") or {}
    print(f"         self-training: {guessed.get('trained_on', 0)} of {guessed.get('sorted_photos', 0)} sorted photos "
          f"trained with the head's guesses")
    print(f"         phases: {shares}")
    print("         seconds: " + ", ".join(f"{p} {r['phases'][p]:.1f}" for p in PHASES if p in r["phases"]), flush=True)


def growth(results: dict[tuple[int, str], dict], sizes: list[int], kind: str) -> None:
    """Exponent of each phase's time between consecutive sizes: log(t2/t1) / log(n2/n1)."""
    for a, b in zip(sizes, sizes[1:], strict=False):
        ra, rb = results[(a, kind)], results[(b, kind)]
        parts = []
        for p in ("wall_s", *PHASES):
            ta = ra["wall_s"] if p == "wall_s" else ra["phases"].get(p, 0.0)
            tb = rb["wall_s"] if p == "wall_s" else rb["phases"].get(p, 0.0)
            if ta > 0.5 and tb > 0.5:
                parts.append(f"{p.removesuffix('_s')} {np.log(tb / ta) / np.log(b / a):.2f}")
        print(f"  {kind} growth {a} -> {b} (1.0 = linear): " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--dataset", default="ikea_products")
    parser.add_argument("--new-labels", type=int, default=1000)
    parser.add_argument("--new-photos", type=int, default=500)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--sorted-photos", type=int, default=2000,
                        help="unlabeled photos with a sort's prediction (they self-train the head)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-nightly", action="store_true", help="time only the full train")
    parser.add_argument("--keep", action="store_true", help="keep the scratch workspaces")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # internal: one timed job (see timed_job)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_job(args.job)))
        return
    base, rows, feats = base_workspace(DATA / args.dataset)
    print(f"base: {len(rows)} real photos of {args.dataset}, Lite0 features {feats.shape}; rows derived with "
          f"noise {args.noise} x feature spread (see the docstring); load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[tuple[int, str], dict] = {}
    with scratch_folder("sortloop-train-scale-", keep=args.keep) as scratch:
        for n in args.sizes:
            started = time.perf_counter()
            ws = build(base, rows, feats, scratch / f"ws-{n}", n, args.new_labels - args.new_photos, args.noise,
                       args.seed, args.sorted_photos)
            print(f"{n} labeled rows built in {time.perf_counter() - started:.0f} s", flush=True)
            results[(n, "full")] = timed_job(ws)
            report(n, "full", results[(n, "full")])
            if not args.no_nightly:
                changed = nightly_labels(ws, rows, args.new_photos)
                results[(n, "nightly")] = timed_job(ws)
                report(n, f"nightly+{changed}", results[(n, "nightly")])
    for kind in ("full", *(() if args.no_nightly else ("nightly",))):
        growth(results, args.sizes, kind)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
