"""The promotion gate: a candidate ships unless the evidence says it is worse than the deployed model.

Two kinds of evidence, each a paired comparison of both versions on the same photos, none of which
either version trained on (`judge` re-scores both today, with today's labels;
`loop.learning.deployment.deploy` asks it):

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
threshold. Caveats: the very first deploy has nothing to
beat (it promotes if the candidate can be measured at all); successive losses too small to be
significant one at a time could add up (the report's accuracy plot shows each version).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from loop.data import manifest as mf
from loop.data.items import item_keys
from loop.model.artifact import load_predictor, read_spec
from loop.model.evaluate import classification_metrics, evaluate_predictor
from loop.progress import ProgressCallback, no_progress
from loop.scoring.paired import Paired, class_tests, holm, loss_test
from loop.tables import write_table_atomic
from loop.workspace import Workspace

GATE_PREDICTIONS_FILE = "gate_predictions.parquet"  # a version's own probabilities on gate photos, by image_id

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


def user_valid_rows(ws: Workspace, labeled: pd.DataFrame | None = None) -> pd.DataFrame:
    """Today's labeled user photos in the gate set (split "valid"): "your labeled set".

    `labeled`: `loop.learning.train.labeled_rows` when the caller has them already."""
    from loop.learning.train import labeled_rows

    rows = labeled_rows(ws) if labeled is None else labeled
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


def judge(ws: Workspace, candidate_dir: Path, current_dir: Path | None,
          on_progress: ProgressCallback = no_progress) -> tuple[bool, list[str], list[Evidence]]:
    """Whether the candidate may replace the deployed model (`current_dir`; None: nothing deployed yet).

    Returns:
        (passes, the reasons with their numbers, the evidence: [your labeled set, your new photos]).
    """
    from loop.learning.train import labeled_rows

    df = mf.load(ws)  # once: every kind of evidence reads today's labels from it
    labeled = labeled_rows(ws, df=df)
    evidences = gather_evidence(ws, df, labeled, candidate_dir, current_dir, on_progress)
    if current_dir is None:
        first = evidences[0]
        ok, reasons = first_deployment(first.candidate_metrics["n"] if first.candidate_metrics else 0, first.how)
    else:
        ok, reasons = compare(evidences, alpha=ws.settings.gate.alpha,
                              dropped_classes=dropped_classes(labeled, candidate_dir, current_dir))
    return ok, reasons, evidences


def gather_evidence(ws: Workspace, df: pd.DataFrame, labeled: pd.DataFrame, candidate_dir, current_dir,
                    on_progress: ProgressCallback) -> list[Evidence]:
    """[your labeled set, your photos labeled since the last model] for this pair of versions.

    `df`: the manifest; `labeled`: its rows that can train or validate (`labeled_rows`)."""
    rows, excluded = gate_rows(ws, [candidate_dir] + ([current_dir] if current_dir else []), labeled)
    labeled = labeled.set_index("image_id", drop=False)
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
    return [first, new_label_evidence(ws, df, candidate_dir, current_dir, labeled, on_progress)]


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


def new_label_evidence(ws: Workspace, df: pd.DataFrame, candidate_dir, current_dir, labeled: pd.DataFrame,
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


def dropped_classes(labeled: pd.DataFrame, candidate_dir, current_dir) -> dict[str, int]:
    """Classes of the deployed model the candidate lacks, that photos (`labeled`) are still labeled with ->
    how many."""
    lost = set(read_spec(current_dir)["classes"]) - set(read_spec(candidate_dir)["classes"])
    if not lost:
        return {}
    counts = labeled["label"].astype(str).value_counts()
    return {name: int(counts[name]) for name in lost if name in counts.index}


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


def gate_rows(ws: Workspace, model_dirs: list, labeled: pd.DataFrame | None = None) -> tuple[pd.DataFrame, int]:
    """Today's gate photos minus any photo one of `model_dirs` trained on; and how many were left out.
    `labeled`: `labeled_rows` when the caller has them already.

    By construction (stable splits) no model trains on the gate set; this check makes it a guarantee,
    even for a version trained before a split setting changed.
    """
    from loop.learning.train import training_set

    rows = user_valid_rows(ws, labeled)
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
    from loop.data.resized import ensure_resized, resized_path

    predictor = load_predictor(model_dir, "onnx")
    ensure_resized(ws, rows["image_id"].tolist(), rows["path"].tolist(), predictor.image_size)
    kept = rows[[resized_path(ws, i, predictor.image_size).exists() for i in rows["image_id"]]].reset_index(drop=True)
    probs = gate_probabilities(ws, predictor, Path(model_dir), kept, on_progress)
    labels = kept["label"].astype(str).to_numpy()
    predicted = np.array([predictor.classes[i] for i in probs.argmax(axis=1)]) if len(probs) else np.zeros(0, str)
    return classification_metrics(labels.tolist(), probs, predictor.classes), predicted == labels, kept


def gate_probabilities(ws: Workspace, predictor, model_dir: Path, rows: pd.DataFrame,
                       on_progress: ProgressCallback) -> np.ndarray:
    """The artifact's probabilities (N, K) on gate photos `rows` (resized), predicting only photos it never scored.

    Why: every nightly deploy measures the deployed version on the whole gate set again, thousands of
    photos for a shop (bench/train_scale.py); its artifact and the resized inputs (keyed by content hash)
    never change, so its outputs are kept in its folder (GATE_PREDICTIONS_FILE) and only photos new to
    the gate set are run.
    """
    path = model_dir / GATE_PREDICTIONS_FILE
    known = pd.read_parquet(path) if path.exists() else pd.DataFrame({"image_id": [], "probs": []})
    stored = dict(zip(known["image_id"].astype(str), known["probs"], strict=True))
    ids = rows["image_id"].astype(str)
    todo = rows[~ids.isin(stored.keys())]
    if len(todo):
        _, new = evaluate_predictor(ws, predictor, todo, on_progress=on_progress)
        stored.update(zip(todo["image_id"].astype(str), list(new), strict=True))
        frame = pd.DataFrame({"image_id": list(stored), "probs": [np.asarray(p, np.float32) for p in stored.values()]})
        write_table_atomic(frame, path)
    width = len(predictor.classes)
    return np.stack([stored[i] for i in ids]).astype(np.float32) if len(ids) else np.zeros((0, width), np.float32)


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
