"""The promotion gate: a candidate ships unless the evidence says it is worse than the deployed model.

Two kinds of evidence, each a paired comparison of both versions on the same photos, none of which
either version trained on (`deploy` re-scores both today, with today's labels):

- **your labeled set** (`labeled_set`): the gate set, the user's ingested photos no model trains on
  (`split = valid`). It guards against forgetting what was labeled first. With too few items per class
  for a gate set, both versions' stored out-of-fold predictions on the same labeled photos stand in.
- **your photos labeled since the last model** (`new_labels`): every label the deployed model did not
  train on (reviews, user moves, new folders), on user photos of items it never saw. The deployed model
  is scored on them as it is; the candidate, which trains on them, out of fold by item (a fold model that
  never saw the item: `loop.model.head.item_folds`). These are the shop's own photos as the deployed model
  sorted them, which always differ from whatever was labeled first: the evidence the gate exists for.

The rule is a statistical claim: refuse only on a *significant* loss (`loop.scoring.paired`). Per evidence,
McNemar's exact one-sided test on the discordant photos; per class and evidence, a one-sided binomial
test on that class's discordant photos; each family corrected by Holm-Bonferroni at `gate.alpha` (the
overall tests over the kinds of evidence, the class tests over every (evidence, class) pair tested).
Either evidence can refuse on its own: a candidate much better on the new photos but significantly worse
on the labeled set has forgotten something. Pooling them would let the larger set drown the smaller one.
One structural rule besides: a candidate may not drop a class the deployed model has while photos are
still labeled with it. A tie or a loss that is not significant promotes: the candidate learned from more
labels. No fixed "may drop at most x" rule: on a small shop's photo counts those refuse on two or three
photos, and in `bench/domain_shift.py` and `bench/learning.py` every candidate refused that way was
better on unseen photos. Every reason carries n, the discordant counts and the p-value with its Holm
threshold. `force=True` overrides and says so in the log. Caveats: the very first deploy has nothing to
beat (it promotes if the candidate can be measured at all); successive losses too small to be
significant one at a time could add up (the report's accuracy plot shows each version).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loop.data import manifest as mf
from loop.data.items import item_keys
from loop.errors import ModelError
from loop.learning import registry
from loop.model.artifact import check_artifact, load_predictor, read_spec
from loop.model.evaluate import classification_metrics, evaluate_predictor
from loop.progress import ProgressCallback, no_progress
from loop.scoring.paired import Paired, class_tests, holm, loss_test
from loop.tables import locked
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

DEPLOY_EVENTS = ("promoted", "forced")
LABELED_SET, NEW_LABELS = "labeled_set", "new_labels"
EVIDENCE_NAMES = {LABELED_SET: "your labeled set", NEW_LABELS: "your photos labeled since the last model"}


@dataclass
class Evidence:
    """One kind of evidence: both versions' outcomes on the same photos, or why there are none."""

    key: str  # LABELED_SET or NEW_LABELS
    paired: Paired | None
    candidate_metrics: dict | None = None
    current_metrics: dict | None = None
    how: str = ""  # how the photos were chosen and scored, for the reasons
    left_out: str = ""  # photos left out and why

    @property
    def name(self) -> str:
        return EVIDENCE_NAMES[self.key]

    def compact(self) -> dict:
        """What the log, status, `models` and the report keep of it."""
        p = self.paired
        if p is None:
            return {"name": self.name, "n": 0, "how": self.how}
        return {"name": self.name, "n": p.n, "candidate_accuracy": float(p.candidate.mean()) if p.n else None,
                "current_accuracy": float(p.current.mean()) if p.n else None,
                "gained": int((p.candidate & ~p.current).sum()), "lost": int((~p.candidate & p.current).sum()),
                "how": self.how}


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

    def summary(self) -> str:
        head = (f"deployed {self.version}" + (" (forced)" if self.forced else "") if self.promoted
                else f"refused {self.version}")
        prev = f" (previous: {self.previous})" if self.previous else ""
        return head + prev + "\n" + "\n".join(f"  - {r}" for r in self.reasons)


def user_valid_rows(ws: Workspace) -> pd.DataFrame:
    """Today's labeled user photos in the gate set (split "valid"): "your labeled set"."""
    from loop.learning.train import labeled_rows

    rows = labeled_rows(ws)
    return rows[(rows["split"] == "valid") & (rows["source"] == "user")].reset_index(drop=True)


def compare(evidences: list[Evidence], *, alpha: float, dropped_classes: dict[str, int] | None = None
            ) -> tuple[bool, list[str]]:
    """Apply the gate's rules to the evidence (see the module docstring); a current model must exist.

    Args:
        evidences: each kind of evidence; those without paired outcomes are reported, not tested.
        dropped_classes: classes the deployed model has and the candidate lacks -> photos labeled with them.
    Returns:
        (passes, reasons): one reason per evidence and one for the classes, each with n, discordant counts
        and p-values; failures start with "FAIL".
    """
    tested = [e for e in evidences if e.paired is not None and e.paired.n]
    reasons: list[str] = []
    if not tested:
        return False, ["FAIL: no photo both versions can be compared on (no labeled-set photo, no new label of "
                       "an item the deployed model never saw); label photos, or deploy with --force"]
    overall = holm([loss_test(e.paired, e.name) for e in tested], alpha)
    for test, e in zip(overall, tested, strict=True):
        verdict = "FAIL: significantly worse on" if test.significant else "not significantly worse on"
        reasons.append(f"{verdict} {e.name}: {test.describe()}; {e.how}")
    for e in evidences:
        if e.paired is None or not e.paired.n:
            reasons.append(f"{e.name}: no photos to compare on ({e.how})")
        if e.left_out:
            reasons.append(f"{e.name}: {e.left_out}")
    by_class = holm([t for e in tested for t in class_tests(e.paired, e.name)], alpha)
    worse = [t for t in by_class if t.lost > t.gained]
    if any(t.significant for t in by_class):
        reasons.append("FAIL: class significantly worse: " + "; ".join(
            f"{t.describe()} on {t.where}" for t in by_class if t.significant))
    else:
        worst = sorted(worse, key=lambda t: t.p)[:3]
        detail = ("; largest losses: " + "; ".join(f"{t.describe()} on {t.where}" for t in worst)) if worst else ""
        reasons.append(f"no class significantly worse ({len(by_class)} class tests, Holm-corrected at {alpha})"
                       + detail)
    for name, count in sorted((dropped_classes or {}).items()):
        reasons.append(f"FAIL: the candidate cannot sort into {name!r} any more (the deployed model can; {count} "
                       f"photo(s) are labeled {name!r}, none of them in the candidate's training photos); "
                       "label some training photos of it, or relabel them all")
    return not any(r.startswith("FAIL") for r in reasons), reasons


def first_deployment(candidate_n: int, where: str) -> tuple[bool, list[str]]:
    """Nothing deployed yet: promote if the candidate could be measured at all."""
    if not candidate_n:
        return False, ["FAIL: no labeled user photos to measure the candidate on; ingest/label user photos, "
                       "or deploy with --force"]
    return True, [f"first deployment: measured on {candidate_n} photos ({where})"]


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
            decision = Decision(False, version, [f"{version} is already the deployed model"], previous=current)
            _log(ws, "refused", decision)
            return decision
        check_artifact(candidate_dir)  # a damaged or mismatched artifact is refused before the gate, --force or not
        current_dir = registry.model_dir(ws, current) if current else None
        evidences = gather_evidence(ws, candidate_dir, current_dir, on_progress)
        labeled = evidences[0]
        if current_dir is None:
            ok, reasons = first_deployment(labeled.candidate_metrics["n"] if labeled.candidate_metrics else 0,
                                           labeled.how)
        else:
            ok, reasons = compare(evidences, alpha=ws.settings.gate.alpha,
                                  dropped_classes=dropped_classes(ws, candidate_dir, current_dir))
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


def gather_evidence(ws: Workspace, candidate_dir, current_dir, on_progress: ProgressCallback) -> list[Evidence]:
    """[your labeled set, your photos labeled since the last model] for this pair of versions."""
    from loop.learning.train import labeled_rows

    labeled = labeled_rows(ws).set_index("image_id", drop=False)
    rows, excluded = gate_rows(ws, [candidate_dir] + ([current_dir] if current_dir else []))
    if rows.empty:  # too few items per class for a gate set: both versions out of fold
        first = out_of_fold_evidence(candidate_dir, current_dir, labeled)
    else:
        candidate_metrics, candidate_right, kept = _measure(ws, candidate_dir, rows, on_progress)
        paired, current_metrics = None, None
        if current_dir is not None:
            current_metrics, current_right, _ = _measure(ws, current_dir, kept, on_progress)
            paired = Paired(kept["label"].astype(str).to_numpy(), candidate_right, current_right)
        first = Evidence(LABELED_SET, paired, candidate_metrics, current_metrics,
                         how="gate-set photos no model trains on, both versions scored as they are",
                         left_out=f"{excluded} gate photos left out: a compared model trained on them" if excluded
                         else "")
    if current_dir is None:
        return [first]
    return [first, new_label_evidence(ws, candidate_dir, current_dir, labeled, on_progress)]


def out_of_fold_evidence(candidate_dir, current_dir, labeled: pd.DataFrame) -> Evidence:
    """Without a gate set: both versions' stored out-of-fold predictions on the same labeled photos.

    Each prediction comes from a fold model that never saw the photo's item, and the candidate's folds also
    learned from the new labels, which is the question (`loop.model.head.item_folds` keeps an item's fold across
    versions). Not the deployed model itself against the candidate's folds on old labels: with ~3 items per
    class a fold model misses a third of a class's items the deployed model learned from (on eth80 that
    refused candidates up to 6 points better on unseen items). With nothing deployed, the candidate's
    out-of-fold accuracy is the evidence for a first deployment.
    """
    how = "no gate set (too few items per class): both versions' out-of-fold predictions on the same photos"
    oof = _read_oof(candidate_dir)
    if oof is None:
        return Evidence(LABELED_SET, None, how="no gate set, and the candidate has no out-of-fold predictions")
    classes = read_spec(candidate_dir)["classes"]
    if current_dir is None:
        metrics = classification_metrics(oof["label"].tolist(), np.stack(oof["probs"].to_numpy()), classes)
        return Evidence(LABELED_SET, None, metrics, how=f"no gate set (too few items per class): out-of-fold "
                        f"accuracy {_acc(metrics['accuracy'])} of {metrics['n']} photos")
    current_oof = _read_oof(current_dir)
    if current_oof is None:
        return Evidence(LABELED_SET, None, how="no gate set, and the deployed version kept no out-of-fold "
                        "predictions (e.g. finetune mode)")
    both = oof[oof["image_id"].isin(labeled.index)].merge(current_oof[["image_id", "probs"]], on="image_id",
                                                           suffixes=("", "_current"))
    labels = labeled.loc[both["image_id"], "label"].astype(str).to_numpy()
    candidate_metrics, candidate_right = _scored(both, labels, classes)
    current_metrics, current_right = _scored(both, labels, read_spec(current_dir)["classes"], "probs_current")
    return Evidence(LABELED_SET, Paired(labels, candidate_right, current_right), candidate_metrics,
                    current_metrics, how=how)


def new_label_evidence(ws: Workspace, candidate_dir, current_dir, labeled: pd.DataFrame,
                       on_progress: ProgressCallback) -> Evidence:
    """Labels the deployed model never trained on, of user photos of items it never saw: the deployed model
    as it is against the candidate out of fold, with today's labels."""
    from loop.learning.train import training_set

    how = "the deployed model as it is, the candidate out of fold by item"
    oof, seen = _read_oof(candidate_dir), training_set(current_dir)
    if oof is None or seen is None:
        missing = ("the candidate kept no out-of-fold predictions" if oof is None
                   else "the deployed version did not record what it trained on")
        return Evidence(NEW_LABELS, None, how=f"not measurable: {missing}")
    df = mf.load(ws)
    item_of = dict(zip(df["image_id"].astype(str), item_keys(df), strict=True))
    known_items = {item_of.get(str(i), str(i)) for i in seen["image_id"]}
    fresh = oof[(oof["source"] == "user") & oof["image_id"].isin(labeled.index)
                & ~oof["image_id"].isin(set(seen["image_id"].astype(str)))].reset_index(drop=True)
    of_known = fresh["image_id"].map(lambda i: item_of.get(str(i), str(i))).isin(known_items).to_numpy(bool)
    fresh = fresh[~of_known].reset_index(drop=True)
    left_out = (f"{int(of_known.sum())} new labels left out: photos of items the deployed model trained on"
                if of_known.any() else "")
    if fresh.empty:
        return Evidence(NEW_LABELS, None, how="no new label of an item the deployed model never saw", left_out=left_out)
    rows = labeled.loc[fresh["image_id"]].reset_index(drop=True)
    current_metrics, current_right, kept = _measure(ws, current_dir, rows, on_progress)
    fresh = fresh[fresh["image_id"].isin(set(kept["image_id"]))].reset_index(drop=True)
    labels = kept["label"].astype(str).to_numpy()
    candidate_metrics, candidate_right = _scored(fresh, labels, read_spec(candidate_dir)["classes"])
    return Evidence(NEW_LABELS, Paired(labels, candidate_right, current_right), candidate_metrics, current_metrics,
                    how=how, left_out=left_out)


def dropped_classes(ws: Workspace, candidate_dir, current_dir) -> dict[str, int]:
    """Classes of the deployed model the candidate lacks, that photos are still labeled with -> how many."""
    from loop.learning.train import labeled_rows

    lost = set(read_spec(current_dir)["classes"]) - set(read_spec(candidate_dir)["classes"])
    if not lost:
        return {}
    counts = labeled_rows(ws)["label"].astype(str).value_counts()
    return {name: int(counts[name]) for name in lost if name in counts.index}


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


def describe_versions(ws: Workspace) -> list[dict]:
    """One dict per version (oldest first): version, created_at, train_mode, accuracies, deployed, and the
    gate's last verdict on it with both kinds of evidence."""
    current = registry.current_version(ws)
    verdicts = {e["version"]: e for e in registry.read_log(ws)
                if e.get("event") in ("promoted", "forced", "refused") and "version" in e}
    out = []
    for version in registry.list_versions(ws):
        spec = read_spec(ws.models_dir / version)
        metrics = spec.get("metrics", {})
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
        })
    return out


def describe_evidence(evidence: dict[str, dict] | None) -> str:
    """One line for status, `models` and the report, e.g. "your labeled set 0.700 -> 0.688 on 80 photos;
    your photos labeled since the last model 0.650 -> 0.911 on 90 photos" (deployed -> candidate)."""
    parts = []
    for key in (LABELED_SET, NEW_LABELS):
        e = (evidence or {}).get(key)
        if not e:
            continue
        if not e.get("n"):
            parts.append(f"{e['name']}: none")
            continue
        parts.append(f"{e['name']} {_acc(e.get('current_accuracy'))} -> {_acc(e.get('candidate_accuracy'))} "
                     f"on {e['n']} photos")
    return "; ".join(parts) if parts else "no comparison recorded"


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


def _read_oof(model_dir) -> pd.DataFrame | None:
    """A version's stored out-of-fold predictions (head mode), or None."""
    path = model_dir / "oof_predictions.parquet"
    return pd.read_parquet(path) if path.exists() else None


def _scored(frame: pd.DataFrame, labels: np.ndarray, classes: list[str], column: str = "probs"
            ) -> tuple[dict, np.ndarray]:
    """(metrics, per-photo correctness) of stored probabilities `frame[column]` against `labels`."""
    probs = np.stack(frame[column].to_numpy()) if len(frame) else np.zeros((0, len(classes)))
    right = np.array([classes[i] for i in probs.argmax(axis=1)]) == labels if len(frame) else np.zeros(0, bool)
    return classification_metrics(labels.tolist(), probs, classes), right


def _measure(ws: Workspace, model_dir, rows: pd.DataFrame, on_progress: ProgressCallback
             ) -> tuple[dict, np.ndarray, pd.DataFrame]:
    """(metrics, per-photo correctness, the rows scored) of the artifact in `model_dir` on `rows`.

    A photo that can no longer be read is left out (the metrics say how many were scored).
    """
    from loop.data.resized import resized_path

    predictor = load_predictor(model_dir, "onnx")
    _, probs = evaluate_predictor(ws, predictor, rows, on_progress=on_progress)
    kept = rows[[resized_path(ws, i, predictor.image_size).exists() for i in rows["image_id"]]].reset_index(drop=True)
    labels = kept["label"].astype(str).to_numpy()
    predicted = np.array([predictor.classes[i] for i in probs.argmax(axis=1)]) if len(probs) else np.zeros(0, str)
    return classification_metrics(labels.tolist(), probs, predictor.classes), predicted == labels, kept


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
