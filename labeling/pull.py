"""`review pull`: reviewers' decisions in Label Studio become manifest labels (incrementally).

Only tasks changed since the watermark are fetched: `updated_at > watermark` AND at least one annotation,
cancelled ones included (a skip does not count in `total_annotations`), through Label Studio's bulk export
(an export snapshot made and read with the SDK's `projects.exports` calls, see `changed_tasks`).
Per image the latest non-cancelled annotation wins; a task with only cancelled annotations is recorded as skipped,
not labeled; a task whose annotations were all deleted after a pull takes its label back (`labeling.deleted`).
Labels go through `loop.data.manifest.set_labels` (source "review", by = the reviewer's e-mail, at = the
annotation's time), so they land in the label history too.

Dedupe: each image remembers the annotation (id, updated_at) last applied, so a task touched for another
reason (a comment, a new prediction) does not re-apply an old annotation over a later user move, and the
`OVERLAP_S` re-read before the watermark (for saves committed after a later one) costs nothing.
Never loses a label: the watermark (`<workspace>/labelstudio/pull.json`) is written only after the
manifest writes succeeded, and it never moves past a task whose label was rejected.
The sorted folders follow the labels afterwards, in the application (`sortloop.jobs.pull_reviews` runs
`loop.folders.apply.apply_labels`): this adapter returns what changed and moves no folder.
Caveat: a label that is not a known class (deployed model's classes + manifest labels) is rejected and
reported, unless `labelstudio.allow_new_classes` is true; a label that cannot be a class name at all
(`loop.data.classnames`: "../../etc", "_x", ...) is always rejected. Fix it in Label Studio and pull again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from labeling import deleted, payloads
from labeling.client import Client, connect
from labeling.project import find_project, known_classes
from loop.atomic import write_json_atomic
from loop.data import manifest as mf
from loop.data.classnames import OTHER_LABEL, class_name_problem, normal_name, twin_problem
from loop.data.label_sources import REVIEW
from loop.errors import LabelStudioError
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

RERUN = "run the pull again (nothing was applied yet; the watermark did not move)"
OVERLAP_S = 60.0  # each pull re-reads this much before the watermark; the per-image dedupe makes it free


@dataclass(frozen=True)
class Rejected:
    """A reviewer's label sortloop refused to apply."""

    image_id: str
    task_id: int
    label: str
    reason: str


@dataclass(frozen=True)
class PullReport:
    """What one pull did."""

    url: str
    project_id: int | None
    tasks_seen: int = 0  # tasks with a decision not seen by an earlier pull
    labeled: int = 0  # photos whose class changed (new or different label)
    confirmed: int = 0  # reviewed, class already as the reviewer said (only the label's source may change)
    skipped: int = 0
    unknown_images: int = 0  # tasks for images not in this manifest (ignored)
    rejected: list[Rejected] = field(default_factory=list)
    watermark: str | None = None
    seconds: float = 0.0
    reverted: int = 0  # labels taken back because their annotation was deleted in Label Studio
    unreadable: list[str] = field(default_factory=list)  # annotations skipped as unreadable (first pull seeing each)

    @property
    def ok(self) -> bool:
        return not self.rejected

    def summary(self) -> str:
        if self.project_id is None:
            return f"nothing to pull: no sortloop project on {self.url} yet (run `sortloop review push`)"
        text = (f"pulled {self.tasks_seen} changed task(s) from {self.url}/projects/{self.project_id}: "
                f"{self.labeled} label(s) set, {self.confirmed} unchanged, {self.skipped} skipped")
        if self.reverted:
            text += f", {self.reverted} reverted (annotation deleted)"
        if self.unknown_images:
            text += f", {self.unknown_images} for images not in this manifest"
        if self.rejected:
            text += f", {len(self.rejected)} REJECTED"
        text += f" ({self.seconds:.1f} s)"
        for line in self.unreadable:
            text += f"\nunreadable annotation skipped (fix or delete it in Label Studio): {line}"
        return text


def state_path(ws: Workspace) -> Path:
    return ws.labelstudio_dir / "pull.json"


def read_state(ws: Workspace, url: str, project_id: int) -> dict:
    """The watermark state for this server and project (fresh if either changed)."""
    path = state_path(ws)
    fresh = {"url": url, "project_id": project_id, "watermark": None, "applied": {}}
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
    except ValueError:
        logger.warning("unreadable %s: pulling everything again (safe: labels are applied idempotently)", path)
        return fresh
    if state.get("url") != url or state.get("project_id") != project_id:
        return fresh
    state.setdefault("applied", {})
    return state


def unreadable_count(ws: Workspace) -> int:
    """How many annotations the pulls skipped as unreadable and nobody has fixed yet (for `sortloop status`)."""
    try:
        state = json.loads(state_path(ws).read_bytes())
    except (OSError, ValueError):
        return 0
    return len(state.get("unreadable") or []) if isinstance(state, dict) else 0


def write_state(ws: Workspace, state: dict) -> None:
    write_json_atomic(state_path(ws), state, perms=0o600)


def changed_tasks(client: Client, project_id: int, watermark: str | None, *, timeout_s: float = 600.0) -> list[dict]:
    """Tasks with any annotation (skips included) whose `updated_at` is after `watermark` (all if None).

    Tasks with a real annotation come through Label Studio's own bulk export: an export snapshot
    (`projects.exports.create/get/download/delete`), filtered on the server by a temporary Data Manager tab
    (`views.create`, `updated_at > watermark`) and "annotated only", annotators' e-mails expanded; measured
    about as fast as a plain JSON export and much faster than paging `tasks.list(fields="all")`. The rare
    skip-only tasks (not "annotated") come from one filtered `tasks.list` query. The tab and the snapshot
    are deleted afterwards. Returns tasks as Label Studio's JSON (dicts).
    """
    view = None
    if watermark:
        body = payloads.pull_view(project_id, watermark)
        view = client.call(f"create a pull tab in project {project_id}", client.views.create, idempotent=False,
                           rerun_hint=RERUN, project=body["project"], data=body["data"])
    try:
        tasks = _snapshot(client, project_id, int(view.id) if view else None, timeout_s)
    finally:
        if view:
            client.call(f"delete pull tab {view.id}", client.views.delete, str(view.id), missing_ok=True)
    by_id = {int(t["id"]): t for t in tasks if t.get("annotations")}
    query = json.dumps(payloads.skipped_only_query(watermark))
    for page in client.pages(f"list skipped tasks of project {project_id}", client.tasks.list, project=project_id,
                             page_size=1000, query=query, fields="all"):
        for t in page:
            by_id.setdefault(int(t.id), t.model_dump(mode="json"))
    return list(by_id.values())


def _snapshot(client: Client, project_id: int, view_id: int | None, timeout_s: float) -> list[dict]:
    where = f"project {project_id}"
    snap = client.call(f"create an export snapshot of {where}", client.projects.exports.create, project_id,
                       idempotent=False, rerun_hint=RERUN, **payloads.pull_snapshot(view_id))
    try:
        deadline = time.monotonic() + timeout_s
        status = snap.status
        while status not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise LabelStudioError(f"export snapshot {snap.id} on {client.url} did not finish in "
                                       f"{timeout_s:.0f} s")
            time.sleep(0.5)
            status = client.call(f"check export snapshot {snap.id} of {where}", client.projects.exports.get,
                                 project_id, snap.id).status
        if status == "failed":
            raise LabelStudioError(f"Label Studio at {client.url} failed to export {where}")
        # the download is a byte stream of Label Studio's export JSON, read whole (a retry re-reads it whole)
        raw = client.call(f"download export snapshot {snap.id} of {where}",
                          lambda: b"".join(client.projects.exports.download(project_id, snap.id, export_type="JSON")))
        return json.loads(raw)
    finally:
        client.call(f"delete export snapshot {snap.id} of {where}", client.projects.exports.delete, project_id,
                    snap.id, missing_ok=True)


def _iso(ts: pd.Timestamp) -> str:
    return ts.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _label_problem(d: payloads.Decision, allowed: set[str], allow_new: bool) -> str | None:
    """Why a reviewer's label cannot be applied, or None: every label must be a valid class name (even with
    `allow_new_classes`), and a known class unless new ones are allowed."""
    if d.kind != "label" or d.label == OTHER_LABEL:  # "None of these" is a label, never a class
        return None
    problem = class_name_problem(d.label)
    if problem is not None:
        return f"{d.label!r} cannot be a class name ({problem}); pick another label in Label Studio"
    twin = twin_problem(d.label, allowed)
    if twin is not None:
        return f"{d.label!r} cannot be a class name ({twin}); pick the existing class in Label Studio"
    if d.label not in allowed and not allow_new:
        return (f"{d.label!r} is not a known class ({', '.join(sorted(allowed))}); fix it in Label Studio or set "
                "labelstudio.allow_new_classes = true")
    return None


def _unreadable(url: str, project_id: int, tasks: list[dict], state: dict) -> list[str]:
    """One line per unreadable annotation (`payloads.annotation_problem`) not reported by an earlier pull,
    with its task link; each is remembered in the pull state, so it is reported once and never holds the
    watermark (the other decisions go on)."""
    seen: list = state.setdefault("unreadable", [])
    lines = []
    for t in tasks:
        bad = payloads.unreadable_annotations(t)
        if not bad:  # fixed or deleted in Label Studio since: no longer counted (`sortloop status`)
            seen[:] = [k for k in seen if not k.startswith(f"{t.get('id')}/")]
        for annotation_id, problem in bad:
            key = f"{t.get('id')}/{annotation_id}/{problem}"
            if key in seen:
                continue
            seen.append(key)
            line = f"{url}/projects/{project_id}/data?task={t.get('id')} (annotation {annotation_id}): {problem}"
            logger.warning("unreadable annotation skipped: %s", line)
            lines.append(line)
    return lines


def pull(ws: Workspace) -> PullReport:
    """Bring reviewers' decisions made since the last pull into the manifest and label history; returns what
    changed. The sorted folders follow in the application (`sortloop.jobs.pull_reviews`), not here.

    Phases: fetch the changed tasks, decide what each decision does, take back deleted reviews, write the
    manifest once, then move the watermark. The manifest is read once, and once more under its lock to write.
    Raises:
        LabelStudioError: the server is unreachable or refuses the token (nothing is written then).
        ManifestError: the manifest cannot be written (the watermark is not advanced).

    Example:
        >>> pull(open_workspace("data")).summary()   # doctest: +SKIP
        'pulled 3 changed task(s) from http://127.0.0.1:8080/projects/1: 2 label(s) set, 0 unchanged, 1 skipped'
    """
    start = time.monotonic()
    df = mf.load(ws)
    fetched = _fetch(ws, df)
    if fetched.project_id is None:
        return PullReport(fetched.url, None)
    if not fetched.tasks and not fetched.emptied:
        return PullReport(fetched.url, fetched.project_id, watermark=fetched.state["watermark"],
                          seconds=time.monotonic() - start)
    outcome = _decide(ws, df, fetched)
    taken_back = _take_back(ws, fetched, outcome)
    # "labeled" counts reviewed photos whose class changed; a review that confirms the class (even if it only
    # changes the label's source, e.g. folder -> review) counts as unchanged.
    current = df.set_index("image_id")["label"]
    labeled = sum(1 for c in outcome.changes
                  if pd.isna(current.get(c.image_id)) or current.get(c.image_id) != c.label)
    _write(ws, outcome.changes + taken_back, outcome.statuses)
    watermark = _advance_watermark(ws, fetched, outcome.hold_before)
    n_skipped = sum(1 for s, _ in outcome.statuses.values() if s == "skipped")
    report = PullReport(fetched.url, fetched.project_id, outcome.fresh, labeled, len(outcome.changes) - labeled,
                        n_skipped, outcome.unknown, outcome.rejected, watermark, time.monotonic() - start,
                        reverted=len(taken_back), unreadable=fetched.unreadable)
    logger.info(report.summary())
    return report


@dataclass
class _Fetched:
    """What Label Studio says changed since the watermark: one decision per image, and emptied tasks."""

    url: str
    project_id: int | None
    state: dict = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)
    emptied: list[dict] = field(default_factory=list)
    decisions: dict[str, payloads.Decision] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)  # `_unreadable`'s lines: reported once each


@dataclass
class _Outcome:
    """What the fetched decisions do to the manifest (`pull`'s second phase)."""

    changes: list[mf.LabelChange]
    statuses: dict[str, tuple[str, int]]  # image_id -> (review_status, task id)
    rejected: list[Rejected]
    unknown: int  # decisions about images not in this manifest
    hold_before: pd.Timestamp | None  # the watermark stays before the oldest task with a rejected label
    fresh: int  # decisions not handled by an earlier pull


def _fetch(ws: Workspace, df: pd.DataFrame) -> _Fetched:
    with connect(ws) as client:
        project = find_project(client, ws)
        if project is None:
            return _Fetched(client.url, None)
        pid = int(project.id)
        state = read_state(ws, client.url, pid)
        since = None
        if state["watermark"]:  # re-read a short overlap: a save committed late may carry an older time
            since = _iso(pd.Timestamp(state["watermark"]) - pd.Timedelta(seconds=OVERLAP_S))
        tasks = changed_tasks(client, pid, since)
        reviewed_tasks = df.loc[df["image_id"].isin(state["applied"].keys()), "review_task"].dropna()
        emptied = deleted.emptied_tasks(client, pid, since, [int(t) for t in reviewed_tasks])
        # One decision per image: the latest annotation over all its tasks (dedupe by annotation id).
        decisions: dict[str, payloads.Decision] = {}
        unreadable = _unreadable(client.url, pid, tasks, state)
        for t in tasks:
            d = payloads.decide(t)
            if d is None:
                continue
            if d.label is not None:  # one stored form per class name (NFC): `café` typed as NFD is `café`
                d = replace(d, label=normal_name(d.label))
            prev = decisions.get(d.image_id)
            if prev is None or (d.updated_at, d.annotation_id) > (prev.updated_at, prev.annotation_id):
                decisions[d.image_id] = d
        return _Fetched(client.url, pid, state, tasks, emptied, decisions, unreadable)


def _decide(ws: Workspace, df: pd.DataFrame, fetched: _Fetched) -> _Outcome:
    in_manifest = set(df["image_id"])
    allowed = set(known_classes(ws, df))
    allow_new = ws.settings.labelstudio.allow_new_classes
    applied: dict[str, list] = fetched.state["applied"]
    out = _Outcome([], {}, [], 0, None, 0)
    for d in fetched.decisions.values():
        key = [d.annotation_id, _iso(d.updated_at)]
        if applied.get(d.image_id) == key:
            continue  # this exact annotation was handled before: do not re-apply over later changes
        out.fresh += 1
        if d.image_id not in in_manifest:
            out.unknown += 1
            applied[d.image_id] = key
            continue
        reason = _label_problem(d, allowed, allow_new)
        if reason is not None:
            out.rejected.append(Rejected(d.image_id, d.task_id, str(d.label), reason))
            task_updated = min(pd.Timestamp(t["updated_at"]) for t in fetched.tasks if int(t["id"]) == d.task_id)
            out.hold_before = task_updated if out.hold_before is None else min(out.hold_before, task_updated)
            continue
        if d.kind == "label":
            out.changes.append(mf.LabelChange(d.image_id, str(d.label), REVIEW, d.reviewer,
                                              at=d.updated_at, note=f"label studio task {d.task_id}, annotation "
                                                                    f"{d.annotation_id}"))
        out.statuses[d.image_id] = ("reviewed" if d.kind == "label" else "skipped", d.task_id)
        applied[d.image_id] = key
    return out


def _take_back(ws: Workspace, fetched: _Fetched, outcome: _Outcome) -> list[mf.LabelChange]:
    """Decisions deleted in Label Studio since they were applied: their labels are taken back."""
    applied: dict[str, list] = fetched.state["applied"]
    taken_back, gone = deleted.reverts(ws, [t for t in fetched.emptied if t["image_id"] not in fetched.decisions],
                                       applied)
    for t in fetched.emptied:
        if t["image_id"] in gone:
            outcome.statuses[t["image_id"]] = ("pushed", t["id"])
            del applied[t["image_id"]]
    return taken_back


def _write(ws: Workspace, changes: list[mf.LabelChange], statuses: dict[str, tuple[str, int]]) -> None:
    """Labels, history and review statuses in one locked write of the manifest."""
    def with_statuses(frame: pd.DataFrame) -> pd.DataFrame:
        hit = frame["image_id"].isin(statuses.keys())
        frame.loc[hit, "review_status"] = frame.loc[hit, "image_id"].map(lambda i: statuses[i][0])
        frame.loc[hit, "review_task"] = frame.loc[hit, "image_id"].map(lambda i: statuses[i][1]).astype("Int64")
        return frame

    mf.set_labels(ws, changes, also=with_statuses if statuses else None)


def _advance_watermark(ws: Workspace, fetched: _Fetched, hold_before: pd.Timestamp | None) -> str:
    """Only now, with the manifest written, may the watermark move (never past a rejected task)."""
    state = fetched.state
    newest = max([pd.Timestamp(t["updated_at"]) for t in fetched.tasks] + [t["updated_at"] for t in fetched.emptied])
    if state["watermark"]:
        newest = max(newest, pd.Timestamp(state["watermark"]))  # the overlap may return only older tasks
    if hold_before is not None:
        newest = min(newest, hold_before - pd.Timedelta(microseconds=1))
    state["watermark"] = _iso(newest)
    write_state(ws, state)
    return state["watermark"]
