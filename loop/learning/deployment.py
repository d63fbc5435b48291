"""Deployment: which version serves. `deploy` promotes a candidate the gate passes, `rollback` restores
the one deployed before, and `describe_versions` is the one table of versions, metrics and decisions.

Why apart from `loop.learning.gate`: the gate holds the statistics (is the candidate worse, on which
evidence?), this module the lifecycle (the registry's pointer and log). Every decision goes to the registry
log, from which the deployment history is replayed (`deployment_stack`), so rollbacks walk back in order.
Caveat: `force=True` promotes a refused candidate and says so in the log and the reasons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from loop.errors import ModelError
from loop.learning import gate, registry
from loop.model.artifact import check_artifact, read_spec
from loop.progress import ProgressCallback, no_progress
from loop.tables import locked
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

DEPLOY_EVENTS = ("promoted", "forced")
DECISION_EVENTS = (*DEPLOY_EVENTS, "refused")


@dataclass
class Decision:
    """The outcome of `deploy`: whether `version` now serves, and why (each reason carries its numbers)."""

    promoted: bool
    version: str
    reasons: list[str]
    candidate_metrics: dict | None = None  # labeled-set metrics of the candidate, re-evaluated today
    current_metrics: dict | None = None  # same for the model deployed before, None if there was none
    previous: str | None = None
    forced: bool = False
    extra: dict = field(default_factory=dict)
    evidence: dict[str, dict] = field(default_factory=dict)  # Evidence.compact() by key
    unchanged: bool = False  # `version` was already the deployed model: nothing was judged

    def summary(self) -> str:
        if self.unchanged:
            return (f"nothing to deploy: {self.version} is already the deployed model (train a new candidate "
                    "first: `sortloop train`)")
        head = (f"deployed {self.version}" + (" (forced)" if self.forced else "") if self.promoted
                else f"refused {self.version}")
        prev = f" (previous: {self.previous})" if self.previous else ""
        return head + prev + "\n" + "\n".join(f"  - {r}" for r in self.reasons)


def deploy(ws: Workspace, version: str | None = None, *, force: bool = False,
           on_progress: ProgressCallback | None = None) -> Decision:
    """Promote `version` (default: the newest) unless the gate finds it significantly worse, or if `force`.

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
    with locked(ws.models_dir / "deploy"):
        current = deployed_version(ws)
        if current == version:
            if not _pointer_names(ws, version):  # torn or stale current.json: deploying what runs repairs it
                registry.set_current(ws, version)
                return Decision(True, version, [f"{version} is the deployed model; {registry.pointer_path(ws)} "
                                                "repaired"], previous=current)
            return Decision(False, version, [f"{version} is already the deployed model"], previous=current,
                            unchanged=True)
        check_artifact(candidate_dir)  # a damaged or mismatched artifact is refused before the gate, --force or not
        current_dir = registry.model_dir(ws, current) if current else None
        ok, reasons, evidences = gate.judge(ws, candidate_dir, current_dir, on_progress)
        labeled = evidences[0]
        forced = force and not ok
        if forced:
            reasons.append("FORCED: promoted despite failing the gate (--force)")
        decision = Decision(ok or force, version, reasons, labeled.candidate_metrics, labeled.current_metrics,
                            previous=current, forced=forced,
                            evidence={e.key: e.compact() for e in evidences if current_dir is not None})
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
        current = deployed_version(ws)
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


def deployed_version(ws: Workspace) -> str | None:
    """The deployed version as `deploy` and `rollback` see it: they must be able to repair a torn
    `current.json`, or one naming a deleted version, so then the newest deployment in the registry log
    whose folder still exists stands in (None if there is none)."""
    try:
        current = registry.current_version(ws)
    except ModelError as exc:
        logger.warning("%s; using the registry log instead", exc)
        current = None
    present = registry.list_versions(ws)
    if current in present:
        return current
    logged = [v for v in deployment_stack(ws) if v in present]
    return logged[-1] if logged else None


def _pointer_names(ws: Workspace, version: str) -> bool:
    try:
        return registry.current_version(ws) == version
    except ModelError:
        return False


def deployment_stack(ws: Workspace) -> list[str]:
    """Deployed versions in order, as the log records them (promotions push, rollbacks pop)."""
    stack: list[str] = []
    for event in registry.read_log(ws):
        if event.get("event") in DEPLOY_EVENTS:
            stack.append(event["version"])
        elif event.get("event") == "rolled_back" and stack:
            stack.pop()
    return stack


def describe_versions(ws: Workspace, problems: list[str] | None = None) -> list[dict]:
    """The version table (`models`, `status`, `report`): one dict per version (oldest first) with what its
    model.json measured at training (version, created_at, train_mode, classes, accuracies), whether it is
    deployed, the gate's last verdict on it with both kinds of evidence, and the log's last entry about it.

    Tolerant, because status must show a damaged workspace: a torn `current.json` counts as nothing
    deployed, and a version whose model.json is unreadable is left out, with one line in `problems`."""
    try:
        current = registry.current_version(ws)
    except ModelError:
        current = None
    log = registry.read_log(ws)
    verdicts = {e["version"]: e for e in log if e.get("event") in DECISION_EVENTS and "version" in e}
    last = {e["version"]: e for e in log if "version" in e}
    out = []
    for version in registry.list_versions(ws):
        try:
            spec = read_spec(ws.models_dir / version)
        except ModelError:
            if problems is not None:
                problems.append(f"{ws.models_dir / version / 'model.json'} is unreadable: version {version} left "
                                "out (it cannot be deployed; `sortloop train` makes a new one)")
            continue
        metrics = spec.get("metrics") or {}
        verdict = verdicts.get(version) or {}
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
            "gate": {"event": verdict.get("event"), "evidence": verdict.get("evidence") or {}} if verdict else None,
            "last_decision": last.get(version),  # the log's last entry about it (a rollback included)
        })
    return out


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
        "evidence": decision.evidence,
    })
