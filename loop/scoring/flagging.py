"""Flags sized by what they catch: the curve "share of photos flagged -> share of mistakes caught".

Why: a fixed threshold ("confidence under 50%") says nothing about how many wrong guesses slip through;
on real photos many mistakes are made at 0.99 confidence. Here every training estimates, from
out-of-fold predictions (photos each fold's model never saw), for each strategy of `loop.scoring.strategies`, how
large a share of photos must be flagged to catch a given share of the model's mistakes. The user sets
the goal (`sort.flag_target`, a catch rate, default 0.8; or `sort.flag_budget`, a share of photos); the
threshold follows from the curve stored in `model.json`, so `sort` flags by what the deployed model
actually needs, and a changed target takes effect at once, without retraining.
The threshold is sized on a lower confidence bound of the catch rate, not on the estimate itself: out-of-fold
mistakes come from few items (several photos of one item are usually wrong together), so "81% caught" on
40 mistakes from 9 items is a rough number, and the deployed model, refit on every label, is surer of itself
on new items than the fold models were. The bound (Wilson, one-sided `CATCH_CONFIDENCE`, counting the
items among the mistakes, not the photos) asks for a margin that is wide where the evidence is thin and
vanishes with many mistaken items; where even catching every seen mistake cannot assure the target, the
flags stop at the share that catches them all.
The shop's own photos (labeled by a person after sorting: reviews, moves) are where the model makes other
mistakes than on the labeled set; once there are enough of them the curve is capped by what each threshold
catches on them as well (`estimate(focus=...)`), so the goal must hold on both.
Caveat: the curve is estimated on the training items (out of fold); on photos unlike them (a new kind of
scene) mistakes are more frequent and the same threshold catches a smaller share.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from loop.scoring.strategies import STRATEGIES, score

logger = logging.getLogger(__name__)

CURVE_POINTS = 101  # flag shares 0, 0.01, ..., 1.0
DEFAULT_STRATEGY = "least_confidence"
MIN_PHOTOS = 20  # fewer predictions (or no mistake among them) give no curve: the fixed threshold (0.5) applies
CATCH_CONFIDENCE = 0.8  # the target is met by the catch rate's lower bound at this one-sided confidence
Z_ONE_SIDED = 0.8416  # normal quantile of CATCH_CONFIDENCE


def wilson_lower(successes: float, n: float, z: float = Z_ONE_SIDED) -> float:
    """Lower Wilson score bound of a proportion successes/n (0 for n = 0)."""
    if n <= 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def catch_curve(scores: np.ndarray, wrong: np.ndarray, points: int = CURVE_POINTS, *,
                evidence: int | None = None) -> dict:
    """The curve for one strategy: at flag share s (of photos, least sure first), the share of mistakes caught.

    Args:
        scores: (N,) uncertainty scores, higher = less sure.
        wrong: (N,) bool, the model's guess was wrong.
        evidence: how many independent mistakes the catch rate rests on (the items among them; None = the
            number of mistakes), for the lower bound.
    Returns:
        {"share": [...], "catch": [...], "catch_low": [...], "threshold": [...]} with `points` entries:
        flagging every photo whose score is >= threshold[i] flags share[i] of the photos (more on ties) and
        catches catch[i] of the mistakes (catch_low[i]: its lower bound, see the module docstring);
        threshold None = flag nothing.
    """
    scores = np.asarray(scores, np.float64)
    wrong = np.asarray(wrong, bool)
    order = np.argsort(-scores, kind="stable")
    ranked, caught = scores[order], np.concatenate([[0], np.cumsum(wrong[order])])
    n, mistakes = len(scores), int(wrong.sum())
    evidence = mistakes if evidence is None else max(1, min(int(evidence), mistakes))
    shares, catches, thresholds = [], [], []
    for i in range(points):
        share = i / (points - 1)
        k = math.ceil(share * n - 1e-9)
        shares.append(round(share, 4))
        catches.append(float(caught[k] / mistakes) if mistakes else 1.0)
        thresholds.append(float(ranked[k - 1]) if k > 0 else None)
    low = [round(wilson_lower(c * evidence, evidence), 4) if mistakes else 1.0 for c in catches]
    return {"share": shares, "catch": catches, "catch_low": low, "threshold": thresholds}


def point_for_target(curve: dict, target: float) -> int:
    """Index of the smallest flag share whose catch rate's lower bound reaches `target`.

    If no share assures the target (few mistakes seen), the smallest share that catches every mistake seen.
    A curve without bounds (model.json of an older version) is read by its estimate.
    """
    for i, caught in enumerate(curve.get("catch_low") or curve["catch"]):
        if caught >= target - 1e-9:
            return i
    best = max(curve["catch"])
    return next(i for i, caught in enumerate(curve["catch"]) if caught >= best - 1e-9)


def point_for_budget(curve: dict, budget: float) -> int:
    """Index of the largest flag share within `budget` (a share of photos)."""
    best = 0
    for i, share in enumerate(curve["share"]):
        if share <= budget + 1e-9:
            best = i
    return best


def estimate(probs: np.ndarray, labels: np.ndarray, items: np.ndarray | None = None,
             focus: np.ndarray | None = None) -> dict:
    """Catch curves of every strategy from out-of-fold `probs` (N, K) and true class indices `labels` (N,).

    Labels outside the columns (index -1 or >= K) count as mistakes. `items` (N,): the item of each photo;
    the lower bounds count the distinct items among the mistakes (None: every photo its own item). With
    fewer than MIN_PHOTOS predictions or no mistake at all there is nothing to size on: no curves (sort
    then uses a fixed 0.5). `focus` (N,) bool marks the shop's own photos (labeled by a person after
    sorting): where they are enough to size on, each curve's catch rate is the lower of the two, all photos
    and the focus photos, at every threshold, so the flags must reach the goal on both (`bounded_by`).
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    wrong = probs.argmax(axis=1) != labels if len(probs) else np.zeros(0, bool)
    counts = {"n": int(len(probs)), "mistakes": int(wrong.sum())}
    if len(probs) < MIN_PHOTOS or not wrong.any():  # nothing to size the flags on: the fixed threshold applies
        return {**counts, "curves": {}}
    item_ids = np.arange(len(probs)).astype(str) if items is None else np.asarray(items).astype(str)
    evidence = len(set(item_ids[wrong].tolist()))
    curves = {name: catch_curve(score(probs, name), wrong, evidence=evidence) for name in STRATEGIES}
    out = {**counts, "mistaken_items": evidence, "confidence": CATCH_CONFIDENCE, "curves": curves}
    focus = np.zeros(len(probs), bool) if focus is None else np.asarray(focus, bool)
    if focus.sum() >= MIN_PHOTOS and (wrong & focus).any():
        focus_evidence = len(set(item_ids[wrong & focus].tolist()))
        for name in STRATEGIES:
            scores = score(probs, name)
            curves[name] = bounded_by(curves[name], scores[focus], wrong[focus], focus_evidence)
        out["focus"] = {"n": int(focus.sum()), "mistakes": int((wrong & focus).sum()),
                        "mistaken_items": focus_evidence}
    return out


def bounded_by(curve: dict, scores: np.ndarray, wrong: np.ndarray, evidence: int) -> dict:
    """`curve` with its catch rates (and their lower bounds) capped by what its thresholds catch on a subset.

    The shares stay those of all photos; at each threshold the subset's catch rate and Wilson bound are
    computed on its own mistakes (`evidence` independent ones), and the lower value of the two is kept.
    """
    mistakes = np.sort(np.asarray(scores, np.float64)[np.asarray(wrong, bool)])
    catch, low = list(curve["catch"]), list(curve.get("catch_low") or curve["catch"])
    for i, threshold in enumerate(curve["threshold"]):
        caught = 0.0 if threshold is None else \
            float(len(mistakes) - np.searchsorted(mistakes, threshold, side="left")) / len(mistakes)
        catch[i] = min(catch[i], caught)
        low[i] = min(low[i], round(wilson_lower(caught * evidence, evidence), 4))
    return {**curve, "catch": catch, "catch_low": low}


def operating_point(flagging: dict | None, *, strategy: str = "auto", target: float = 0.8,
                    budget: float | None = None, threshold: float | None = None) -> dict:
    """Where the flags sit for these settings: strategy, threshold, expected share flagged and caught.

    Args:
        flagging: `estimate(...)` as stored in model.json["flagging"] (None for an older model: the fixed
            `threshold`, or 0.5, is used and nothing is expected).
        strategy: a strategy name, or "auto" = the one that needs the smallest share for the goal.
        target: share of mistakes to catch; `budget` (share of photos) wins over it; a fixed `threshold`
            wins over both.
    Returns:
        {"strategy", "threshold" (None = flag nothing), "goal", "expected_share", "expected_catch"}.
    """
    curves = (flagging or {}).get("curves") or {}
    if threshold is not None or not curves:
        name = DEFAULT_STRATEGY if strategy == "auto" else strategy
        fixed = 0.5 if threshold is None else threshold
        point = {"strategy": name, "threshold": fixed, "goal": f"fixed threshold {fixed:g}",
                 "expected_share": None, "expected_catch": None, "assured_catch": None}
        curve = curves.get(name)
        if curve:  # what this fixed threshold means on the out-of-fold photos
            i = sum(1 for t in curve["threshold"] if t is not None and t >= fixed)
            i = min(i, len(curve["share"]) - 1)
            low = curve.get("catch_low")
            point.update(expected_share=curve["share"][i], expected_catch=curve["catch"][i],
                         assured_catch=low[i] if low else None)
        return point
    names = list(curves) if strategy == "auto" else [strategy]

    def pick(name: str) -> int:
        curve = curves[name]
        return point_for_budget(curve, budget) if budget is not None else point_for_target(curve, target)

    if budget is not None:  # most mistakes within the budget
        name = max(names, key=lambda s: (curves[s]["catch"][pick(s)], s == DEFAULT_STRATEGY))
    else:  # fewest flags for the target
        name = min(names, key=lambda s: (curves[s]["share"][pick(s)], s != DEFAULT_STRATEGY))
    curve, i = curves[name], pick(name)
    goal = f"flag budget {budget:.0%} of photos" if budget is not None else f"catch {target:.0%} of mistakes"
    low = curve.get("catch_low")
    return {"strategy": name, "threshold": curve["threshold"][i], "goal": goal,
            "expected_share": curve["share"][i], "expected_catch": curve["catch"][i],
            "assured_catch": low[i] if low else None}


def flags(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """Bool (N,): flag where score >= threshold (nothing when threshold is None)."""
    scores = np.asarray(scores, np.float64)
    if threshold is None:
        return np.zeros(len(scores), bool)
    return scores >= threshold


def describe(point: dict, *, detail: bool = False) -> str:
    """One line for status and training, e.g. "flags 31% of photos, expected to catch 80% of mistakes".

    Plain words by default; `detail` (the report) adds the strategy and its score threshold.
    """
    threshold = "flags nothing" if point["threshold"] is None else (
        f"{point['strategy']} score >= {point['threshold']:.3f}" if isinstance(point["threshold"], float)
        else f"{point['strategy']} score >= {point['threshold']}")
    if point.get("expected_share") is None:
        return f"flags unsure photos ({point['goal']}; no estimate for this model" + (
            f"; {threshold})" if detail else ")")
    assured = point.get("assured_catch")
    bound = f", at least {assured:.0%} with {CATCH_CONFIDENCE:.0%} confidence" if assured is not None else ""
    how = f"{threshold}; goal: {point['goal']}" if detail else f"goal: {point['goal']}"
    return (f"flags {point['expected_share']:.0%} of photos, expected to catch {point['expected_catch']:.0%} "
            f"of mistakes{bound} ({how})")


def settings_point(spec: dict, sort_settings) -> dict:
    """`operating_point` for a model.json and the workspace's `[sort]` settings."""
    return operating_point(spec.get("flagging"), strategy=sort_settings.flag_strategy,
                           target=sort_settings.flag_target, budget=sort_settings.flag_budget,
                           threshold=sort_settings.flag_threshold)
