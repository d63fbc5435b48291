"""Does the loop learn the shop's own photos, and does the gate let it?

Labeled = all of `../shared/data/ikea_products` (studio shots, one object on white, ingested as the user's
labeled folder with its item groups); the shop's photos = `../shared/data/rooms` (web photos of beds, chairs
and sofas, many in rooms), split per class by item group (here every photo is its own group) into a
**pool** (photos the shop sorts and may review) and a **test** part (never reviewed, never trained on).
Per seed, through the product's own library calls (what the CLI runs):

0. `ingest --labeled` (ikea) -> `train` -> `deploy`: the ikea-only model; the pool is registered unlabeled.
1. each round, per arm: "sort" the pool (the deployed model's predictions and flags recorded in the manifest
   as `sort` records them, computed from cached features: the deployed network's output, no copies made;
   photos its unfamiliar score rejects are flagged `unfamiliar`, as `sort` flags those it copies to `_other`);
   review 30 photos, the **product** arm what `review push` sends with a day's budget of 30 (the review
   queue), the **random** arm 30 random pool photos, the simulated reviewer answering with the true class as
   `review pull` records it; `train`; `deploy` with the product's own gate; test accuracy of the deployed
   model on the test part.

Printed per round and arm: test accuracy (the classifier's top class), the gate's decision with both kinds
of evidence, for every refused candidate what it would have scored on the test part, and what `sort` does:
the share of the test part sent to `_other` by the unfamiliar score (in-scope photos lost from their
folders), the share in the right folder, and the share of out-of-scope photos (eth80, 5 views per object,
and generated non-photos; never trained on) sent to `_other`; after the last round, the flags' catch rate
on the test part (share of the deployed model's test mistakes its flags mark: unsure alone, and unsure or
unfamiliar, which is every photo `sort` flags for review) and the share flagged. The
summary gives means over the seeds, the gain over ikea-only, the product - random difference per round,
an all-labels probe (the same recipe on ikea plus every pool photo with its true class: the ceiling of any
selection), and the refusals that were >= 0.02 better on the test part than the model they failed to replace.
INT8 export is off in these workspaces (`model.int8 = false`): it does not change what the gate decides,
and costs ~30 s a training on 2 cores. Features are cached in `.cache/bench-learning/` (shared with
bench/learning.py; the first run extracts ikea's and rooms' features: minutes).

    .venv/bin/python bench/domain_shift.py [--seeds 3] [--rounds 3] [--reviews 30] [--pool-share 0.5]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.learning import (  # noqa: E402
    DATA,
    Features,
    deployed_logits,
    deployed_unfamiliar,
    link_tree,
    load_meta,
    new_workspace,
    probe_accuracy,
    review_batch,
    start_arm,
)
from bench.learning import test_report as report_on  # noqa: E402
from bench.unfamiliar import non_photos  # noqa: E402
from loop.config import DEFAULT_BATCH_STRATEGY  # noqa: E402
from loop.data import manifest  # noqa: E402
from loop.learning import registry  # noqa: E402
from loop.learning.deployment import deploy  # noqa: E402
from loop.learning.gate import NEW_LABELS, describe_evidence  # noqa: E402
from loop.learning.train import train  # noqa: E402
from loop.model.artifact import softmax  # noqa: E402
from loop.scoring.flagging import settings_point  # noqa: E402
from loop.scoring.strategies import score  # noqa: E402
from loop.sorting.folder import record_predictions  # noqa: E402
from sortloop.demo_review import record_reviews  # noqa: E402

OUT_OF_SCOPE_VIEWS = 5  # eth80 views per object (as bench/unfamiliar.py's default), plus generated non-photos
ARMS = ("product", "random")


def split_rooms(meta: pd.DataFrame, seed: int, pool_share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Whole item groups per class: `pool_share` to the pool, the rest to the test part."""
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for _, groups in meta.groupby("cls")["group"]:
        names = list(rng.permutation(sorted(groups.unique())))
        k = round(len(names) * pool_share)
        pool += names[:k]
        test += names[k:]
    return meta[meta["group"].isin(pool)].reset_index(drop=True), meta[meta["group"].isin(test)].reset_index(drop=True)


def sort_pool(ws, pool_ids: list[str], pool_feats: np.ndarray) -> None:
    """What `sort` records in the manifest for the pool: the deployed model's guess, confidence, score, flag."""
    logits, spec = deployed_logits(ws, pool_feats)
    probs = softmax(logits)
    point = settings_point(spec, ws.settings.sort)
    scores = score(probs, point["strategy"])
    flagged = scores >= point["threshold"] if point["threshold"] is not None else np.zeros(len(probs), bool)
    other = deployed_unfamiliar(ws, pool_feats, logits)  # sort copies these to _other, flagged `unfamiliar`
    classes = spec["classes"]
    record_predictions(ws, {i: (classes[int(p.argmax())], float(p.max()), float(s), bool(f or o))
                            for i, p, s, f, o in zip(pool_ids, probs, scores, flagged, other, strict=True)},
                       registry.current_version(ws), unfamiliar={i for i, o in zip(pool_ids, other, strict=True) if o})


def run_seed(seed: int, args, scratch: Path) -> dict:
    """One seed: both arms over the rounds (printed); returns the numbers for the summary."""
    rooms_meta = pd.read_csv(DATA / "rooms" / "manifest.csv")
    pool, test = split_rooms(rooms_meta, seed, args.pool_share)
    print(f"\n--- seed {seed}: labeled = ikea_products ({len(pd.read_csv(DATA / 'ikea_products' / 'manifest.csv'))} "
          f"photos); rooms pool {len(pool)}, test {len(test)} photos (whole groups) ---")
    scratch = scratch / f"seed{seed}"
    ikea = DATA / "ikea_products"
    ikea_meta = pd.read_csv(ikea / "manifest.csv")
    labeled_dir, labeled_items = link_tree(ikea_meta, ikea, scratch / "labeled")
    pool_dir, pool_items = link_tree(pool, DATA / "rooms", scratch / "pool")

    ws0 = new_workspace(scratch / "features")
    features = Features(ws0)
    test_feats = features.of([DATA / "rooms" / p for p in test["path"]])[:, 0]
    pool_paths = [pool_dir / p for p in pool["path"]]
    pool_feats = features.of(pool_paths)[:, 0]
    pool_ids = [features.sha(p) for p in pool_paths]
    truth = dict(zip(pool_ids, pool["cls"], strict=True))
    test_labels = test["cls"].tolist()
    # Out of scope, never trained on: what the unfamiliar score must still send to _other as it adapts.
    eth = load_meta("eth80", OUT_OF_SCOPE_VIEWS)
    outside = features.of([DATA / "eth80" / p for p in eth["path"]] + non_photos(scratch / "non-photos"))[:, 0]

    def outside_sent(ws) -> float:
        return float(deployed_unfamiliar(ws, outside, deployed_logits(ws, outside)[0]).mean())

    out: dict = {"accuracy": {}, "refused": [], "catch": {}, "flag_share": {}, "catch_any": {}, "flag_share_any": {},
                 "decisions": {}, "other": {}, "right_folder": {}, "outside_sent": {}}
    # The ceiling: the same recipe on ikea plus EVERY pool photo with its true class (no selection at all).
    ikea_feats = features.of([ikea / p for p in ikea_meta["path"]])
    classes = sorted(ikea_meta["cls"].unique())
    x = np.concatenate([ikea_feats, features.of(pool_paths)])
    y = np.array([classes.index(c) for c in [*ikea_meta["cls"], *pool["cls"]]])
    groups = np.array([*ikea_meta["group"].astype(str), *("pool-" + pool["group"].astype(str))])
    out["probe"], _ = probe_accuracy(x, y, groups, test_feats, np.array([classes.index(c) for c in test_labels]))
    print(f"  all-labels probe (ikea + all {len(pool)} pool photos labeled, same recipe): test accuracy "
          f"{out['probe']:.3f}")
    for arm in ARMS:
        ws = start_arm(scratch / f"ws-{arm}", labeled_dir, labeled_items, pool_dir, pool_items)
        assert not ws.settings.model.int8, "SORTLOOP_MODEL__INT8=false did not reach the bench workspace"
        first = report_on(ws, test_feats, test_labels)
        accs, others, rights, outs = [first["accuracy"]], [first["other_share"]], [first["right_folder"]], \
            [outside_sent(ws)]
        rng = np.random.default_rng(seed)
        asked: list[str] = []
        decisions = []
        for r in range(1, args.rounds + 1):
            sort_pool(ws, pool_ids, pool_feats)
            chosen = review_batch(ws, DEFAULT_BATCH_STRATEGY if arm == "product" else None, args.reviews, pool_ids,
                                  asked, rng)
            asked += chosen
            guessed = manifest.load(ws).set_index("image_id")["pred_label"]
            wrong = sum(truth[i] != guessed[i] for i in chosen)
            record_reviews(ws, pd.DataFrame({"image_id": chosen, "truth": [truth[i] for i in chosen]}))
            trained = train(ws)
            decision = deploy(ws, trained.version)
            now = report_on(ws, test_feats, test_labels)
            accs.append(now["accuracy"])
            others.append(now["other_share"])
            rights.append(now["right_folder"])
            outs.append(outside_sent(ws))
            evidence = describe_evidence(decision.evidence)
            verdict = "promoted" if decision.promoted else "REFUSED"
            line = (f"  {arm:<8} round {r}: {len(chosen)} reviews ({wrong} corrections); {trained.version} {verdict}"
                    f" ({evidence}); test accuracy {accs[-1]:.3f}; to _other {others[-1]:.0%} of the test part "
                    f"(right folder {rights[-1]:.3f}), {outs[-1]:.0%} of out-of-scope photos")
            if not decision.promoted:
                refused = report_on(ws, test_feats, test_labels, trained.version)["accuracy"]
                why = next((x for x in decision.reasons if x.startswith("FAIL")), decision.reasons[0])
                line += f"\n           refused candidate's test accuracy {refused:.3f}: {why}"
                out["refused"].append({"arm": arm, "round": r, "gain": refused - accs[-1], "why": why})
            print(line)
            decisions.append((decision.promoted, (decision.evidence.get(NEW_LABELS) or {}).get("n", 0)))
        final = report_on(ws, test_feats, test_labels)
        print(f"  {arm:<8} test accuracy per round " + " -> ".join(f"{a:.3f}" for a in accs)
              + f"; flags on the test part: unsure {final['flag_share']:.0%} flagged, {final['catch']:.2f} of "
              f"{final['mistakes']} mistakes caught ({final['point']['goal']}); unsure or unfamiliar "
              f"{final['flag_share_any']:.0%} flagged, {final['catch_any']:.2f} caught")
        out["accuracy"][arm] = accs
        out["other"][arm], out["right_folder"][arm], out["outside_sent"][arm] = others, rights, outs
        out["catch"][arm] = (round(final["catch"] * final["mistakes"]), final["mistakes"])
        out["flag_share"][arm] = final["flag_share"]
        out["catch_any"][arm] = (round(final["catch_any"] * final["mistakes"]), final["mistakes"])
        out["flag_share_any"][arm] = final["flag_share_any"]
        out["decisions"][arm] = decisions
    return out


def summarize(runs: list[dict], rounds: int) -> None:
    """Means over the seeds: what one split's noise cannot show."""
    n = len(runs)
    print(f"\n=== mean over {n} seed(s) ===")
    acc = {arm: np.array([r["accuracy"][arm] for r in runs]) for arm in ARMS}
    for arm in ARMS:
        print(f"  {arm:<8} test accuracy per round " + " -> ".join(f"{a:.3f}" for a in acc[arm].mean(0))
              + f"  (gain after round {rounds} over ikea-only: {(acc[arm][:, -1] - acc[arm][:, 0]).mean():+.4f})")
    for arm in ARMS:
        per_round = {k: np.array([r[k][arm] for r in runs]).mean(0) for k in ("other", "right_folder", "outside_sent")}
        print(f"  {arm:<8} sort's view per round: test photos to _other "
              + " -> ".join(f"{a:.1%}" for a in per_round["other"]) + "; in the right folder "
              + " -> ".join(f"{a:.3f}" for a in per_round["right_folder"]) + "; out-of-scope photos to _other "
              + " -> ".join(f"{a:.1%}" for a in per_round["outside_sent"]))
    print(f"  all-labels probe (ikea + every pool photo, the ceiling of any selection): "
          f"{np.mean([r['probe'] for r in runs]):.3f}")
    diff = acc["product"][:, 1:] - acc["random"][:, 1:]
    print("  product - random per round: " + ", ".join(f"{d:+.3f}" for d in diff.mean(0))
          + f" (product ahead at every round: {bool((diff.mean(0) >= 0).all())})")
    for arm in ARMS:
        mistakes = sum(r["catch"][arm][1] for r in runs)
        for what, catch, flags in (("unsure", "catch", "flag_share"),
                                   ("unsure or unfamiliar (all sort flags)", "catch_any", "flag_share_any")):
            caught = sum(r[catch][arm][0] for r in runs)
            share = np.mean([r[flags][arm] for r in runs])
            print(f"  {arm:<8} flags after round {rounds}, {what}: {share:.0%} of test photos flagged, caught "
                  f"{caught}/{mistakes} = {caught / max(1, mistakes):.2f} of the test part's mistakes")
    refused = [x for r in runs for x in r["refused"]]
    promoted = sum(p for r in runs for arm in ARMS for p, _ in r["decisions"][arm])
    costly = [x for x in refused if x["gain"] >= 0.02]
    print(f"  gate: {promoted} promoted, {len(refused)} refused; refused yet >= 0.02 better on the test part: "
          f"{len(costly)}" + "".join(f"\n    {x['arm']} round {x['round']}: +{x['gain']:.3f} ({x['why']})"
                                     for x in costly))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="the first seed (seeds seed, seed+1, ...)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reviews", type=int, default=30)
    parser.add_argument("--pool-share", type=float, default=0.5, help="share of each class's rooms groups in the pool")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["SORTLOOP_MODEL__INT8"] = "false"  # see the module docstring
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-domain-shift-") as tmp:
        runs = [run_seed(args.seed + i, args, Path(tmp)) for i in range(args.seeds)]
    summarize(runs, args.rounds)
    print(f"\n({time.perf_counter() - started:.0f} s wall)")


if __name__ == "__main__":
    main()
