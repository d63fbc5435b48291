"""`sortloop demo --simulate-review N`: play the reviewer with the demo's answer key, retrain, gate, re-sort.

The simulated reviewer labels N photos with their true class (the answer key `sortloop.demo` keeps in
`runs/demo.json`): the first N of what `review push` sent, in push's own order (Label Studio's "Label All
Tasks" order), or, when nothing was pushed (`--no-review`), what it would send today (the review queue). When
the workspace's Label Studio runs and the photos were pushed, it annotates the real tasks through the API and
`review pull` brings the labels back; otherwise it writes them through `loop.data.manifest.set_labels`, the same
call a pull makes, and moves the reviewed copies (`loop.folders.apply`). If fewer than N photos can be reviewed, the
simulated user spends the rest as a person browsing the sorted folders would: moving misfiled copies into
their right category folder, which `scan` records as corrections. Then the loop does what the nightly job
does: train a candidate if the labels changed, let the gate decide, and after a promotion re-sort the copies
no person checked. It prints how many sorted copies are in the right folder before and after.
Caveat: the gate may refuse the candidate; the result says so with the gate's own reasons rather than
claiming an improvement.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from labeling import payloads, server
from labeling.push import select_candidates, within_budget
from loop.data import manifest as mf
from loop.data.label_sources import HUMAN_SOURCES, REVIEW
from loop.errors import SortloopError
from loop.learning import registry
from loop.learning.gate import describe_evidence
from loop.review import queue as review_queue
from loop.workspace import Workspace
from sortloop.demo import StepProgress, _no_step_progress, state_path
from sortloop.jobs import new_labels_since_last_train, resort_step

logger = logging.getLogger(__name__)

REVIEWER = "simulated reviewer"


@dataclass
class FolderAccuracy:
    """Sorted copies with an answer that sit in the right category folder: all of them, and those no person
    checked (neither reviewed nor moved)."""

    right: int = 0
    n: int = 0
    unchecked_right: int = 0
    unchecked_n: int = 0

    def text(self) -> str:
        share = lambda k, n: f"{k / n:.3f} ({k} of {n})" if n else "n/a"  # noqa: E731
        unchecked = share(self.unchecked_right, self.unchecked_n)
        return f"{share(self.right, self.n)}; of those no person checked {unchecked}"


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
    evidence: dict = field(default_factory=dict)
    before: FolderAccuracy | None = None  # the sorted tree before the review
    after: FolderAccuracy | None = None  # ...after the review, the retrain and the re-sort
    resorted: str = ""
    note: str = ""  # why nothing was trained, if so

    def lines(self) -> list[str]:
        """What to print: the review, the gate's decision, then the sorted folders before and after."""
        out = [f"simulated review: {self.reviewed} photo(s) labeled with their true class via {self.via} "
               f"({self.corrected} corrected the model's guess)"]
        if self.moved:
            out.append(f"simulated user: moved {self.moved} misfiled sorted copies into their right category "
                       "folder; `scan` recorded them as corrections")
        if self.new_version is None:
            out.append(f"no new model: {self.note}")
        else:
            verdict = "promoted" if self.promoted else "refused"
            out.append(f"gate {verdict} {self.new_version} ({self.old_version} -> {self.new_version}: "
                       f"{describe_evidence(self.evidence)}):")
            out += [f"  - {r}" for r in self.reasons]
        if self.resorted:
            out.append(self.resorted)
        if self.before is not None and self.after is not None:
            now = (f"{self.new_version}, reviewed copies moved, unchecked ones re-sorted" if self.promoted
                   else f"{self.old_version} kept, reviewed copies moved")
            out.append(f"sorted copies in the right folder before the review ({self.old_version}): "
                       f"{self.before.text()}")
            out.append(f"sorted copies in the right folder now ({now}): {self.after.text()}")
        return out


def read_answers(ws: Workspace) -> dict[str, str]:
    """The demo's answer key: {image_id: true class} of the photos it sorted as new."""
    path = state_path(ws)
    if not path.exists():
        raise SortloopError("no demo on record; run `sortloop demo` first")
    state = json.loads(path.read_text())
    answers = state.get("answers", state.get("held_out")) or {}  # "held_out": a demo.json from before answers
    if not answers:
        raise SortloopError("the demo's new photos have no answer key (they were not in class folders), so no "
                            "reviewer can be simulated; review them in Label Studio instead")
    return dict(answers)


def pick(ws: Workspace, n: int) -> pd.DataFrame:
    """The first `n` photos with an answer in push's order: those pushed, or what push would send today."""
    answers = read_answers(ws)
    df = mf.load(ws)
    pushed = df["review_status"].eq("pushed").fillna(False).to_numpy(bool)
    if pushed.any():  # what the reviewer sees in Label Studio, in order
        order = select_candidates(df[pushed], trust_hints=False)
    else:  # nothing pushed (--no-review): what `review push` would send with a day's budget of n
        review_queue.choose(ws, n)
        order = within_budget(select_candidates(mf.load(ws)), n)
    rows = order[order["image_id"].isin(answers)].head(max(0, n))
    return rows.assign(truth=rows["image_id"].map(answers))


def folder_accuracy(ws: Workspace, dest: Path, answers: dict[str, str]) -> FolderAccuracy:
    """How many of the sorted copies with an answer are in their answer's category folder."""
    from loop.sorting.copies import load_records

    records = load_records(ws, dest)
    records = records[(records["status"] == "present") & records["image_id"].isin(answers)]
    right = (records["category"].astype(str) == records["image_id"].map(answers)).to_numpy(bool)
    source = mf.load(ws).set_index("image_id")["label_source"]
    checked = records["image_id"].map(source).isin(HUMAN_SOURCES).to_numpy(bool)
    return FolderAccuracy(int(right.sum()), len(records), int((right & ~checked).sum()), int((~checked).sum()))


def simulate_review(ws: Workspace, n: int, *, step_progress: StepProgress = _no_step_progress) -> SimulatedReview:
    """Review up to `n` photos with their true class, then retrain, gate and re-sort (as `serve` would)."""
    from loop.folders.apply import apply_labels

    answers = read_answers(ws)
    dest = Path(json.loads(state_path(ws).read_text()).get("dest") or "")
    result = SimulatedReview(old_version=registry.current_version(ws))
    if dest.is_dir():
        result.before = folder_accuracy(ws, dest, answers)
    chosen = pick(ws, n)
    result.reviewed = len(chosen)
    result.corrected = int((chosen["truth"] != chosen["pred_label"]).sum())
    pushed = chosen["review_task"].notna().all() and chosen["review_status"].eq("pushed").all()
    if len(chosen) and pushed and server.status(ws).running:
        _review_in_labelstudio(ws, chosen)
        result.via = "Label Studio (then `review pull`)"
    else:
        record_reviews(ws, chosen)
        result.via = "set_labels (Label Studio not running)"
    apply_labels(ws)  # as after every pull: the reviewed copies move to their class (a no-op if done)

    if len(chosen) < n:
        result.moved = _move_misfiled(ws, n - len(chosen))

    changed, why = new_labels_since_last_train(ws)
    if not changed:
        result.note = why
    else:
        from loop.learning.deployment import deploy
        from loop.learning.train import train

        with step_progress("train") as on_progress:
            trained = train(ws, on_progress=on_progress)
        with step_progress("deploy") as on_progress:
            decision = deploy(ws, trained.version, on_progress=on_progress)
        result.new_version, result.promoted, result.reasons = trained.version, decision.promoted, decision.reasons
        result.evidence = decision.evidence
        if decision.promoted:
            result.resorted = resort_step(ws).summary
    if dest.is_dir():
        result.after = folder_accuracy(ws, dest, answers)
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
    truth = read_answers(ws)
    labels = mf.load(ws).set_index("image_id")["label_source"]
    records = load_records(ws, dest)
    records = records[(records["status"] == "present") & records["image_id"].isin(truth)]
    wrong = records[(records["category"] != records["image_id"].map(truth))
                    & ~records["image_id"].map(labels).isin(HUMAN_SOURCES)]
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
    from sortloop.jobs import pull_reviews

    with connect(ws) as client:
        for row in chosen.itertuples():
            client.call(f"annotate task {row.review_task}", client.annotations.create, int(row.review_task),
                        idempotent=False, result=payloads.choice_result(str(row.truth)))
    report = pull_reviews(ws)
    if not report.ok:
        raise SortloopError(f"simulated review: pull rejected {len(report.rejected)} label(s): "
                            f"{report.rejected[0].reason}")


def record_reviews(ws: Workspace, chosen: pd.DataFrame) -> None:
    """What `review pull` writes for reviews (`chosen`: image_id, truth): labels through the same
    `set_labels` call, then review_status "reviewed" (so neither push nor selection offers them again)."""
    mf.set_labels(ws, [mf.LabelChange(r.image_id, str(r.truth), REVIEW, REVIEWER, note="demo --simulate-review")
                       for r in chosen.itertuples()])
    ids = set(chosen["image_id"])

    def mark(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[df["image_id"].isin(ids), "review_status"] = "reviewed"
        return df

    if ids:
        mf.update(ws, mark)



