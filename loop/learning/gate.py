"""The promotion gate: a candidate ships only if it is not worse than the deployed model on the same photos.

`deploy` re-evaluates BOTH the candidate and the deployed model on the same, current gate set (user
photos no model trains on; labels may have changed since either was trained; any photo a compared model
did train on is left out), then compares them photo by photo: overall with McNemar's exact test on the
discordant photos, per class with a one-sided binomial test on that class's discordant photos (see
`compare`). A noisy one-photo wobble in a small class no longer blocks a clearly better model; losing a
class the current model gets right does. Refusals carry n, the discordant counts and the p-values.
`force=True` overrides and says so in the log. `rollback` restores the previously deployed version.
Every decision goes to the registry log. With too few items per class for a gate set (fewer than ~5),
it falls back to comparing both versions out of fold (`prequential`): each version's stored out-of-fold
predictions on the same photos, so neither is scored on an item it trained on.
Caveat: the very first deploy has nothing to beat; it promotes if the candidate can be measured at all.
A tie, or a loss that is not significant, promotes: the candidate learned from more labels. The accuracy
rule (`gate.min_accuracy_gain`, -0.10) applies only on `gate.min_accuracy_support` (50) or more gate
photos: on 22 photos three is -0.14, and in `bench/learning.py` every candidate refused for such a
non-significant loss was 9-13 points better on unseen items than the model it failed to replace.
Successive small losses could add up; the report's accuracy plot shows them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loop.data import manifest as mf
from loop.errors import ModelError
from loop.learning import registry
from loop.model.artifact import load_predictor, read_spec
from loop.model.evaluate import classification_metrics, evaluate_predictor
from loop.progress import ProgressCallback, no_progress
from loop.tables import locked
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

DEPLOY_EVENTS = ("promoted", "forced")


@dataclass
class Decision:
    """The outcome of `deploy`: whether `version` now serves, and why (each reason carries its numbers)."""

    promoted: bool
    version: str
    reasons: list[str]
    candidate_metrics: dict | None = None  # user_valid metrics of the candidate, re-evaluated today
    current_metrics: dict | None = None  # same for the model deployed before, None if there was none
    previous: str | None = None
    forced: bool = False
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        head = (f"deployed {self.version}" + (" (forced)" if self.forced else "") if self.promoted
                else f"refused {self.version}")
        prev = f" (previous: {self.previous})" if self.previous else ""
        return head + prev + "\n" + "\n".join(f"  - {r}" for r in self.reasons)


def user_valid_rows(ws: Workspace) -> pd.DataFrame:
    """Today's labeled user photos in the gate set (split "valid"): the set every decision is measured on."""
    from loop.learning.train import labeled_rows

    rows = labeled_rows(ws)
    return rows[(rows["split"] == "valid") & (rows["source"] == "user")].reset_index(drop=True)


@dataclass
class Paired:
    """Per-photo outcomes of two models on the same gate photos: true labels, candidate right, current right."""

    labels: np.ndarray
    candidate: np.ndarray
    current: np.ndarray

    @property
    def n(self) -> int:
        return len(self.labels)


def _binomial_p(k: int, n: int, alternative: str = "greater") -> float:
    """Exact binomial p-value of k successes in n fair trials (1.0 when n == 0)."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, 0.5, alternative=alternative).pvalue) if n else 1.0


def compare(paired: Paired | None, candidate_n: int, *, min_accuracy_gain: float, alpha: float,
            max_recall_drop: float, min_class_support: int, min_accuracy_support: int = 50,
            where: str = "gate photos") -> tuple[bool, list[str]]:
    """Apply the gate's paired rules to two models' outcomes on the same photos.

    - overall: not significantly worse by McNemar's exact test (a binomial test on the discordant photos:
      those exactly one of the two models gets right), and, on at least `min_accuracy_support` photos,
      an accuracy at least the current one's + `min_accuracy_gain` (default -0.10: a few photos of noise
      are no reason to keep a model that learned from fewer labels);
    - per class: a class regresses when the candidate loses more of its photos than it gains and the loss
      is significant (one-sided binomial on that class's discordant photos, p < alpha), or its recall
      drops by more than `max_recall_drop` on at least `min_class_support` photos. One photo of a
      five-photo class is neither.
    Args:
        paired: outcomes on the same photos; None when nothing is deployed yet (first deployment).
        candidate_n: gate photos the candidate could be measured on.
    Returns:
        (passes, reasons): one reason per rule checked, with n, discordant counts and p-values; failures
        start with "FAIL".
    """
    if not candidate_n:
        return False, ["FAIL: no labeled user photos in the gate set to measure the candidate on; "
                       "ingest/label user photos, or deploy with --force"]
    if paired is None:
        return True, [f"first deployment: gate-set accuracy measured on {candidate_n} photos"]
    n = paired.n
    acc, cur = paired.candidate.mean(), paired.current.mean()
    gained = int((paired.candidate & ~paired.current).sum())
    lost = int((~paired.candidate & paired.current).sum())
    p_two = min(1.0, 2 * _binomial_p(min(gained, lost), gained + lost, "less")) if gained + lost else 1.0
    p_worse = _binomial_p(lost, gained + lost)
    evidence = (f"on the same {n} {where}: candidate right where the current is wrong on {gained}, "
                f"the reverse on {lost} (McNemar exact p={p_two:.3g})")
    reasons, ok = [], True
    gain = acc - cur
    large = gain < min_accuracy_gain - 1e-12 and n >= min_accuracy_support  # a few photos prove nothing
    if not large and not p_worse < alpha:
        reasons.append(f"accuracy {acc:.3f} vs current {cur:.3f} (gain {gain:+.3f}; not significantly worse, "
                       f"not below {min_accuracy_gain:.3f} on >= {min_accuracy_support} photos) " + evidence)
    else:
        ok = False
        why = (f"significantly worse, one-sided p={p_worse:.3g} < {alpha}" if p_worse < alpha
               else f"gain {gain:+.3f} is below {min_accuracy_gain:.3f} on >= {min_accuracy_support} photos")
        reasons.append(f"FAIL: accuracy {acc:.3f} vs current {cur:.3f} ({why}) " + evidence)
    regressed = []
    for name in sorted(set(paired.labels.tolist())):
        mask = paired.labels == name
        k_gain = int((paired.candidate & ~paired.current & mask).sum())
        k_lost = int((~paired.candidate & paired.current & mask).sum())
        if k_lost <= k_gain:
            continue
        support = int(mask.sum())
        drop = (k_lost - k_gain) / support
        p = _binomial_p(k_lost, k_gain + k_lost)
        if p < alpha or (drop > max_recall_drop and support >= min_class_support):
            regressed.append(f"{name} recall {paired.current[mask].mean():.2f} -> {paired.candidate[mask].mean():.2f}"
                             f" on {support} photos (lost {k_lost}, gained {k_gain}, one-sided binomial p={p:.3g})")
    if regressed:
        ok = False
        reasons.append("FAIL: class regressed: " + "; ".join(regressed))
    else:
        reasons.append(f"no class regressed (significant at {alpha}, or recall down > {max_recall_drop:.2f} on "
                       f">= {min_class_support} photos)")
    return ok, reasons


def deploy(ws: Workspace, version: str | None = None, *, force: bool = False,
           on_progress: ProgressCallback | None = None) -> Decision:
    """Promote `version` (default: the newest) if it passes the gate, or if `force`.

    Example:
        >>> decision = deploy(open_workspace("data"))     # doctest: +SKIP
        >>> print(decision.summary())
    """
    on_progress = on_progress or no_progress
    versions = registry.list_versions(ws)
    if not versions:
        raise ModelError("no model versions yet; run `sortloop train` first")
    version = version or versions[-1]
    candidate_dir = registry.model_dir(ws, version)
    gate = ws.settings.gate
    with locked(ws.models_dir / "deploy"):
        current = registry.current_version(ws)
        if current == version:
            decision = Decision(False, version, [f"{version} is already the deployed model"], previous=current)
            _log(ws, "refused", decision)
            return decision

        # The same photos for both models, as labeled today, and never one either model trained on.
        current_dir = registry.model_dir(ws, current) if current else None
        rows, excluded = gate_rows(ws, [candidate_dir] + ([current_dir] if current_dir else []))
        candidate_metrics, candidate_right = _measure(ws, candidate_dir, rows, on_progress)
        current_metrics, paired, note = None, None, None
        if rows.empty:  # too few items per class for a gate set: fall back to the labels new since
            candidate_metrics, current_metrics, paired, note = prequential(ws, candidate_dir, current_dir,
                                                                           on_progress)
        elif current_dir is not None:
            current_metrics, current_right = _measure(ws, current_dir, rows, on_progress)
            paired = Paired(rows["label"].astype(str).to_numpy(), candidate_right, current_right)
        ok, reasons = compare(paired, candidate_metrics["n"], min_accuracy_gain=gate.min_accuracy_gain,
                              alpha=gate.alpha, max_recall_drop=gate.max_recall_drop,
                              min_class_support=gate.min_class_support,
                              min_accuracy_support=gate.min_accuracy_support,
                              where="photos (see below)" if note else "gate photos")
        if note:
            reasons.append(note)
        if excluded:
            reasons.append(f"{excluded} gate photos left out: a compared model trained on them")
        forced = force and not ok
        if forced:
            reasons.append("FORCED: promoted despite failing the gate (--force)")
        decision = Decision(ok or force, version, reasons, candidate_metrics, current_metrics,
                            previous=current, forced=forced)
        if decision.promoted:
            registry.set_current(ws, version)
        _log(ws, "forced" if forced else "promoted" if decision.promoted else "refused", decision)
    logger.info("%s", decision.summary())
    return decision


def rollback(ws: Workspace) -> str:
    """Restore the version deployed before the current one; returns it.

    The deployment history is replayed from the registry log (each promotion pushes, each rollback pops),
    so repeated rollbacks walk further back.
    Raises:
        ModelError: nothing was deployed before the current version.
    """
    with locked(ws.models_dir / "deploy"):
        stack = deployment_stack(ws)
        current = registry.current_version(ws)
        if not stack:
            raise ModelError("nothing to roll back to: no model has been deployed yet "
                             "(run `sortloop train` then `sortloop deploy`)")
        if len(stack) < 2:
            raise ModelError(f"nothing to roll back to: {current or stack[-1]} is the only deployment on record")
        if stack[-1] != current:
            logger.warning("current.json says %s but the log says %s; rolling back from the log", current, stack[-1])
        restored = stack[-2]
        registry.set_current(ws, restored)
        registry.append_log(ws, {"event": "rolled_back", "version": restored, "previous": current,
                                 "metrics": _compact(read_spec(registry.model_dir(ws, restored))
                                                     .get("metrics", {}).get("user_valid"))})
    logger.info("rolled back from %s to %s", current, restored)
    return restored


def deployment_stack(ws: Workspace) -> list[str]:
    """Deployed versions in order, as the log records them (promotions push, rollbacks pop)."""
    stack: list[str] = []
    for event in registry.read_log(ws):
        if event.get("event") in DEPLOY_EVENTS:
            stack.append(event["version"])
        elif event.get("event") == "rolled_back" and stack:
            stack.pop()
    return stack


def describe_versions(ws: Workspace) -> list[dict]:
    """One dict per version (oldest first): version, created_at, train_mode, accuracies, deployed."""
    current = registry.current_version(ws)
    out = []
    for version in registry.list_versions(ws):
        spec = read_spec(ws.models_dir / version)
        metrics = spec.get("metrics", {})
        out.append({
            "version": version,
            "deployed": version == current,
            "created_at": spec.get("created_at"),
            "train_mode": spec.get("train_mode"),
            "classes": len(spec["classes"]),
            "user_valid_accuracy": (metrics.get("user_valid") or {}).get("accuracy"),
            "user_valid_n": (metrics.get("user_valid") or {}).get("n"),
            "web_valid_accuracy": (metrics.get("web_valid") or {}).get("accuracy"),
            "labels_fingerprint": spec.get("labels_fingerprint"),
        })
    return out


def gate_rows(ws: Workspace, model_dirs: list) -> tuple[pd.DataFrame, int]:
    """Today's gate photos minus any photo one of `model_dirs` trained on; and how many were left out.

    By construction (stable splits) no model trains on the gate set; this check makes it a guarantee,
    even for a version trained before a split setting changed.
    """
    from loop.learning.train import training_set

    rows = user_valid_rows(ws)
    trained: set[str] = set()
    for model_dir in model_dirs:
        seen = training_set(model_dir)
        if seen is not None:
            trained.update(seen["image_id"].astype(str))
    keep = ~rows["image_id"].astype(str).isin(trained)
    return rows[keep].reset_index(drop=True), int((~keep).sum())


def prequential(ws: Workspace, candidate_dir, current_dir, on_progress: ProgressCallback
                ) -> tuple[dict, dict | None, Paired | None, str | None]:
    """The fallback when the gate set is empty (fewer than ~5 items per class): both recipes out of fold.

    The deployed version's stored out-of-fold predictions (oof_predictions.parquet) and the candidate's
    are compared on the photos both scored, labels as of today: each prediction comes from a fold model
    that never saw the photo's item, and the candidate's folds also learned from the new labels, which is
    the question. Not the deployed model itself against the candidate's out-of-fold predictions on the new
    labels: with ~3 items per class a fold model misses a third of a class's items that the deployed model
    learned from, and on a new photo of an item the deployed model knew, it has seen that item; on eth80
    (bench/learning.py) that refused candidates up to 6 points better on unseen items. A deployed version
    without out-of-fold predictions (finetune mode) is compared on the photos of items it never saw.
    With nothing deployed, the candidate's out-of-fold accuracy is the evidence for a first deployment.
    Returns:
        (candidate metrics, current metrics or None, paired outcomes or None, a note for the reasons).
    """
    from loop.data.items import item_keys
    from loop.learning.train import labeled_rows, training_set

    empty = {"n": 0, "accuracy": None, "per_class": {}}
    path = candidate_dir / "oof_predictions.parquet"
    if not path.exists():
        return empty, None, None, None
    oof = pd.read_parquet(path)
    oof = oof[oof["source"] == "user"]
    classes = read_spec(candidate_dir)["classes"]
    if current_dir is None:
        metrics = classification_metrics(oof["label"].tolist(), np.stack(oof["probs"].to_numpy()), classes)
        return metrics, None, None, (f"no gate photos (too few items per class): first deployment on the "
                                     f"out-of-fold accuracy {metrics['accuracy']:.3f} of {metrics['n']} photos")
    labeled = labeled_rows(ws).set_index("image_id", drop=False)
    today = oof[oof["image_id"].isin(labeled.index)].reset_index(drop=True)
    current_path = current_dir / "oof_predictions.parquet"
    if current_path.exists():
        current_oof = pd.read_parquet(current_path)[["image_id", "probs"]]
        both = today.merge(current_oof, on="image_id", suffixes=("", "_current"))
        if not both.empty:
            labels = labeled.loc[both["image_id"], "label"].astype(str).to_numpy()
            candidate_metrics, candidate_right = _scored(both, labels, classes)
            current_metrics, current_right = _scored(both, labels, read_spec(current_dir)["classes"],
                                                      column="probs_current")
            return candidate_metrics, current_metrics, Paired(labels, candidate_right, current_right), (
                "no gate photos (too few items per class): both versions' out-of-fold predictions compared on "
                f"the same {len(both)} photos (neither fold model saw the item it predicts)")
    seen = training_set(current_dir)
    if seen is None:
        return empty, None, None, None
    df = mf.load(ws)
    item_of = dict(zip(df["image_id"].astype(str), item_keys(df), strict=True))
    known_items = {item_of.get(str(i), str(i)) for i in seen["image_id"]}
    new = today[~today["image_id"].map(lambda i: item_of.get(str(i), str(i))).isin(known_items)].reset_index(drop=True)
    if new.empty:
        return empty, None, None, None
    rows = labeled.loc[new["image_id"]].reset_index(drop=True)
    labels = rows["label"].astype(str).to_numpy()
    candidate_metrics, candidate_right = _scored(new, labels, classes)
    current_metrics, current_right = _measure(ws, current_dir, rows, on_progress)
    return candidate_metrics, current_metrics, Paired(labels, candidate_right, current_right), (
        f"no gate photos (too few items per class): compared on the {len(new)} labeled photos of items the "
        "deployed model never saw, against the candidate's out-of-fold predictions")


def _scored(frame: pd.DataFrame, labels: np.ndarray, classes: list[str], column: str = "probs"
            ) -> tuple[dict, np.ndarray]:
    """(metrics, per-photo correctness) of stored probabilities `frame[column]` against `labels`."""
    probs = np.stack(frame[column].to_numpy())
    right = np.array([classes[i] for i in probs.argmax(axis=1)]) == labels
    return classification_metrics(labels.tolist(), probs, classes), right


def _measure(ws: Workspace, model_dir, rows: pd.DataFrame, on_progress: ProgressCallback) -> tuple[dict, np.ndarray]:
    """(user_valid metrics, per-photo correctness) of the artifact in `model_dir` on `rows`."""
    predictor = load_predictor(model_dir, "onnx")
    metrics, probs = evaluate_predictor(ws, predictor, rows, on_progress=on_progress)
    predicted = np.array([predictor.classes[i] for i in probs.argmax(axis=1)]) if len(probs) else np.zeros(0, str)
    return metrics["user_valid"], predicted == rows["label"].astype(str).to_numpy()


def _compact(metrics: dict | None) -> dict | None:
    """Accuracy, n and per-class recall: what the log keeps of a metrics dict."""
    if not metrics:
        return None
    recall = {k: v.get("recall") for k, v in metrics.get("per_class", {}).items()}
    return {"accuracy": metrics.get("accuracy"), "n": metrics.get("n"), "recall": recall}


def _log(ws: Workspace, event: str, decision: Decision) -> None:
    registry.append_log(ws, {
        "event": event, "version": decision.version, "previous": decision.previous, "reasons": decision.reasons,
        "candidate": _compact(decision.candidate_metrics), "current": _compact(decision.current_metrics),
    })
