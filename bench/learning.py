"""Does the product learn from every label, flag what it gets wrong, and improve with reviews?

For each dataset (`../shared/data/ikea_products`, `../shared/data/eth80`), the dataset's item groups
(product families / physical objects) are split three ways per class, whole groups only: ~5/12
**labeled** (the user's folder), a third **pool** (new photos the loop may ask a reviewer about), a
quarter **test** (unseen items, never labeled, never reviewed). Then, through the product's own library calls (what the
CLI runs): `ingest --labeled --items` -> `train` -> `deploy`, and it reports

1. accuracy on the test items of the deployed model vs an **all-labels probe**: the same recipe
   (StandardScaler + logistic regression, C by item-grouped CV) on the same cached Lite0 features, trained
   on every labeled photo including the product's gate set;
2. the **catch curve** estimated out of fold at training, and the measured share flagged / share of
   mistakes caught at the chosen threshold on the test items;
3. **ECE** on the test items before (T = 1) and after calibration;
4. a **simulation** of 3 rounds of 30 reviews: the pool is ingested unlabeled, the deployed model scores
   it, 30 photos are reviewed (the simulated reviewer answers with the true label, recorded as `review pull`
   records it: label and review status), then `train` -> `deploy`; test accuracy per round for the
   product's selection (what `review push` sends with a daily budget of 30: the review queue's pick,
   `loop.review.queue`, with `review.strategy` or each of `--strategies`) vs 30 random pool photos.

Every split's test items are few (80-200 photos, a handful of mistakes), so one split decides nothing:
the bench repeats parts 1-4 over `--splits` three-way splits (seeds seed, seed+1, ...) and prints the
means, the pooled catch rate and, per strategy, the paired difference to random (mean accuracy over
rounds 1-3, and after round 3) with the splits where it was ahead.

Test-set predictions use the deployed artifact's own weights on cached body features (the body is
frozen in head mode, so this is the deployed network's output; checked against ONNX Runtime on a sample).
Timings are printed only as ratios. Features are cached in `.cache/bench-learning/` (first run: minutes
on 2 cores for eth80's 2298 photos; then seconds).

    .venv/bin/python bench/learning.py [--datasets ikea_products eth80] [--rounds 3] [--reviews 30] [--seed 0]
                                       [--splits 3] [--strategies margin hybrid ...] [--per-group N]
    (--rounds 0: parts 1-3 only, e.g. to repeat them over other splits with --seed)
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labeling.push import select_candidates, within_budget  # noqa: E402
from loop.config import DEFAULT_BATCH_STRATEGY  # noqa: E402
from loop.data import manifest  # noqa: E402
from loop.data.images import load_model_input  # noqa: E402
from loop.data.ingest import ingest_folder  # noqa: E402
from loop.learning import registry  # noqa: E402
from loop.learning.deployment import deploy  # noqa: E402
from loop.learning.train import train  # noqa: E402
from loop.model.artifact import load_predictor, read_spec, softmax  # noqa: E402
from loop.model.backbones import create_network, get_backbone, weights_tag  # noqa: E402
from loop.model.calibration import expected_calibration_error  # noqa: E402
from loop.model.features import cached_features, features_dir  # noqa: E402
from loop.model.head import choose_c  # noqa: E402
from loop.review import queue  # noqa: E402
from loop.scoring.flagging import settings_point  # noqa: E402
from loop.scoring.strategies import score  # noqa: E402
from loop.scoring.unfamiliar import load_familiarity  # noqa: E402
from loop.workspace import init_workspace  # noqa: E402
from sortloop.demo_review import record_reviews  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = REPO / ".cache" / "bench-learning"


def split_groups(meta: pd.DataFrame, seed: int) -> dict[str, pd.DataFrame]:
    """Whole groups, per class: a quarter test, a third pool, the rest (~5/12) labeled (each class in each)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"labeled": [], "pool": [], "test": []}
    for _, groups in meta.groupby("cls")["group"]:
        names = list(rng.permutation(sorted(groups.unique())))
        n = len(names)
        n_test = max(1, round(n / 4))
        n_pool = max(1, round(n / 3)) if n > 2 else 0
        parts["test"] += names[:n_test]
        parts["pool"] += names[n_test:n_test + n_pool]
        parts["labeled"] += names[n_test + n_pool:]
    return {k: meta[meta["group"].isin(v)].reset_index(drop=True) for k, v in parts.items()}


def link_tree(rows: pd.DataFrame, dataset: Path, dest: Path) -> tuple[Path, Path]:
    """A folder of symlinks `<cls>/<file>` to the shared photos (nothing copied) and its items CSV."""
    for path in rows["path"]:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(dataset / path)
    items = dest.parent / f"{dest.name}_items.csv"
    with open(items, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "item_id"])
        writer.writerows(zip(rows["path"], rows["group"], strict=True))
    return dest, items


def new_workspace(root: Path):
    """A workspace whose cache (resized photos, features, weights) is shared by every run of the bench."""
    ws = init_workspace(root)
    shutil.rmtree(ws.cache_dir, ignore_errors=True)
    (CACHE / "cache").mkdir(parents=True, exist_ok=True)
    ws.cache_dir.symlink_to(CACHE / "cache", target_is_directory=True)
    return ws


class Features:
    """Cached Lite0 body features (image, mirror) of any photo, keyed by content hash like the product's."""

    def __init__(self, ws):
        from loop.data.images import file_sha256

        self.sha = file_sha256
        backbone = get_backbone(ws.settings.model.backbone)
        self.backbone = backbone
        self.net = create_network(ws, backbone.name, 2)
        self.size = ws.settings.model.image_size
        self.folder = features_dir(ws.cache_dir, backbone.name, self.size, weights_tag(ws, backbone.name))

    def of(self, paths: list[Path]) -> np.ndarray:
        ids = [self.sha(p) for p in paths]
        by_id = dict(zip(ids, paths, strict=True))
        return cached_features(self.net, ids, lambda i: load_model_input(by_id[i], self.size), folder=self.folder,
                               mean=self.backbone.mean, std=self.backbone.std)


def deployed_logits(ws, feats: np.ndarray, version: str | None = None) -> tuple[np.ndarray, dict]:
    """Logits (calibration included) of the deployed network (or `version`) for body features (N, F); its spec."""
    from safetensors.numpy import load_file

    model_dir = registry.model_dir(ws, version) if version else registry.current_model_dir(ws)
    spec = read_spec(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    head = get_backbone(spec["architecture"]).classifier
    return feats @ state[f"{head}.weight"].T + state[f"{head}.bias"], spec


def deployed_unfamiliar(ws, feats: np.ndarray, logits: np.ndarray, version: str | None = None) -> np.ndarray:
    """Which photos the deployed model (or `version`) sends to `_other` (flag `unfamiliar`), as `sort` decides;
    all False for a model without the unfamiliar score."""
    model_dir = registry.model_dir(ws, version) if version else registry.current_model_dir(ws)
    familiarity = load_familiarity(model_dir, read_spec(model_dir))
    return familiarity.decide(feats, logits)[1] if familiarity is not None else np.zeros(len(feats), bool)


def check_against_onnx(ws, paths: list[Path], feats: np.ndarray) -> float:
    """Max |p_features - p_onnx| over a sample: the feature shortcut is the deployed network."""
    predictor = load_predictor(registry.current_model_dir(ws), "onnx")
    batch = np.stack([load_model_input(p, predictor.image_size) for p in paths])
    logits, _ = deployed_logits(ws, feats)
    return float(np.abs(predictor.predict(batch) - softmax(logits)).max())


def probe_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
                   ) -> tuple[float, float]:
    """The all-labels probe: the product's recipe on every labeled photo; (test accuracy, seconds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    xx = x.reshape(-1, x.shape[-1])
    yy, gg = np.repeat(y, 2), np.repeat(groups, 2)
    with threadpool_limits(1):
        c, _, _, _ = choose_c(xx, yy, gg)
        scaler = StandardScaler().fit(xx)
        model = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(xx), yy)
    acc = float((model.predict(scaler.transform(x_test)) == y_test).mean())
    return acc, time.perf_counter() - started


def test_report(ws, feats_test: np.ndarray, labels_test: list[str], version: str | None = None) -> dict:
    """Accuracy, flags at the operating point and ECE of the deployed model (or `version`) on the test items.

    `catch`: the share of mistakes flagged unsure (the flags' operating point); `catch_any`: flagged unsure or
    sent to `_other` (flag `unfamiliar`), every photo `sort` flags for review. `accuracy` is the classifier's
    (every photo's top class); `right_folder` is what `sort` gets right: the top class and not sent to
    `_other` (`other_share`)."""
    logits, spec = deployed_logits(ws, feats_test, version)
    classes = spec["classes"]
    y = np.array([classes.index(v) if v in classes else -1 for v in labels_test])
    probs = softmax(logits)
    wrong = probs.argmax(1) != y
    point = settings_point(spec, ws.settings.sort)
    flagged = score(probs, point["strategy"]) >= point["threshold"] if point["threshold"] is not None \
        else np.zeros(len(y), bool)
    raw = softmax(logits * float(spec.get("temperature", 1.0)))
    other = deployed_unfamiliar(ws, feats_test, logits, version)
    either = flagged | other
    return {"accuracy": float((~wrong).mean()), "point": point, "flag_share": float(flagged.mean()),
            "other_share": float(other.mean()), "right_folder": float((~wrong & ~other).mean()),
            "catch": float((flagged & wrong).sum() / max(1, wrong.sum())), "mistakes": int(wrong.sum()),
            "flag_share_any": float(either.mean()), "catch_any": float((either & wrong).sum() / max(1, wrong.sum())),
            "ece_before": expected_calibration_error(raw, y), "ece_after": expected_calibration_error(probs, y),
            "spec": spec}


def product_selection(ws, k: int, strategy: str) -> list[str]:
    """What `review push` sends with a day's budget of k: the review queue's pick (`loop.review.queue`,
    with `strategy`, TypiClust at cold start), then any other flags, in push's own order."""
    queue.choose(ws, k, strategy)
    rows = within_budget(select_candidates(manifest.load(ws)), k)
    return rows["image_id"].astype(str).tolist()


def start_arm(root: Path, labeled_dir: Path, labeled_items: Path, pool_dir: Path, pool_items: Path):
    """One arm's workspace: the labeled folder ingested with labels, the pool without, a first model deployed."""
    ws = new_workspace(root)
    ingest_folder(ws, labeled_dir, source="user", labeled=True, items_csv=labeled_items)
    ingest_folder(ws, pool_dir, source="user", labeled=False, items_csv=pool_items)
    deploy(ws, train(ws).version)
    return ws


def review_batch(ws, strategy: str | None, k: int, pool_ids: list[str], asked: list[str],
                 rng: np.random.Generator) -> list[str]:
    """One round's reviews: what `review push` sends with `strategy` (`product_selection`), or, with None,
    `k` random pool photos not asked before (the baseline arm)."""
    if strategy is not None:
        return product_selection(ws, k, strategy)
    left = [i for i in pool_ids if i not in set(asked)]
    return list(rng.choice(left, size=min(k, len(left)), replace=False))


def load_meta(name: str, per_group: int) -> pd.DataFrame:
    """The dataset's manifest, thinned to at most `per_group` photos per item group (0 = all)."""
    meta = pd.read_csv(DATA / name / "manifest.csv")
    if per_group:  # e.g. eth80's 41 views of each object: every k-th view, evenly spread
        keep = [i for _, g in meta.groupby("group")
                for i in g.index[np.linspace(0, len(g) - 1, min(per_group, len(g))).round().astype(int)]]
        meta = meta.loc[sorted(set(keep))].reset_index(drop=True)
    return meta


def run_split(name: str, meta: pd.DataFrame, seed: int, args, scratch: Path) -> dict:
    """Parts 1-4 on one three-way split of the item groups (printed); returns the numbers for the summary."""
    dataset = DATA / name
    parts = split_groups(meta, seed)
    print(f"\n--- {name}, split seed {seed}: labeled {len(parts['labeled'])} / pool {len(parts['pool'])} / "
          f"test {len(parts['test'])} photos (whole groups) ---")
    scratch = scratch / f"{name}-{seed}"
    labeled_dir, labeled_items = link_tree(parts["labeled"], dataset, scratch / "labeled")
    pool_dir, pool_items = link_tree(parts["pool"], dataset, scratch / "pool")

    ws = new_workspace(scratch / "ws0")
    features = Features(ws)
    test_paths = [dataset / p for p in parts["test"]["path"]]
    test_feats = features.of(test_paths)[:, 0]
    test_labels = parts["test"]["cls"].tolist()

    # 1. the product's own path vs the all-labels probe on the same features (cached first for both)
    lab_feats = features.of([dataset / p for p in parts["labeled"]["path"]])
    ingest_folder(ws, labeled_dir, source="user", labeled=True, items_csv=labeled_items)
    started = time.perf_counter()
    trained = train(ws)
    train_s = time.perf_counter() - started
    deploy(ws, trained.version)
    sample = min(16, len(test_paths))
    gap = check_against_onnx(ws, test_paths[:sample], test_feats[:sample])
    result = test_report(ws, test_feats, test_labels)
    classes = sorted(parts["labeled"]["cls"].unique())
    y = np.array([classes.index(c) for c in parts["labeled"]["cls"]])
    y_test = np.array([classes.index(c) if c in classes else -1 for c in test_labels])
    probe, probe_s = probe_accuracy(lab_feats, y, parts["labeled"]["group"].astype(str).to_numpy(), test_feats,
                                    y_test)
    spec = result["spec"]
    print(f"product (train {spec['n_train']} labels, gate set {spec['n_valid']}): test accuracy "
          f"{result['accuracy']:.3f}; all-labels probe ({len(y)} labels): {probe:.3f}; "
          f"difference {result['accuracy'] - probe:+.3f} (target within 0.02)")
    print(f"  feature shortcut vs ONNX Runtime on {sample} test photos: max |dp| = {gap:.1e}; "
          f"time ratio product train (incl. CV, calibration, ONNX export) / probe fit = {train_s / probe_s:.1f}x")
    cv = spec["metrics"]["cv_user"]
    gate = spec["metrics"]["user_valid"]
    gate_text = f"{gate['accuracy']:.3f}" if gate["accuracy"] is not None else "none (too few items per class)"
    print(f"  out-of-fold accuracy {cv['accuracy']:.3f} (n={cv['n']}), gate-set accuracy {gate_text} "
          f"(n={gate['n']})")

    # 2. the catch curve and the operating point, estimated vs measured on unseen items
    point = result["point"]
    print(f"  flags ({point['goal']}): strategy {point['strategy']}, threshold {point['threshold']:.3f}; "
          f"estimated out of fold: flags {point['expected_share']:.0%}, catches {point['expected_catch']:.0%}; "
          f"measured on test items: flags {result['flag_share']:.0%}, catches {result['catch']:.0%} of "
          f"{result['mistakes']} mistakes")
    curves = spec["flagging"]["curves"]
    shares = (0.05, 0.1, 0.2, 0.3, 0.5)
    print("  catch curve (out of fold), share flagged -> share of mistakes caught:")
    for strategy, curve in curves.items():
        row = ", ".join(f"{s:.0%}->{curve['catch'][round(s * 100)]:.2f}" for s in shares)
        print(f"    {strategy:<17}{row}")

    # 3. calibration
    cal = spec["calibration"]
    print(f"  calibration: T={cal['temperature']:.2f}; ECE out of fold {cal['ece_oof_before']:.3f} -> "
          f"{cal['ece_oof_after']:.3f}; on test items {result['ece_before']:.3f} -> {result['ece_after']:.3f}")
    out = {"accuracy": result["accuracy"], "probe": probe, "flag_share": result["flag_share"],
           "caught": round(result["catch"] * result["mistakes"]), "mistakes": result["mistakes"],
           "expected_share": point["expected_share"], "expected_catch": point["expected_catch"],
           "ece_before": result["ece_before"], "ece_after": result["ece_after"], "loop": {}}
    if args.rounds == 0:
        return out

    # 4. the loop: rounds of reviews, the product's selection vs random pool photos
    truth = dict(zip(features_ids(pool_dir, parts["pool"]), parts["pool"]["cls"], strict=True))
    pool_ids = list(truth)
    for arm in [*(f"product:{s}" for s in args.strategies), "random"]:
        ws_arm = start_arm(scratch / f"ws-{arm.replace(':', '-')}", labeled_dir, labeled_items, pool_dir, pool_items)
        accs = [test_report(ws_arm, test_feats, test_labels)["accuracy"]]
        rng = np.random.default_rng(seed)
        asked: list[str] = []
        for _ in range(args.rounds):
            chosen = review_batch(ws_arm, None if arm == "random" else arm.split(":")[1], args.reviews, pool_ids,
                                  asked, rng)
            asked += chosen
            record_reviews(ws_arm, pd.DataFrame({"image_id": chosen, "truth": [truth[i] for i in chosen]}))
            trained = train(ws_arm)
            decision = deploy(ws_arm, trained.version)
            accs.append(test_report(ws_arm, test_feats, test_labels)["accuracy"])
            if not decision.promoted:
                refused = test_report(ws_arm, test_feats, test_labels, trained.version)["accuracy"]
                why = next((r for r in decision.reasons if r.startswith("FAIL")), decision.reasons[0])
                print(f"    {arm}: {trained.version} refused (its test accuracy {refused:.3f} vs deployed "
                      f"{accs[-1]:.3f}): {why}")
        print(f"  loop, {arm:<17} ({len(asked)} reviews of {len(pool_ids)} pool photos in {args.rounds} rounds): "
              "test accuracy per round " + " -> ".join(f"{a:.3f}" for a in accs))
        out["loop"][arm] = accs
    return out


def summarize(name: str, runs: list[dict], rounds: int) -> None:
    """Means over the splits: what one split's noise (a few test items) cannot show."""
    n = len(runs)
    mean = {k: float(np.mean([r[k] for r in runs])) for k in ("accuracy", "probe", "flag_share", "expected_share",
                                                             "expected_catch", "ece_before", "ece_after")}
    caught, mistakes = sum(r["caught"] for r in runs), sum(r["mistakes"] for r in runs)
    print(f"\n=== {name}: mean over {n} split(s) of the item groups ===")
    print(f"  product test accuracy {mean['accuracy']:.3f} vs all-labels probe {mean['probe']:.3f} "
          f"(difference {mean['accuracy'] - mean['probe']:+.3f}; target within 0.02)")
    print(f"  flags at the default goal: estimated out of fold {mean['expected_share']:.0%} flagged, "
          f"{mean['expected_catch']:.0%} caught; measured on unseen items {mean['flag_share']:.0%} flagged, "
          f"{caught}/{mistakes} = {caught / max(1, mistakes):.2f} of mistakes caught (target 0.7)")
    print(f"  ECE on unseen items {mean['ece_before']:.3f} -> {mean['ece_after']:.3f}")
    if not rounds:
        return
    curves = {arm: np.array([r["loop"][arm] for r in runs]) for arm in runs[0]["loop"]}
    for arm, acc in curves.items():
        print(f"  loop, {arm:<17} mean test accuracy per round " + " -> ".join(f"{a:.3f}" for a in acc.mean(0)))
    # Area over the review rounds (rounds 1..R; round 0 is the same model in every arm), paired per split.
    for arm, acc in curves.items():
        if arm == "random":
            continue
        diff = acc[:, 1:].mean(1) - curves["random"][:, 1:].mean(1)
        wins = int((diff > 0).sum())
        print(f"  {arm} - random, mean accuracy over rounds 1-{rounds}: {diff.mean():+.3f} "
              f"(per split: {', '.join(f'{d:+.3f}' for d in diff)}; ahead on {wins} of {n}); "
              f"after round {rounds}: {(acc[:, -1] - curves['random'][:, -1]).mean():+.3f}")


def run_dataset(name: str, args, scratch: Path) -> None:
    meta = load_meta(name, args.per_group)
    print(f"\n=== {name}: {len(meta)} photos, {meta['group'].nunique()} item groups ===")
    runs = [run_split(name, meta, args.seed + i, args, scratch) for i in range(args.splits)]
    summarize(name, runs, args.rounds)


def features_ids(pool_dir: Path, rows: pd.DataFrame) -> list[str]:
    """Image ids (content hashes) of the pool photos, in `rows` order."""
    from loop.data.images import file_sha256

    return [file_sha256(pool_dir / p) for p in rows["path"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ikea_products", "eth80"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reviews", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="the first three-way split of the item groups")
    parser.add_argument("--strategies", nargs="+", default=[DEFAULT_BATCH_STRATEGY],
                        help="review-queue strategies to simulate, one arm each (default: the product's default)")
    parser.add_argument("--no-item-spread", action="store_true", help="ablation: the review queue takes the "
                        "strategy's top photos even when several show one item (queue.ITEM_SPREAD = 1)")
    parser.add_argument("--splits", type=int, default=3, help="how many splits (seeds seed, seed+1, ...): "
                        "the summary averages them, since one split's few test items are noisy")
    parser.add_argument("--per-group", type=int, default=0, help="at most this many photos per item group "
                        "(evenly spread; 0 = all), to bound the first run's feature extraction on 2 cores")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.no_item_spread:
        queue.ITEM_SPREAD = 1
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        for name in args.datasets:
            run_dataset(name, args, Path(tmp))


if __name__ == "__main__":
    main()
