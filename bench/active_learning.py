"""Active learning on real photos: labels each selection strategy needs, and what the audit finds.

Usage: .venv/bin/python bench/active_learning.py [--datasets ikea_products eth80] [--seeds 5] [--batch 20]

For each dataset (../shared/data/<name>) and seed: an item-grouped pool/test split (test = items never in
the pool); start from one labeled photo per class; each round a strategy from `loop.scoring.strategies` picks a batch,
its labels are revealed (a perfect reviewer), the head is refit on the cached Lite0 features (image +
mirror, StandardScaler + logistic regression, C chosen once per dataset by item-grouped CV on a pool, as
`loop.model.head` does) and scored on the test photos. Every strategy runs in the same process on the same splits.

Prints, per strategy: the labels needed to reach 98% of the accuracy with every pool label (on the mean
curve over seeds: where it first touches that line, and from where it stays above it), and the ratios to
random's. Writes bench/out/active_learning.csv and bench/figures/active_learning.png.
Then the audit: 10% of the pool's labels flipped to another class; `loop.review.audit` (item-grouped out-of-fold
probabilities + confident learning) ranks suspects; prints precision/recall and the test accuracy with the
noisy labels, with the suspects fixed by a reviewer, and with clean labels.
Caveat: features are computed once per dataset into bench/out/ (gitignored; ~1 min for ikea, ~5 for eth80
on 2 cores); the accuracy threshold is read off the mean curve, so one seed's luck moves it by a round.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from loop.config import DEFAULT_BATCH_STRATEGY
from loop.data.images import load_model_input
from loop.model.backbones import create_network, get_backbone, weights_tag
from loop.model.features import cached_features, features_dir
from loop.model.head import choose_c
from loop.review.audit import find_label_issues, out_of_fold_probs
from loop.review.probe import fit_probe, probe_probs
from loop.scoring.strategies import (
    BATCH_STRATEGIES,
    COLD_START_PER_CLASS,
    Pool,
    is_cold_start,
    select_batch,
)
from loop.workspace import init_workspace

OUT = Path(__file__).resolve().parent / "out"
FIGURES = Path(__file__).resolve().parent / "figures"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = 224
BACKBONE = "tf_efficientnet_lite0"
TARGET = 0.98  # share of the full-pool accuracy a strategy must reach
MAX_LABELS = {"ikea_products": 400, "eth80": 480}  # run this far (eth80's random needed ~330 in issue 11)
TEST_FRACTION = 0.3
FLIP_RATE = 0.10


def dataset_features(name: str, data_root: Path = DATA) -> tuple[pd.DataFrame, np.ndarray]:
    """The dataset's manifest (path, label, item_id) and its (N, 2, F) image+mirror features, cached."""
    root = data_root / name
    table = pd.read_csv(root / "manifest.csv")
    frame = pd.DataFrame({
        "path": [str(root / p) for p in table["path"]],
        "label": table["cls"].astype(str),
        "item_id": table["group"].astype(str),
    })
    frame = frame[[Path(p).exists() for p in frame["path"]]].reset_index(drop=True)
    # Bench-only ids (the features cache key): a hash of the path; the project uses content hashes.
    frame["image_id"] = [hashlib.sha256(p.encode()).hexdigest()[:32] for p in frame["path"]]
    cache = OUT / f"features-{name}.npy"
    if cache.exists():
        feats = np.load(cache)
        if len(feats) == len(frame):
            return frame, feats
    import torch

    torch.set_num_threads(2)
    ws = init_workspace(OUT / "ws")
    backbone = get_backbone(BACKBONE)
    net = create_network(ws, BACKBONE, 2)
    folder = features_dir(ws.cache_dir, BACKBONE, SIZE, weights_tag(ws, BACKBONE))
    paths = dict(zip(frame["image_id"], frame["path"], strict=True))
    feats = cached_features(net, frame["image_id"].tolist(), lambda i: load_model_input(Path(paths[i]), SIZE),
                            folder=folder, mean=backbone.mean, std=backbone.std)
    np.save(cache, feats)
    return frame, feats


def split(frame: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item-grouped pool/test indices: every photo of an item on one side."""
    from sklearn.model_selection import GroupShuffleSplit

    gss = GroupShuffleSplit(n_splits=1, test_size=TEST_FRACTION, random_state=seed)
    pool, test = next(gss.split(frame, frame["label"], frame["item_id"]))
    return pool, test


def accuracy(feats: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, c: float, k: int) -> float:
    """Fit the head on `train` (image + mirror rows), score on `test` (image view)."""
    model = fit_probe(feats[train].reshape(-1, feats.shape[-1]), np.repeat(y[train], 2), c=c)
    return float((probe_probs(model, feats[test, 0], k).argmax(axis=1) == y[test]).mean())


def run_curve(feats, y, pool, test, c, k, strategy, seed, batch, max_labels,
              cold_per_class: int = COLD_START_PER_CLASS) -> list[tuple[int, float, str]]:
    """[(labels, test accuracy, strategy used)] for one strategy, from one photo per class."""
    rng = np.random.default_rng(seed)
    labeled = [int(rng.choice(pool[y[pool] == j])) for j in range(k) if (y[pool] == j).any()]
    emb = feats.mean(axis=1)
    curve, used = [], "start"
    while True:
        lab = np.asarray(labeled)
        model = fit_probe(feats[lab].reshape(-1, feats.shape[-1]), np.repeat(y[lab], 2), c=c)
        curve.append((len(lab), float((probe_probs(model, feats[test, 0], k).argmax(1) == y[test]).mean()), used))
        cand = np.setdiff1d(pool, lab)
        if len(lab) >= max_labels or len(cand) == 0:
            return curve
        probs = probe_probs(model, feats[cand, 0], k)
        cold = is_cold_start(y[lab], k, per_class=cold_per_class)
        picks, used = select_batch(Pool(probs, emb[cand], emb[lab], y[lab]), batch, strategy,
                                   seed=seed * 1000 + len(lab), cold_start=cold)
        labeled.extend(int(i) for i in cand[picks])


def labels_needed(curve: pd.DataFrame, target: float, *, stay: bool = False) -> float:
    """Labels where the mean accuracy first reaches `target` (NaN: never within the run).

    stay=True: the first label count from which the mean curve never drops below `target` again, so one
    lucky round (a noisy mean of a few seeds touching the line) does not count as having reached it.
    """
    acc = curve["accuracy"].to_numpy()
    ok = acc >= target
    if stay:
        ok = np.flip(np.logical_and.accumulate(np.flip(ok)))
    hit = np.flatnonzero(ok)
    return float(curve["labels"].iloc[hit[0]]) if len(hit) else float("nan")


def bench_dataset(name: str, seeds: int, batch: int, strategies: list[str],
                  cold_per_class: int = COLD_START_PER_CLASS) -> tuple[pd.DataFrame, dict]:
    frame, feats = dataset_features(name)
    classes = sorted(frame["label"].unique())
    y = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    k = len(classes)
    rows, full = [], []
    audit_rows = []
    # C once per dataset, by item-grouped CV on seed 0's pool (as `loop.model.head` chooses it for a model).
    pool0, _ = split(frame, 0)
    c, _ = choose_c(feats[pool0].reshape(-1, feats.shape[-1]), np.repeat(y[pool0], 2),
                    np.repeat(frame["item_id"].to_numpy()[pool0], 2))
    print(f"  {name}: {len(frame)} photos, {k} classes, {frame['item_id'].nunique()} items, head C={c}", flush=True)
    for seed in range(seeds):
        pool, test = split(frame, seed)
        full.append(accuracy(feats, y, pool, test, c, k))
        max_labels = min(MAX_LABELS.get(name, 400), len(pool))
        for strategy in strategies:
            t0 = time.perf_counter()
            for n, acc, used in run_curve(feats, y, pool, test, c, k, strategy, seed, batch, max_labels,
                                          cold_per_class):
                rows.append({"dataset": name, "seed": seed, "strategy": strategy, "labels": n, "accuracy": acc,
                             "used": used})
            print(f"  {name} seed {seed} {strategy:16s} {time.perf_counter() - t0:5.1f} s", flush=True)
        audit_rows.append(bench_audit(feats, y, frame["item_id"].to_numpy(), pool, test, c, k, seed))
    return pd.DataFrame(rows), {"full": float(np.mean(full)), "audit": pd.DataFrame(audit_rows)}


def bench_audit(feats, y, items, pool, test, c, k, seed) -> dict:
    """Flip 10% of the pool's labels; how well does the audit find them, and what does fixing them gain?"""
    rng = np.random.default_rng(10_000 + seed)
    noisy = y.copy()
    flipped = rng.choice(pool, size=int(round(FLIP_RATE * len(pool))), replace=False)
    for i in flipped:
        noisy[i] = rng.choice([j for j in range(k) if j != y[i]])
    t0 = time.perf_counter()
    probs = out_of_fold_probs(feats[pool], noisy[pool], items[pool], k, c=c, seed=seed)
    found = find_label_issues(noisy[pool], probs)
    seconds = time.perf_counter() - t0
    suspects = pool[found.is_issue]
    truth = set(flipped.tolist())
    hits = sum(int(i) in truth for i in suspects)
    top = pool[found.ranked()[: len(flipped)]]  # what a reviewer with time for n photos would check
    top_hits = sum(int(i) in truth for i in top)
    fixed = noisy.copy()
    fixed[suspects] = y[suspects]  # a reviewer looks at each suspect and gives the true label

    def acc(labels: np.ndarray) -> float:
        model = fit_probe(feats[pool].reshape(-1, feats.shape[-1]), np.repeat(labels[pool], 2), c=c)
        return float((probe_probs(model, feats[test, 0], k).argmax(1) == y[test]).mean())

    return {"seed": seed, "flipped": len(flipped), "suspects": len(suspects), "found": hits,
            "precision": hits / max(1, len(suspects)), "recall": hits / len(flipped),
            "precision_top_n": top_hits / max(1, len(top)),
            "chance_precision": len(flipped) / len(pool), "acc_noisy": acc(noisy), "acc_fixed": acc(fixed),
            "acc_clean": acc(y), "audit_seconds": seconds}


def summarise(curves: pd.DataFrame, full: float) -> pd.DataFrame:
    """Per strategy: labels to reach TARGET x full-pool accuracy on the mean curve (first touch, and to stay
    there), and both as ratios to random's."""
    # Label counts every seed reached (pool sizes differ by seed, so the last rounds differ).
    seeds = curves["seed"].nunique()
    mean = curves.groupby(["strategy", "labels"], as_index=False)["accuracy"].agg(["mean", "count"])
    mean = mean[mean["count"] == seeds].rename(columns={"mean": "accuracy"})
    target = TARGET * full
    rows = []
    for s, g in mean.groupby("strategy"):
        g = g.sort_values("labels")
        rows.append({"strategy": s, "first_reach": labels_needed(g, target),
                     "reach_and_stay": labels_needed(g, target, stay=True)})
    table = pd.DataFrame(rows).set_index("strategy")
    for col in ("first_reach", "reach_and_stay"):
        base = table.at["random", col] if "random" in table.index else float("nan")
        table[f"{col}_ratio"] = table[col] / base
    return table.reset_index()[["strategy", "first_reach", "first_reach_ratio", "reach_and_stay",
                                "reach_and_stay_ratio"]]


def plot(curves: pd.DataFrame, fulls: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(fulls)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        data = curves[curves["dataset"] == name]
        seeds = data["seed"].nunique()
        for strategy, g in data.groupby("strategy"):
            m = g.groupby("labels")["accuracy"].agg(["mean", "count"])
            m = m[m["count"] == seeds]["mean"]  # label counts every seed reached, as in `summarise`
            ax.plot(m.index, m.to_numpy(), label=strategy,
                    lw=2.2 if strategy in ("random", DEFAULT_BATCH_STRATEGY) else 1.2)
        ax.axhline(TARGET * fulls[name], color="grey", ls="--", lw=1, label=f"{TARGET:.0%} of all labels")
        ax.set_title(f"{name}: test accuracy (unseen items) vs labels")
        ax.set_xlabel("labels given")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ikea_products", "eth80"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=20)
    # typiclust alone is left out by default (it is every strategy's cold start already); add it by name.
    parser.add_argument("--strategies", nargs="+", default=[s for s in BATCH_STRATEGIES if s != "typiclust"],
                        choices=list(BATCH_STRATEGIES))
    parser.add_argument("--cold-start-per-class", type=int, default=COLD_START_PER_CLASS,
                        help="labels per class below which strategies use typiclust (the strategies' default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    all_curves, fulls, tables, audits = [], {}, [], []
    for name in args.datasets:
        curves, info = bench_dataset(name, args.seeds, args.batch, args.strategies, args.cold_start_per_class)
        all_curves.append(curves)
        fulls[name] = info["full"]
        table = summarise(curves, info["full"])
        table.insert(0, "dataset", name)
        tables.append(table)
        audit = info["audit"]
        audit.insert(0, "dataset", name)
        audits.append(audit)
    curves = pd.concat(all_curves)
    curves.to_csv(OUT / "active_learning.csv", index=False)
    plot(curves, fulls, FIGURES / "active_learning.png")
    summary = pd.concat(tables)
    summary.to_csv(OUT / "active_learning_summary.csv", index=False)
    print(f"\nLabels to reach {TARGET:.0%} of the all-pool accuracy (mean of {args.seeds} seeds, batch {args.batch}):")
    for name in args.datasets:
        print(f"\n{name}: all-pool accuracy {fulls[name]:.3f}, target {TARGET * fulls[name]:.3f}")
        print(summary[summary["dataset"] == name].drop(columns="dataset").to_string(index=False,
                                                                                     float_format="%.2f"))
    audit = pd.concat(audits)
    audit.to_csv(OUT / "audit.csv", index=False)
    print(f"\nAudit after flipping {FLIP_RATE:.0%} of the pool's labels (mean over seeds):")
    print("precision_top_n: share of flips among the top n suspects, n = number of flips (a reviewer's first n)")
    print(audit.groupby("dataset")[["flipped", "suspects", "found", "precision", "recall", "precision_top_n",
                                    "chance_precision",
                                    "acc_noisy", "acc_fixed", "acc_clean", "audit_seconds"]].mean()
          .to_string(float_format="%.3f"))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; curves in {OUT / 'active_learning.csv'}, "
          f"plot in {FIGURES / 'active_learning.png'}")


if __name__ == "__main__":
    main()
