"""Photos that fit no category: the "unfamiliar" score, its threshold, and the reference set it needs.

A closed-set classifier always answers; a toy cow lands in `wardrobe/` at 1.000. What it does not hide is
how far a photo is from every photo it learned from, and how badly every class fits it. The score takes
both, from what the model computes anyway: (1) kNN: one minus the cosine similarity of the photo's pooled
body features to its k-th nearest labeled photo (`K_NEAREST`); (2) energy: -logsumexp of the calibrated
logits. Each is put on the scale of the labeled photos' own out-of-fold scores (the share of them below
it), and the larger one counts (`combined`). Chosen by measurement (`bench/unfamiliar.py`,
docs/unfamiliar.md): kNN separates other kinds of things almost perfectly (AUROC 0.999 on toys, fruit,
non-photos; energy 0.88), energy helps on a kind of furniture never learned (sofas: 0.82 vs 0.63), and
the larger of the two keeps kNN's strength where it has it (0.999 far, 0.81 near over 3 seeds).

Calibration, out of fold: each labeled photo is scored against the reference set without the photos of
its own item (leave one item out), i.e. as a photo of a new item is scored at sort time. The operating
threshold is the lowest one whose share of those in-scope photos sent to `_other/` stays within
`max_share` (`model.unfamiliar_max_share`, 5%) at the upper confidence bound (Wilson, one-sided 80%, as
the flags' catch rate: `loop.flagging`), counting items as the evidence: with 700 labeled photos it sends
~3.7% of them, with 50 far fewer, so the share of new in-scope photos sent stays under the goal however
few labels there are. Only the labeled photos set it; no out-of-scope photo is needed, and none is tuned
on. The shop's own photos (labeled by a person after sorting) are usually of another kind than the labeled
set and score higher; from `MIN_PHOTOS` of them on, the bound must hold on them alone as well
(`shop_bounded_threshold`; bench/domain_shift.py: 4.1% -> 1.9% of the shop's test photos sent after 90
reviews, out-of-scope photos sent 97.5% -> 93.8%).
Photos a reviewer called "none of these" (label `loop.classnames.OTHER_LABEL`) are kept as a second,
small reference set: a photo closer to one of them than to any in-scope photo is unfamiliar too, whatever
its distance.

What ships: `unfamiliar.npy` beside `model.json` (float16 unit rows, at most `MAX_REFERENCE` in-scope plus
`MAX_NEGATIVES` "none of these" rows, ~5 MB for Lite0), its sha256 and the threshold in
`model.json["unfamiliar"]`. numpy only, so `sortloop sort`, the frozen sorter and the Ray workers compute
the same scores from the same file (`Familiarity.scores`).
Caveat: in finetune mode the body trained on the photos it is calibrated on, so their leave-one-item-out
scores are lower than a new item's and the threshold sends somewhat more than `max_share`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loop.data.images import file_sha256
from loop.errors import ModelError
from loop.scoring.flagging import MIN_PHOTOS, wilson_lower

REFERENCE_FILE = "unfamiliar.npy"
K_NEAREST = 1  # the k-th nearest labeled photo (bench/unfamiliar.py: best k on a held-out class, ~equal on far ones)
MAX_REFERENCE = 2048  # in-scope rows shipped (a bounded artifact: 2048 x 1280 float16 = 5.2 MB)
MAX_NEGATIVES = 512  # "none of these" rows shipped
_CHUNK = 1024  # rows per similarity block (bounds memory: chunk x reference floats)
SCALE_POINTS = 101  # quantiles of the out-of-fold in-scope scores kept to put a score on the 0..1 scale


@dataclass
class Familiarity:
    """The score and the decision of one model version: reference rows, k, threshold.

    `reference` are the in-scope unit rows (M, F); `negatives` the "none of these" unit rows (M', F).
    With `knn_points` and `energy_points` (quantiles of both scores on the labeled photos, out of fold),
    the score is the larger of the two on that common scale; without them, the kNN distance itself.
    """

    reference: np.ndarray
    negatives: np.ndarray
    k: int
    threshold: float
    knn_points: np.ndarray | None = None
    energy_points: np.ndarray | None = None

    def scores(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """(N,) float32 unfamiliar scores of pooled body features (N, F) and the model's logits (N, K)."""
        return self.decide(features, logits)[0]

    def decide(self, features: np.ndarray, logits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N,), unfamiliar (N,) bool) for pooled body features (N, F) and logits (N, K)."""
        z = unit_rows(features)
        sims = _top_similarities(z, self.reference, self.k)
        scores = 1.0 - sims[:, self.k - 1]
        if self.energy_points is not None:
            if logits is None:
                raise ModelError("this model's unfamiliar score needs the logits as well as the features")
            scores = combined(self.knn_points, scores, self.energy_points, energy(logits))
        unfamiliar = scores >= self.threshold
        if len(self.negatives):  # nearer a "none of these" photo than to every in-scope one
            unfamiliar |= _top_similarities(z, self.negatives, 1)[:, 0] > sims[:, 0]
        return scores.astype(np.float32), unfamiliar


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp of the (calibrated) logits: high when no class fits well (Liu et al. 2020)."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def on_scale(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each value as the share of out-of-fold in-scope scores below it (0..1; `points` are their quantiles),
    continued linearly above the largest, so photos beyond every labeled one keep their order."""
    points = np.asarray(points, np.float64)
    values = np.asarray(values, np.float64)
    out = np.interp(values, points, np.linspace(0.0, 1.0, len(points)))
    top, middle = points[-1], points[len(points) // 2]
    above = values > top
    out[above] = 1.0 + (values[above] - top) / max(top - middle, 1e-6)
    return out


def combined(knn_points: np.ndarray, knn: np.ndarray, energy_points: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """The larger of the two scores on the in-scope scale: far from every labeled photo (kNN), or a photo
    no class fits (energy). kNN catches other kinds of things; energy catches near misses (an unknown
    piece of furniture) that sit close to known photos in feature space (bench/unfamiliar.py). Their mean
    was measured too: better on a furniture class never learned (AUROC 0.87 vs 0.81), but it let through
    6-10% of eth80 and sent more in-scope photos (5.2% on one seed) at the same goal."""
    return np.maximum(on_scale(knn_points, knn), on_scale(energy_points, energies))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_scores(queries: np.ndarray, reference: np.ndarray, k: int = K_NEAREST) -> np.ndarray:
    """1 - cosine similarity to the k-th nearest reference row, for raw feature rows (unit-scaled here)."""
    return 1.0 - _top_similarities(unit_rows(queries), unit_rows(reference), k)[:, k - 1]


def leave_item_out_scores(features: np.ndarray, items: np.ndarray, reference_rows: np.ndarray,
                          k: int = K_NEAREST) -> np.ndarray:
    """Each photo's score against the reference rows of OTHER items: how a new item's photo scores.

    Args:
        features: (N, F) pooled body features of the labeled photos.
        items: (N,) item ids (photos of one physical item are left out together).
        reference_rows: indices into `features` that form the shipped reference set.
    """
    z = unit_rows(features)
    ref = z[reference_rows]
    ref_items = np.asarray(items)[reference_rows]
    items = np.asarray(items)
    out = np.empty(len(z), np.float32)
    for start in range(0, len(z), _CHUNK):
        block = z[start:start + _CHUNK] @ ref.T
        block[items[start:start + _CHUNK, None] == ref_items[None, :]] = -np.inf
        if block.shape[1] < k:
            out[start:start + _CHUNK] = np.nan  # no other item to compare with: no evidence
            continue
        kth = np.sort(-np.partition(-block, k - 1, axis=1)[:, :k], axis=1)[:, 0]
        out[start:start + _CHUNK] = np.where(np.isfinite(kth), 1.0 - kth, np.nan)
    return out


def choose_reference(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Indices of at most `limit` rows, spread over classes in proportion (all rows if they fit)."""
    n = len(labels)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    chosen: list[int] = []
    classes, counts = np.unique(labels, return_counts=True)
    for cls, count in zip(classes, counts, strict=True):
        take = max(1, int(round(limit * count / n)))
        chosen += [i for i in order if labels[i] == cls][:take]
    return np.sort(np.array(chosen[:limit] if len(chosen) > limit else chosen))


def fit_familiarity(features: np.ndarray, labels: np.ndarray, items: np.ndarray, *,
                    max_share: float, oof_logits: np.ndarray | None = None, negatives: np.ndarray | None = None,
                    focus: np.ndarray | None = None, k: int = K_NEAREST, max_reference: int = MAX_REFERENCE,
                    seed: int = 0) -> tuple[Familiarity, dict, np.ndarray]:
    """The reference set and threshold from labeled in-scope photos (and optional "none of these" ones).

    Args:
        features: (N, F) pooled body features of the labeled (in-scope) photos.
        labels, items: (N,) their classes and item ids.
        oof_logits: (N, K) calibrated out-of-fold logits of the same photos (item-grouped folds): with them
            the score also weighs the energy (`combined`); without (finetune mode), kNN alone.
        negatives: (N', F) features of photos a reviewer labeled "none of these".
        focus: (N,) bool, the shop's own photos (labeled by a person after sorting): from `MIN_PHOTOS` of
            them on, the bound must also hold on them alone (`shop_bounded_threshold`).
        max_share: the share of new in-scope photos the threshold may send to `_other` (upper bound).
    Returns:
        (Familiarity, the summary for model.json: threshold, max_share, k, sizes, out-of-fold score quantiles;
        each labeled photo's out-of-fold score, NaN where there is no other item to compare with).
    Raises:
        ModelError: fewer than 2 items (no out-of-fold score exists).
    """
    items = np.asarray(items).astype(str)
    if len(np.unique(items)) < 2:
        raise ModelError("the unfamiliar threshold needs photos of at least 2 items")
    rows = choose_reference(np.asarray(labels).astype(str), max_reference, seed)
    oof = leave_item_out_scores(features, items, rows, k)
    knn_points = energy_points = None
    if oof_logits is not None and np.isfinite(oof).any():
        energies = energy(oof_logits)
        knn_points, energy_points = _points(oof), _points(energies)
        oof = np.where(np.isfinite(oof), combined(knn_points, oof, energy_points, energies), np.nan)
    finite = oof[np.isfinite(oof)]
    all_photos_threshold = bounded_threshold(oof, items, max_share)
    shop_threshold = shop_bounded_threshold(oof, items, focus, max_share)
    threshold = all_photos_threshold if shop_threshold is None else max(all_photos_threshold, shop_threshold)
    reference = unit_rows(features)[rows]
    neg = unit_rows(negatives)[:MAX_NEGATIVES] if negatives is not None and len(negatives) else \
        np.zeros((0, reference.shape[1]), np.float32)
    familiarity = Familiarity(reference.astype(np.float16).astype(np.float32),
                              neg.astype(np.float16).astype(np.float32), k, threshold, knn_points, energy_points)
    summary = {"score": "knn_cosine" if energy_points is None else "max(knn_cosine, energy)", "k": k,
               "threshold": threshold, "max_share": max_share,
               "reference_rows": int(len(rows)), "negative_rows": int(len(neg)), "calibration_photos": int(len(oof)),
               "oof_in_scope_sent": float((finite >= threshold).mean()) if len(finite) else 0.0,
               "threshold_all_photos": all_photos_threshold, "threshold_shop_photos": shop_threshold,
               "shop_photos": int(np.sum(focus)) if focus is not None else 0,
               "oof_quantiles": {str(q): float(np.quantile(finite, q)) for q in (0.5, 0.9, 0.95, 0.99)}
               if len(finite) else {}}
    return familiarity, summary, oof


def bounded_threshold(oof: np.ndarray, items: np.ndarray, max_share: float) -> float:
    """The lowest threshold whose out-of-fold share of in-scope photos at or above it has an upper bound
    (Wilson, `loop.flagging.Z_ONE_SIDED`, on as many trials as there are items) within `max_share`.

    Photos of one item are scored alike, so the items, not the photos, are the independent evidence.
    With no share allowed at that confidence, the threshold sits just above every out-of-fold score.
    """
    finite = np.sort(oof[np.isfinite(oof)])[::-1]  # NaN: no other item to compare with (no evidence)
    if not len(finite):
        return 1.0
    trials = max(1, len(np.unique(items)))
    sent = np.arange(1, len(finite) + 1) / len(finite)  # share at or above finite[r - 1]
    upper = np.array([1.0 - wilson_lower((1.0 - s) * trials, trials) for s in sent])
    ok = np.flatnonzero((upper <= max_share) & np.r_[finite[1:] < finite[:-1], True])  # not inside a tie
    if not len(ok):
        return float(np.nextafter(np.float32(finite[0]), np.float32(np.inf)))
    return float(finite[ok[-1]])


def shop_bounded_threshold(oof: np.ndarray, items: np.ndarray, focus: np.ndarray | None,
                           max_share: float) -> float | None:
    """`bounded_threshold` on the shop's own photos alone (None with fewer than `MIN_PHOTOS` of them).

    The labeled set is usually of another kind (studio shots, web photos) than the shop's photos, which then
    all sit far from it: a threshold sized on the labeled set alone sends many of the shop's in-scope photos to
    `_other` (45% in the demo). Once people have labeled enough of the shop's photos, the share they would
    send must stay within `max_share` on them too. They are mostly photos that were flagged, the least
    familiar of the shop's, so the bound errs towards keeping photos in their category.
    """
    if focus is None:
        return None
    focus = np.asarray(focus, bool) & np.isfinite(oof)
    if focus.sum() < MIN_PHOTOS:
        return None
    return bounded_threshold(oof[focus], np.asarray(items)[focus], max_share)


def save_familiarity(familiarity: Familiarity, summary: dict, model_dir: Path | str) -> dict:
    """Write `unfamiliar.npy` into `model_dir`; returns the `model.json["unfamiliar"]` section (with sha256)."""
    path = Path(model_dir) / REFERENCE_FILE
    stacked = np.concatenate([familiarity.reference, familiarity.negatives]).astype(np.float16)
    with open(path, "wb") as fh:
        np.save(fh, stacked, allow_pickle=False)
    scale = {} if familiarity.energy_points is None else {
        "knn_points": [float(v) for v in familiarity.knn_points], "energy_points": [float(v) for v in
                                                                                    familiarity.energy_points]}
    return {**summary, **scale, "file": REFERENCE_FILE, "sha256": file_sha256(path), "k": familiarity.k,
            "threshold": familiarity.threshold, "reference_rows": int(len(familiarity.reference)),
            "negative_rows": int(len(familiarity.negatives))}


def has_familiarity(spec: dict) -> bool:
    """Whether the model has the unfamiliar score (a model trained before it existed has not)."""
    return bool(spec.get("unfamiliar"))


def load_familiarity(model_dir: Path | str, spec: dict) -> Familiarity | None:
    """The version's Familiarity, or None for a model trained before the score existed (it sorts as before).

    Raises:
        ModelError: model.json names a reference file that is missing, damaged or of the wrong shape.
    """
    if not has_familiarity(spec):
        return None
    section = spec["unfamiliar"]
    path = Path(model_dir) / str(section.get("file", REFERENCE_FILE))
    if not path.is_file():
        raise ModelError(f"{path} not found: the model's unfamiliar-photo reference set is missing; copy the "
                         "whole version folder, or pick another version")
    if section.get("sha256") and file_sha256(path) != section["sha256"]:
        raise ModelError(f"{path} does not match the sha256 in model.json: the file is damaged or from "
                         "another version")
    try:
        stacked = np.load(path, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is unreadable ({exc})") from None
    n_ref, n_neg = int(section["reference_rows"]), int(section.get("negative_rows", 0))
    if stacked.ndim != 2 or len(stacked) != n_ref + n_neg or n_ref < 1:
        raise ModelError(f"{path} holds {stacked.shape} rows; model.json says {n_ref} + {n_neg}")
    points = {name: np.asarray(section[name], np.float64) for name in ("knn_points", "energy_points")
              if section.get(name) is not None}
    if len(points) == 1:
        raise ModelError(f"{Path(model_dir) / 'model.json'}: the unfamiliar score has only one of knn_points and "
                         "energy_points; the artifact is damaged")
    return Familiarity(stacked[:n_ref], stacked[n_ref:], int(section.get("k", K_NEAREST)),
                       float(section["threshold"]), points.get("knn_points"), points.get("energy_points"))


def _points(values: np.ndarray) -> np.ndarray:
    """SCALE_POINTS quantiles of the finite values: the in-scope scale of one score."""
    return np.quantile(values[np.isfinite(values)], np.linspace(0.0, 1.0, SCALE_POINTS))


def _top_similarities(z: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """(N, k) largest cosine similarities of unit rows `z` to unit `reference` rows, largest first."""
    if len(reference) == 0:
        return np.full((len(z), k), -1.0, np.float32)
    k_eff = min(k, len(reference))
    out = np.full((len(z), k), -1.0, np.float32)
    for start in range(0, len(z), _CHUNK):
        block = z[start:start + _CHUNK] @ reference.T
        top = -np.partition(-block, k_eff - 1, axis=1)[:, :k_eff]
        out[start:start + _CHUNK, :k_eff] = -np.sort(-top, axis=1)
    return out
