"""`sortloop demo --simulate-review N`: play the reviewer with the held-out photos' known classes, retrain, gate.

The simulated reviewer answers the N most useful flagged held-out photos (least confident first) with their
true class (kept by `sortloop.demo` in `runs/demo.json`). When the workspace's Label Studio is running and
the photos were pushed, it annotates the real tasks through the API and `review pull` brings the labels
back; otherwise it writes them through `loop.data.manifest.set_labels`, the same call a pull makes. If fewer
than N photos were flagged (a confident model flags few, even when wrong), the simulated user spends the
rest as a person browsing the sorted folders would: moving misfiled copies into their right category
folder, which `scan` records as corrections. Then the loop does what the nightly job does: train a
candidate if the labels changed, and let the gate decide.
Caveat: the gate may refuse the candidate (e.g. a class's recall dropped on a few validation photos); the
result says so with the gate's own reasons rather than claiming an improvement.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from labeling import payloads, server
from loop.data import manifest as mf
from loop.errors import SortloopError
from loop.learning import registry
from loop.workspace import Workspace
from sortloop.demo import StepProgress, _no_step_progress, state_path
from sortloop.jobs import new_labels_since_last_train

logger = logging.getLogger(__name__)

REVIEWER = "simulated reviewer"


@dataclass
class SimulatedReview:
    """What the simulated review changed and what the gate then decided, with both models' numbers."""

    reviewed: int = 0
    corrected: int = 0  # reviews whose class differs from the model's guess
    moved: int = 0  # misfiled sorted copies moved to their right folder (recorded by `scan`)
    via: str = ""  # "Label Studio" or "set_labels"
    old_version: str | None = None
    new_version: str | None = None
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)
    old_accuracy: float | None = None  # both on the same, current user validation photos
    new_accuracy: float | None = None
    n_valid: int = 0
    note: str = ""  # why nothing was trained, if so

    def lines(self) -> list[str]:
        """What to print: the review, then the old and new model side by side, then the gate's decision."""
        out = [f"simulated review: {self.reviewed} flagged photo(s) labeled with their true class via {self.via} "
               f"({self.corrected} corrected the model's guess)"]
        if self.moved:
            out.append(f"simulated user: moved {self.moved} misfiled sorted copies into their right category "
                       "folder; `scan` recorded them as corrections")
        if self.new_version is None:
            return [*out, f"no new model: {self.note}"]
        if self.old_accuracy is not None and self.new_accuracy is not None:
            out.append(f"accuracy on the same {self.n_valid} user validation photos: {self.old_version} (before) "
                       f"{self.old_accuracy:.3f} -> {self.new_version} (after review) {self.new_accuracy:.3f}")
        verdict = "promoted" if self.promoted else "refused"
        out.append(f"gate {verdict} {self.new_version}: " + "; ".join(self.reasons))
        return out


def pick(ws: Workspace, n: int) -> pd.DataFrame:
    """The `n` flagged held-out photos a reviewer would see first (least confident first), not reviewed yet."""
    truth = read_truth(ws)
    df = mf.load(ws)
    rows = df[df["image_id"].isin(truth) & df["flag"].notna()
              & ~df["review_status"].isin(["reviewed", "skipped"]).fillna(False)]
    rows = rows.sort_values(["pred_conf", "image_id"], na_position="last").head(max(0, n))
    return rows.assign(truth=rows["image_id"].map(truth))


def read_truth(ws: Workspace) -> dict[str, str]:
    path = state_path(ws)
    if not path.exists():
        raise SortloopError("no held-out photos on record; run `sortloop demo` first (with --holdout above 0)")
    return dict(json.loads(path.read_text())["held_out"])


def simulate_review(ws: Workspace, n: int, *, step_progress: StepProgress = _no_step_progress) -> SimulatedReview:
    """Review up to `n` flagged held-out photos with their true class, then retrain and gate (as `serve` would)."""
    chosen = pick(ws, n)
    result = SimulatedReview(reviewed=len(chosen), old_version=registry.current_version(ws))
    result.corrected = int((chosen["truth"] != chosen["pred_label"]).sum())
    pushed = chosen["review_task"].notna().all() and chosen["review_status"].eq("pushed").all()
    if len(chosen) and pushed and server.status(ws).running:
        _review_in_labelstudio(ws, chosen)
        result.via = "Label Studio (then `review pull`)"
    else:
        record_reviews(ws, chosen)
        result.via = "set_labels (Label Studio not running)"

    if len(chosen) < n:
        result.moved = _move_misfiled(ws, n - len(chosen))

    changed, why = new_labels_since_last_train(ws)
    if not changed:
        result.note = why
        return result
    from loop.learning.gate import deploy
    from loop.learning.train import train

    with step_progress("train") as on_progress:
        trained = train(ws, on_progress=on_progress)
    with step_progress("deploy") as on_progress:
        decision = deploy(ws, trained.version, on_progress=on_progress)
    result.new_version, result.promoted, result.reasons = trained.version, decision.promoted, decision.reasons
    if decision.candidate_metrics:
        result.new_accuracy = decision.candidate_metrics.get("accuracy")
        result.n_valid = int(decision.candidate_metrics.get("n") or 0)
    if decision.current_metrics:
        result.old_accuracy = decision.current_metrics.get("accuracy")
    return result


def _move_misfiled(ws: Workspace, n: int) -> int:
    """Move up to `n` held-out photos' sorted copies from a wrong category folder to the right one, then `scan`.

    Returns how many copies were moved (and recorded as corrections by the scan).
    """
    import os

    from loop.folders.corrections import scan
    from loop.sorting.copies import load_records

    state = json.loads(state_path(ws).read_text())
    dest = Path(state.get("dest") or "")
    if not state.get("dest") or not dest.is_dir():
        return 0
    truth = state["held_out"]
    labels = mf.load(ws).set_index("image_id")["label_source"]
    records = load_records(ws, dest)
    records = records[(records["status"] == "present") & records["image_id"].isin(truth)]
    wrong = records[(records["category"] != records["image_id"].map(truth))
                    & ~records["image_id"].map(labels).isin(["review", "user_move"])]
    moved = 0
    for row in wrong.sort_values("dest_path").head(n).itertuples():
        old = Path(str(row.dest_path))
        rel = old.relative_to(dest / str(row.category))
        new = dest / truth[row.image_id] / rel
        if new.exists() or not old.exists():
            continue
        new.parent.mkdir(parents=True, exist_ok=True)
        os.rename(old, new)
        moved += 1
    if moved:
        scan(ws, dest)
    return moved


def _review_in_labelstudio(ws: Workspace, chosen: pd.DataFrame) -> None:
    """Annotate each chosen photo's task through Label Studio's API, then pull like `review pull`."""
    from labeling.client import connect
    from labeling.pull import pull

    with connect(ws) as client:
        for row in chosen.itertuples():
            client.call(f"annotate task {row.review_task}", client.annotations.create, int(row.review_task),
                        idempotent=False, result=payloads.choice_result(str(row.truth)))
    report = pull(ws)
    if not report.ok:
        raise SortloopError(f"simulated review: pull rejected {len(report.rejected)} label(s): "
                            f"{report.rejected[0].reason}")


def record_reviews(ws: Workspace, chosen: pd.DataFrame) -> None:
    """What `review pull` writes for reviews (`chosen`: image_id, truth): labels through the same
    `set_labels` call, then review_status "reviewed" (so neither push nor selection offers them again)."""
    mf.set_labels(ws, [mf.LabelChange(r.image_id, str(r.truth), "review", REVIEWER, note="demo --simulate-review")
                       for r in chosen.itertuples()])
    ids = set(chosen["image_id"])

    def mark(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[df["image_id"].isin(ids), "review_status"] = "reviewed"
        return df

    if ids:
        mf.update(ws, mark)



