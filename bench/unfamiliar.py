"""Does the unfamiliar score keep photos that fit no category out of the category folders?

Per seed, the in-scope photos are split by whole items: `ikea_products` items ~3/4 labeled, the rest test
(unseen items); `rooms` photos (each its own item) half labeled, half test. The labeled photos go through
the product's own path (`ingest --labeled --items` -> `train`, head mode, INT8 off to save time), so the
threshold is the one `train` calibrated out of fold and stored in the artifact. Out of scope (never seen by
training, never used to set anything): `eth80` (toy animals, fruit, cars, cups; a few views per object)
and generated non-photos (flat colours, text renders, noise).

Printed per seed and as means:
- AUROC (in-scope test vs out-of-scope) of the product's score and of the alternatives measured on the same
  features and the same deployed head: kNN at k = 1, 5, 10, class-conditional Mahalanobis (shared,
  shrunk covariance), energy, max-logit, max-probability;
- at the artifact's threshold: the share of out-of-scope photos sent to `_other`, and of in-scope ones;
- in-scope accuracy and the flags' catch rate today (every photo to a category) and on the photos kept;
- near out of scope: per seed, a whole furniture class (`--held-out`, ikea and rooms photos) the model is
  trained without, against the unseen items of the others (same scenes, same kind of object: harder).

Scores come from cached body features (the body is frozen in head mode, so these are the deployed
network's features; checked against ONNX Runtime's `features` output on a sample).

    .venv/bin/python bench/unfamiliar.py [--seeds 3] [--seed 0] [--eth80-views 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench.learning as learning  # noqa: E402
from loop.data.images import load_model_input  # noqa: E402
from loop.data.ingest import ingest_folder  # noqa: E402
from loop.learning import registry  # noqa: E402
from loop.learning.deployment import deploy  # noqa: E402
from loop.learning.train import train  # noqa: E402
from loop.model.artifact import load_predictor, read_spec, softmax  # noqa: E402
from loop.scoring.flagging import estimate, settings_point  # noqa: E402
from loop.scoring.paired import binomial_p  # noqa: E402
from loop.scoring.strategies import score  # noqa: E402
from loop.scoring.unfamiliar import (  # noqa: E402
    bounded_threshold,
    energy,
    knn_scores,
    leave_item_out_scores,
    load_familiarity,
    on_scale,
)  # noqa: E402

DATA = Path(os.environ.get("SORTLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
learning.DATA = DATA


def non_photos(folder: Path, n: int = 20) -> list[Path]:
    """Generated out-of-scope images: flat colours, text renders, noise (deterministic, `n` of each)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1234)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        img = Image.new("RGB", (320, 240), colour)
        paths.append(folder / f"flat_{i:02d}.png")
        img.save(paths[-1])
        img = Image.new("RGB", (320, 240), (255, 255, 255) if i % 2 else (250, 245, 230))
        draw = ImageDraw.Draw(img)
        for line in range(8):
            words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, rng.integers(3, 9)))
                             for _ in range(5))
            draw.text((10, 10 + 28 * line), words, fill=(0, 0, 0))
        paths.append(folder / f"text_{i:02d}.png")
        img.save(paths[-1])
        noise = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        if i % 2:
            noise = np.repeat(np.repeat(noise[::16, ::16], 16, 0), 16, 1)  # blocky noise
        paths.append(folder / f"noise_{i:02d}.png")
        Image.fromarray(noise).save(paths[-1])
    return paths


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an out-of-scope photo > score of an in-scope one); ties count half."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def mahalanobis_scores(x_fit: np.ndarray, y_fit: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Min over classes of the squared Mahalanobis distance (class means, shared Ledoit-Wolf covariance)."""
    from sklearn.covariance import LedoitWolf

    classes = np.unique(y_fit)
    means = np.stack([x_fit[y_fit == c].mean(0) for c in classes])
    centred = x_fit - means[np.searchsorted(classes, y_fit)]
    precision = LedoitWolf().fit(centred).precision_
    d = [np.einsum("ij,jk,ik->i", x - m, precision, x - m) for m in means]
    return np.min(np.stack(d, 1), axis=1)


def logsumexp(z: np.ndarray) -> np.ndarray:
    return np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)


def flags(probs: np.ndarray, spec: dict, ws) -> np.ndarray:
    """Which photos the model's flags (its operating point for the workspace's goal) mark."""
    point = settings_point(spec, ws.settings.sort)
    if point["threshold"] is None:
        return np.zeros(len(probs), bool)
    return score(probs, point["strategy"]) >= point["threshold"]


def split(seed: int) -> dict[str, pd.DataFrame]:
    """ikea items ~3/4 labeled per class, rooms photos half labeled; the rest is test."""
    ikea = learning.load_meta("ikea_products", 0).assign(dataset="ikea_products")
    rooms = learning.load_meta("rooms", 0).assign(dataset="rooms")
    rng = np.random.default_rng(seed)
    test_groups = []
    for _, groups in ikea.groupby("cls")["group"]:
        names = list(rng.permutation(sorted(groups.unique())))
        test_groups += names[:max(1, round(len(names) / 4))]
    rooms_test = rng.random(len(rooms)) < 0.5
    labeled = pd.concat([ikea[~ikea["group"].isin(test_groups)], rooms[~rooms_test]], ignore_index=True)
    test = pd.concat([ikea[ikea["group"].isin(test_groups)], rooms[rooms_test]], ignore_index=True)
    return {"labeled": labeled, "test": test}


def link_labeled(rows: pd.DataFrame, dest: Path) -> tuple[Path, Path]:
    """Symlinks `<cls>/<dataset>-<file>` to the shared photos and the items CSV (rooms: one item per photo)."""
    import csv

    items = dest.parent / "labeled_items.csv"
    dest.mkdir(parents=True, exist_ok=True)
    with open(items, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "item_id"])
        for r in rows.itertuples():
            rel = Path(r.cls) / f"{r.dataset}-{Path(r.path).name}"
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).symlink_to(DATA / r.dataset / r.path)
            writer.writerow([str(rel), f"{r.dataset}:{r.group}"])
    return dest, items


def paths(rows: pd.DataFrame) -> list[Path]:
    return [DATA / d / p for d, p in zip(rows["dataset"], rows["path"], strict=True)]


def trained_model(rows: pd.DataFrame, root: Path):
    """The product's path on the labeled `rows`: ingest with items, train, deploy; (ws, model dir, spec, ids)."""
    from loop.learning.train import training_set

    folder, items = link_labeled(rows, root / "labeled")
    ws = learning.new_workspace(root / "ws")
    ingest_folder(ws, folder, source="user", labeled=True, items_csv=items)
    deploy(ws, train(ws).version)
    model_dir = registry.current_model_dir(ws)
    return ws, model_dir, read_spec(model_dir), set(training_set(model_dir)["image_id"])


def held_out_class(seed: int, cls: str, scratch: Path, features: learning.Features) -> dict:
    """Near out-of-scope: a whole furniture class (ikea and rooms photos) the model never learned, against
    the unseen items of the classes it did. Harder than eth80: same kind of scene, same kind of object."""
    parts = split(seed)
    labeled = parts["labeled"][parts["labeled"]["cls"] != cls]
    test = parts["test"][parts["test"]["cls"] != cls]
    every = pd.concat([parts["labeled"], parts["test"]])
    out_rows = every[every["cls"] == cls]
    ws, model_dir, spec, trained = trained_model(labeled, scratch / f"seed{seed}-without-{cls}")
    familiarity = load_familiarity(model_dir, spec)
    lab_ids = [features.sha(p) for p in paths(labeled)]
    keep = np.array([i in trained for i in lab_ids])
    lab_feats = features.of(paths(labeled))[keep, 0]
    y_lab = np.array([spec["classes"].index(c) for c in labeled["cls"][keep]])
    in_feats, out_feats = features.of(paths(test))[:, 0], features.of(paths(out_rows))[:, 0]
    logits_in, _ = learning.deployed_logits(ws, in_feats)
    logits_out, _ = learning.deployed_logits(ws, out_feats)
    s_in, sent_in = familiarity.decide(in_feats, logits_in)
    s_out, sent_out = familiarity.decide(out_feats, logits_out)
    alternatives = alternative_scores(lab_feats, y_lab, (in_feats, logits_in), (out_feats, logits_out), familiarity)
    result = {"auroc": auroc(s_in, s_out), "out_sent": float(sent_out.mean()), "in_sent": float(sent_in.mean()),
              "alternatives": {k: auroc(a, b) for k, (a, b) in alternatives.items()}}
    print(f"  held-out class {cls!r} ({len(out_rows)} photos; model trained without it): AUROC {result['auroc']:.3f};"
          f" to _other: {result['out_sent']:.0%} of {cls}, {result['in_sent']:.1%} of in-scope unseen")
    print("    alternatives' AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in result["alternatives"].items()))
    return result


def alternative_scores(lab_feats: np.ndarray, y_lab: np.ndarray, inside: tuple[np.ndarray, np.ndarray],
                       outside: tuple[np.ndarray, np.ndarray], familiarity=None
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(in-scope scores, out-of-scope scores) per candidate, from (features, deployed logits) of each side;
    with `familiarity`, also the mean of kNN and energy on its in-scope scale (the product takes the max)."""
    (f_in, z_in), (f_out, z_out) = inside, outside
    mixed = {}
    if familiarity is not None and familiarity.energy_points is not None:
        def mean(f, z):
            return (on_scale(familiarity.knn_points, knn_scores(f, lab_feats, 1))
                    + on_scale(familiarity.energy_points, energy(z))) / 2
        mixed = {"mean(knn, energy)": (mean(f_in, z_in), mean(f_out, z_out))}
    return {**mixed,
        **{f"knn k={k}": (knn_scores(f_in, lab_feats, k), knn_scores(f_out, lab_feats, k)) for k in (1, 5, 10)},
        "mahalanobis": (mahalanobis_scores(lab_feats, y_lab, f_in), mahalanobis_scores(lab_feats, y_lab, f_out)),
        "energy": (-logsumexp(z_in), -logsumexp(z_out)),
        "max-logit": (-z_in.max(1), -z_out.max(1)),
        "max-prob": (-softmax(z_in).max(1), -softmax(z_out).max(1)),
    }


def run_seed(seed: int, out_paths: list[Path], out_feats: np.ndarray, out_kind: np.ndarray, scratch: Path,
             features: learning.Features) -> dict:
    parts = split(seed)
    labeled, test = parts["labeled"], parts["test"]
    ws, model_dir, spec, trained = trained_model(labeled, scratch / f"seed{seed}")
    familiarity = load_familiarity(model_dir, spec)
    section = spec["unfamiliar"]

    lab_paths = paths(labeled)
    keep = np.array([features.sha(p) in trained for p in lab_paths])  # the photos it trained on (no gate set)
    labeled = labeled[keep].reset_index(drop=True)
    lab_feats = features.of(lab_paths)[keep, 0]
    test_paths = paths(test)
    test_feats = features.of(test_paths)[:, 0]

    # the feature shortcut is the deployed network: its ONNX `features` output on a sample
    predictor = load_predictor(model_dir)
    sample = test_paths[:8] + out_paths[:4]
    pred = predictor.predict_with_familiarity(np.stack([load_model_input(p, predictor.image_size) for p in sample]))
    both = np.concatenate([test_feats[:8], out_feats[:4]])
    shortcut = familiarity.scores(both, learning.deployed_logits(ws, both)[0])
    gap = float(np.abs(pred.unfamiliar_scores - shortcut).max())

    # the product: scores and decisions of the artifact's Familiarity
    logits_in, _ = learning.deployed_logits(ws, test_feats)
    logits_out, _ = learning.deployed_logits(ws, out_feats)
    s_in, sent_in = familiarity.decide(test_feats, logits_in)
    s_out, sent_out = familiarity.decide(out_feats, logits_out)
    classes = spec["classes"]
    y = np.array([classes.index(c) for c in test["cls"]])
    probs = softmax(logits_in)
    wrong = probs.argmax(1) != y
    # today: the same head, flags sized on every out-of-fold photo (what a model without the score ships);
    # with the score: flags sized on the out-of-fold photos it keeps (train's `kept_flagging`)
    flagged = flags(probs, spec, ws)
    oof = pd.read_parquet(model_dir / "oof_predictions.parquet")
    today_spec = {**spec, "flagging": estimate(np.stack(oof["probs"].to_numpy()),
                                               np.array([classes.index(c) for c in oof["label"]]),
                                               oof["item_id"].astype(str).to_numpy())}
    flagged_today = flags(probs, today_spec, ws)
    kept = ~sent_in

    # the alternatives, on the same features and head
    y_lab = np.array([classes.index(c) for c in labeled["cls"]])
    alternatives = alternative_scores(lab_feats, y_lab, (test_feats, logits_in), (out_feats, logits_out),
                                      familiarity)
    # each kNN's own out-of-fold threshold (the same rule), for the share it would send
    item_ids = (labeled["dataset"] + ":" + labeled["group"].astype(str)).to_numpy()
    own = {}
    for k in (1, 5, 10):
        oof = leave_item_out_scores(lab_feats, item_ids, np.arange(len(lab_feats)), k)
        t = bounded_threshold(oof, item_ids, section["max_share"])
        own[f"knn k={k}"] = (float((alternatives[f"knn k={k}"][0] >= t).mean()),
                             float((alternatives[f"knn k={k}"][1] >= t).mean()))
    is_rooms = (test["dataset"] == "rooms").to_numpy()
    result = {
        "auroc": auroc(s_in, s_out),
        "auroc_by_kind": {kind: auroc(s_in, s_out[out_kind == kind]) for kind in np.unique(out_kind)},
        "alternatives": {name: auroc(a, b) for name, (a, b) in alternatives.items()},
        "own_threshold": own,
        "out_sent": float(sent_out.mean()),
        "out_sent_by_kind": {kind: float(sent_out[out_kind == kind].mean()) for kind in np.unique(out_kind)},
        "in_sent": float(sent_in.mean()), "in_sent_ikea": float(sent_in[~is_rooms].mean()),
        "in_sent_rooms": float(sent_in[is_rooms].mean()),
        "oof_sent": section["oof_in_scope_sent"], "threshold": section["threshold"],
        "acc_today": float((~wrong).mean()), "acc_kept": float((~wrong[kept]).mean()),
        "catch_today": float((flagged_today & wrong).sum() / max(1, wrong.sum())),
        "flagged_today": float(flagged_today.mean()), "flagged_kept": float(flagged[kept].mean()),
        "catch_kept": float((flagged & wrong & kept).sum() / max(1, (wrong & kept).sum())),
        "catch_today_on_kept": float((flagged_today & wrong & kept).sum() / max(1, (wrong & kept).sum())),
        "catch_with_unfamiliar": float(((flagged | sent_in) & wrong).sum() / max(1, wrong.sum())),
        "mistakes_sent": float((wrong & sent_in).sum() / max(1, wrong.sum())),
        # counts, pooled over seeds for the paired test (mistakes on kept photos caught by one set of flags only)
        "counts": {"wrong": int(wrong.sum()), "caught_today": int((flagged_today & wrong).sum()),
                   "wrong_kept": int((wrong & kept).sum()), "caught_kept": int((flagged & wrong & kept).sum()),
                   "kept_only_new": int((flagged & ~flagged_today & wrong & kept).sum()),
                   "kept_only_today": int((flagged_today & ~flagged & wrong & kept).sum())},
        "n_in": len(y), "n_out": len(out_feats), "gap": gap,
    }
    print(f"\n--- seed {seed}: labeled {len(labeled)} photos, test in-scope {len(y)} "
          f"(ikea unseen items {int((~is_rooms).sum())}, rooms {int(is_rooms.sum())}), out-of-scope {len(out_feats)}")
    print(f"  threshold {section['threshold']:.4f} (sends {section['oof_in_scope_sent']:.1%} of "
          f"{section['calibration_photos']} out-of-fold in-scope scores; {section['reference_rows']} reference "
          "rows); ONNX features vs cached: "
          f"max |d score| = {gap:.1e}")
    print(f"  AUROC {result['auroc']:.3f} (" + ", ".join(f"{k} {v:.3f}" for k, v in result["auroc_by_kind"].items())
          + ")")
    print("  alternatives' AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in result["alternatives"].items()))
    print("  kNN at its own out-of-fold threshold, out/in sent: " +
          ", ".join(f"{k} {out:.0%}/{inside:.0%}" for k, (inside, out) in own.items()))
    print(f"  to _other: out-of-scope {result['out_sent']:.1%} (" +
          ", ".join(f"{k} {v:.0%}" for k, v in result["out_sent_by_kind"].items()) +
          f"); in-scope {result['in_sent']:.1%} (ikea {result['in_sent_ikea']:.1%}, "
          f"rooms {result['in_sent_rooms']:.1%}; out of fold {result['oof_sent']:.1%})")
    print(f"  in-scope accuracy today {result['acc_today']:.3f}, on kept photos {result['acc_kept']:.3f}; "
          f"flags' catch today {result['catch_today']:.2f} ({result['flagged_today']:.0%} flagged), on kept "
          f"{result['catch_kept']:.2f} ({result['flagged_kept']:.0%} flagged; with the unfamiliar "
          f"flag, of every in-scope mistake: {result['catch_with_unfamiliar']:.2f}); "
          f"{result['mistakes_sent']:.0%} of today's\n  mistakes go to _other")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eth80-views", type=int, default=5, help="views per eth80 object (evenly spread)")
    parser.add_argument("--held-out", nargs="*", default=["sofa", "bed", "chair"],
                        help="per seed (in turn), a furniture class the model is trained without: near out-of-scope")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["SORTLOOP_MODEL__INT8"] = "false"  # the INT8 copy is not what this measures
    with tempfile.TemporaryDirectory(prefix="bench-unfamiliar-") as tmp:
        scratch = Path(tmp)
        features = learning.Features(learning.new_workspace(scratch / "features-ws"))
        eth = learning.load_meta("eth80", args.eth80_views)
        out_paths = [DATA / "eth80" / p for p in eth["path"]]
        generated = non_photos(scratch / "generated")
        out_paths += generated
        out_kind = np.array(["eth80"] * len(eth) + [p.name.split("_")[0] for p in generated])
        out_feats = features.of(out_paths)[:, 0]
        runs = []
        for i in range(args.seeds):
            runs.append(run_seed(args.seed + i, out_paths, out_feats, out_kind, scratch, features))
            if args.held_out:
                cls = args.held_out[i % len(args.held_out)]
                runs[-1]["held_out"] = held_out_class(args.seed + i, cls, scratch, features)
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if isinstance(runs[0][k], float)}
    print(f"\n=== mean over {len(runs)} seeds ===")
    print(f"  AUROC {mean['auroc']:.3f}; alternatives: " + ", ".join(
        f"{k} {np.mean([r['alternatives'][k] for r in runs]):.3f}" for k in runs[0]["alternatives"]))
    print(f"  default threshold: out-of-scope to _other {mean['out_sent']:.1%} (target >= 90%): " + ", ".join(
        f"{k} {np.mean([r['out_sent_by_kind'][k] for r in runs]):.0%}" for k in runs[0]["out_sent_by_kind"]))
    print(f"  unseen in-scope to _other {mean['in_sent']:.1%} (target <= 5%): ikea unseen items "
          f"{mean['in_sent_ikea']:.1%}, rooms {mean['in_sent_rooms']:.1%}; out of fold {mean['oof_sent']:.1%}")
    print(f"  in-scope accuracy today {mean['acc_today']:.3f} -> on kept photos {mean['acc_kept']:.3f}; flags' catch "
          f"today {mean['catch_today']:.2f} ({mean['flagged_today']:.0%} flagged) -> on kept photos "
          f"{mean['catch_kept']:.2f} ({mean['flagged_kept']:.0%} flagged; today's flags on those same kept photos "
          f"{mean['catch_today_on_kept']:.2f}; with the unfamiliar flag, of "
          f"every in-scope mistake: {mean['catch_with_unfamiliar']:.2f}); "
          f"{mean['mistakes_sent']:.0%} of today's mistakes go to _other")
    pooled = {k: sum(r["counts"][k] for r in runs) for k in runs[0]["counts"]}
    gained, lost = pooled["kept_only_new"], pooled["kept_only_today"]
    print(f"  pooled over seeds: flags' catch today {pooled['caught_today']}/{pooled['wrong']} mistakes "
          f"({pooled['caught_today'] / max(1, pooled['wrong']):.3f}); on kept photos {pooled['caught_kept']}/"
          f"{pooled['wrong_kept']} ({pooled['caught_kept'] / max(1, pooled['wrong_kept']):.3f}); on the same kept "
          f"mistakes, caught only by the flags sized on kept photos {gained}, only by today's flags {lost} "
          f"(one-sided exact McNemar, kept flags worse: p={binomial_p(lost, gained + lost):.3g})")
    held = [r["held_out"] for r in runs if "held_out" in r]
    if held:
        print(f"  held-out furniture class (near out-of-scope): AUROC {np.mean([h['auroc'] for h in held]):.3f}, "
              f"to _other {np.mean([h['out_sent'] for h in held]):.0%} of it, in-scope "
              f"{np.mean([h['in_sent'] for h in held]):.1%}; alternatives: " + ", ".join(
                  f"{k} {np.mean([h['alternatives'][k] for h in held]):.3f}" for k in held[0]["alternatives"]))


if __name__ == "__main__":
    main()
