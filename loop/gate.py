"""The promotion gate: a candidate ships only if it is measurably better on today's user validation photos.

`deploy` re-evaluates BOTH the candidate and the deployed model on the same, current user-photo
validation set (labels may have changed since either was trained), then promotes only if the candidate's
accuracy beats the current one by more than `gate.min_accuracy_gain` and no class's recall drops by more
than `gate.max_recall_drop`. Otherwise it refuses, with the numbers. `force=True` overrides and says so
in the log. `rollback` restores the previously deployed version. Every decision goes to the registry log.
Caveat: the very first deploy has nothing to beat; it promotes if the candidate can be measured at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd

from loop import registry
from loop.artifact import load_predictor, read_spec
from loop.errors import ModelError
from loop.evaluate import evaluate_predictor
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
    """Today's labeled user photos in the validation split: the set every decision is measured on."""
    from loop.train import labeled_rows

    rows = labeled_rows(ws)
    return rows[(rows["split"] == "valid") & (rows["source"] == "user")].reset_index(drop=True)


def compare(candidate: dict, current: dict | None, *, min_accuracy_gain: float, max_recall_drop: float
            ) -> tuple[bool, list[str]]:
    """Apply the gate's rules to two `user_valid` metric dicts (see `loop.evaluate.classification_metrics`).

    Returns:
        (passes, reasons): one reason per rule checked, each with its numbers; failures start with "FAIL".
    """
    if not candidate.get("n"):
        return False, ["FAIL: no labeled user validation photos to measure the candidate on; "
                       "ingest/label user photos, or deploy with --force"]
    acc = candidate["accuracy"]
    if current is None:
        return True, [f"first deployment: user-valid accuracy {acc:.3f} on {candidate['n']} photos"]
    reasons, ok = [], True
    gain = acc - current["accuracy"]
    if gain > min_accuracy_gain:
        reasons.append(f"accuracy {acc:.3f} vs current {current['accuracy']:.3f} "
                       f"(gain {gain:+.3f} > {min_accuracy_gain:.3f}) on {candidate['n']} photos")
    else:
        ok = False
        reasons.append(f"FAIL: accuracy {acc:.3f} vs current {current['accuracy']:.3f} "
                       f"(gain {gain:+.3f} is not > {min_accuracy_gain:.3f}) on {candidate['n']} photos")
    drops = []
    for name, theirs in current["per_class"].items():
        ours = candidate["per_class"].get(name, {}).get("recall")
        if theirs.get("recall") is None or ours is None:
            continue
        if theirs["recall"] - ours > max_recall_drop:
            drops.append(f"{name} {theirs['recall']:.2f} -> {ours:.2f}")
    if drops:
        ok = False
        reasons.append(f"FAIL: recall drops by more than {max_recall_drop:.2f}: " + ", ".join(drops))
    else:
        reasons.append(f"no class recall drops by more than {max_recall_drop:.2f}")
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

        # The same photos for both models, as labeled today: a fair comparison.
        rows = user_valid_rows(ws)
        candidate_metrics = _measure(ws, candidate_dir, rows, on_progress)
        current_metrics = _measure(ws, registry.model_dir(ws, current), rows, on_progress) if current else None
        ok, reasons = compare(candidate_metrics, current_metrics, min_accuracy_gain=gate.min_accuracy_gain,
                              max_recall_drop=gate.max_recall_drop)
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


def _measure(ws: Workspace, model_dir, rows: pd.DataFrame, on_progress: ProgressCallback) -> dict:
    metrics, _ = evaluate_predictor(ws, load_predictor(model_dir, "onnx"), rows, on_progress=on_progress)
    return metrics["user_valid"]


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
