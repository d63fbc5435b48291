"""Ways to learn from the shop's unlabeled photos, measured on the same features: which one self-training is.

The question behind `loop.model.self_training`: the shop sorts hundreds of photos and reviews a few dozen;
can the unreviewed ones help the head, and how? Setup as `bench/domain_shift.py`: labeled = ikea_products
(studio shots), the shop's photos = `rooms` split per class by item group into a pool and a test part
(same split per seed). Each seed reviews 0, 30, 60, 90 random pool photos (true class); the rest of the pool
is unlabeled. The head is the product's (StandardScaler + LogisticRegression on cached Lite0 features, image
and mirror rows), here with a fixed C (`--c`, no fold search, no gate set, no calibration: these numbers are
comparable with each other, not with `bench/domain_shift.py`'s). Printed, test accuracy on the test part:

- labels alone;
- self-training as `loop.model.self_training` does it (teacher = this fit, sure >= 0.8, weight 0.2), and with
  the teacher one round old (the model trained before the last 30 reviews, i.e. the deployed one);
- label-shift priors re-estimated on the unlabeled pool by EM (Saerens, Latinne & Decaestecker 2002), pure
  and mixed 90/10 with the training prior, with what each costs on the labeled set's unseen items;
- each domain's features standardised on its own statistics;
- averaging the mirror's logits at test time;
- a C sweep of the labels-alone head.

    .venv/bin/python bench/adaptation.py [--seeds 5] [--c 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.domain_shift import split_rooms  # noqa: E402
from bench.learning import DATA, Features, new_workspace  # noqa: E402
from loop.model.self_training import scaled_design, student  # noqa: E402

ROUNDS = (0, 30, 60, 90)
C_SWEEP = (0.1, 0.3, 1.0, 3.0, 10.0)


def fit(x: np.ndarray, y: np.ndarray, c: float, unlabeled: np.ndarray | None = None, teacher_labels=None):
    """The product's head on (N, 2, F) pairs: returns (log-probability function, training prior). With
    `unlabeled` (M, 2, F), self-trained by `loop.model.self_training.student`; `teacher_labels` = (x, y) of an
    older label set whose fit is the teacher instead of this one."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    flat, yy = x.reshape(-1, x.shape[-1]), np.repeat(y, 2)
    scaler = StandardScaler().fit(flat)
    model = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(flat), yy)
    if unlabeled is not None:
        teacher = model
        if teacher_labels is not None:
            tx, ty = teacher_labels
            teacher = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(tx.reshape(-1, tx.shape[-1])),
                                                                 np.repeat(ty, 2))
        _, x_all = scaled_design(flat, np.arange(len(flat)), unlabeled)  # the same scaler as `scaler`
        guessed = student(teacher, x_all, yy, len(flat))  # this label set plus the teacher's sure guesses
        model = guessed if guessed is not teacher else model
    prior = np.bincount(yy, minlength=int(y.max()) + 1) / len(yy)

    def log_probs(z: np.ndarray) -> np.ndarray:
        out = np.full((len(z), len(prior)), -30.0)
        out[:, model.classes_] = model.predict_log_proba(scaler.transform(z))
        return out

    return log_probs, prior


def em_priors(probs: np.ndarray, train_prior: np.ndarray, iters: int = 200) -> np.ndarray:
    """Class priors of unlabeled photos by EM on the model's probabilities (Saerens et al. 2002)."""
    prior = train_prior.copy()
    for _ in range(iters):
        q = probs * (prior / np.maximum(train_prior, 1e-12))
        q /= q.sum(axis=1, keepdims=True)
        new = q.mean(axis=0)
        if np.abs(new - prior).max() < 1e-7:
            return new
        prior = new
    return prior


def accuracy(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float((log_probs.argmax(axis=1) == y).mean())


def standardised(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    flat = ref.reshape(-1, ref.shape[-1])
    return (a - flat.mean(axis=0)) / (flat.std(axis=0) + 1e-6)


def run_seed(seed: int, c: float, ikea: tuple, rooms: tuple) -> dict[str, dict[int, float]]:
    (xi, yi, gi), (xr, yr, meta) = ikea, rooms
    rng = np.random.default_rng(seed)
    pool, test = split_rooms(meta, seed, 0.5)
    pidx = meta.index[meta["path"].isin(pool["path"])].to_numpy()
    tidx = meta.index[meta["path"].isin(test["path"])].to_numpy()
    order = rng.permutation(pidx)
    held = np.isin(gi, rng.choice(np.unique(gi), len(np.unique(gi)) // 3, replace=False))  # ikea unseen items
    out: dict[str, dict[int, float]] = {}

    def put(name: str, n: int, value: float) -> None:
        out.setdefault(name, {})[n] = value

    for n in ROUNDS:
        lab, unl = order[:n], order[n:]
        x, y = np.concatenate([xi, xr[lab]]), np.concatenate([yi, yr[lab]])
        alone, prior = fit(x, y, c)
        test_lp = alone(xr[tidx, 0])
        put("labels alone", n, accuracy(test_lp, yr[tidx]))
        put("self-training (teacher = this fit)", n, accuracy(fit(x, y, c, xr[unl])[0](xr[tidx, 0]), yr[tidx]))
        if n:
            older = order[: n - 30]
            teacher = (np.concatenate([xi, xr[older]]), np.concatenate([yi, yr[older]]))
            put("self-training (teacher one round old)", n,
                accuracy(fit(x, y, c, xr[unl], teacher_labels=teacher)[0](xr[tidx, 0]), yr[tidx]))
        # label-shift priors: fitted without the held ikea items, so the labeled set's cost is on unseen items
        part, part_prior = fit(np.concatenate([xi[~held], xr[lab]]), np.concatenate([yi[~held], yr[lab]]), c)
        shop_prior = em_priors(np.exp(part(xr[unl, 0])), part_prior)
        shop_lp, lab_lp = part(xr[tidx, 0]), part(xi[held, 0])
        put("  (fit without 1/3 of ikea items) on the shop's photos", n, accuracy(shop_lp, yr[tidx]))
        put("  (fit without 1/3 of ikea items) on those unseen ikea items", n, accuracy(lab_lp, yi[held]))
        for mix in (0.0, 0.1):
            target = (1 - mix) * shop_prior + mix * part_prior
            shift = np.log(np.maximum(target, 1e-12) / np.maximum(part_prior, 1e-12))
            put(f"EM priors, {1 - mix:.0%} re-estimated: shop's photos", n, accuracy(shop_lp + shift, yr[tidx]))
            put(f"EM priors, {1 - mix:.0%} re-estimated: unseen ikea items", n, accuracy(lab_lp + shift, yi[held]))
        x_std = np.concatenate([standardised(xi, xi), standardised(xr[lab], xr[pidx])])
        put("each domain standardised on its own statistics", n,
            accuracy(fit(x_std, y, c)[0](standardised(xr[tidx, 0], xr[pidx])), yr[tidx]))
        put("mirror logits averaged at test time", n, accuracy(test_lp + alone(xr[tidx, 1]), yr[tidx]))
        if n in (0, ROUNDS[-1]):
            for value in C_SWEEP:
                put(f"labels alone, C = {value:g}", n, accuracy(fit(x, y, value)[0](xr[tidx, 0]), yr[tidx]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--c", type=float, default=3.0, help="the head's C (the product chooses it by folds)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # log of a 0 probability in predict_log_proba
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        features = Features(new_workspace(Path(tmp) / "features"))
        ikea_meta = pd.read_csv(DATA / "ikea_products" / "manifest.csv")
        rooms_meta = pd.read_csv(DATA / "rooms" / "manifest.csv")
        classes = sorted(ikea_meta["cls"].unique())
        ikea = (features.of([DATA / "ikea_products" / p for p in ikea_meta["path"]]),
                np.array([classes.index(c) for c in ikea_meta["cls"]]), ikea_meta["group"].astype(str).to_numpy())
        rooms = (features.of([DATA / "rooms" / p for p in rooms_meta["path"]]),
                 np.array([classes.index(c) for c in rooms_meta["cls"]]), rooms_meta)
        runs = [run_seed(seed, args.c, ikea, rooms) for seed in range(args.seeds)]
    print(f"test accuracy on the shop's unseen photos (rooms test part), mean of {args.seeds} seeds, C = {args.c:g}; "
          f"columns: random reviews from the pool")
    print(f"  {'':<66}" + "".join(f"{n:>8}" for n in ROUNDS))
    for name in runs[0]:
        cells = []
        for n in ROUNDS:
            values = [r[name][n] for r in runs if n in r[name]]
            cells.append(f"{np.mean(values):8.3f}" if values else f"{'':>8}")
        print(f"  {name:<66}" + "".join(cells))
    base = np.array([[r["labels alone"][n] for n in ROUNDS] for r in runs])
    selfed = np.array([[r["self-training (teacher = this fit)"][n] for n in ROUNDS] for r in runs])
    print("  self-training - labels alone, worst seed: " + ", ".join(
        f"{n}: {d:+.3f}" for n, d in zip(ROUNDS, (selfed - base).min(axis=0), strict=True)))
    print(f"({time.perf_counter() - started:.0f} s wall)")


if __name__ == "__main__":
    main()
