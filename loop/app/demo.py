"""The whole loop once, on the embedded default: what `make demo` (`sortloop demo`) runs.

ingest a labeled folder → train → deploy (gated) → sort a new folder → start the local Label Studio →
push the flagged photos for review. Each step is the same library call the CLI and the scheduler use.
Application layer: it composes the core and the Label Studio adapter with plain imports. Caveat: the first
start of the embedded Label Studio migrates its database (about a minute on 2 cores).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labeling import push, server
from loop.ingest import ingest_folder
from loop.progress import ProgressCallback, no_progress
from loop.workspace import Workspace, init_workspace

logger = logging.getLogger(__name__)


@dataclass
class LoopOnceReport:
    """Outcome of each step, in order, plus where to review."""

    workspace: Path
    steps: list[tuple[str, str]] = field(default_factory=list)
    review_url: str = ""
    username: str = ""
    password: str = ""  # only when the server was started for the first time (shown once)
    sort_ok: bool = True


def run_loop_once(
    labeled: Path | str,
    new: Path | str,
    dest: Path | str,
    *,
    workspace: Path | str | None = None,
    items_csv: Path | str | None = None,
    source: str = "user",
    with_review: bool = True,
    on_step: Callable[[str, str], None] = lambda step, result: None,
    on_progress: ProgressCallback = no_progress,
) -> LoopOnceReport:
    """Run every stage of the loop once; returns what each step did.

    Args:
        labeled: a folder of class folders (`labeled/<class>/...`) to learn from.
        new: a folder of unsorted photos to sort into `dest`.
        with_review: also start the embedded Label Studio and push the flagged photos.
        on_step: called with (step name, one-line result) after each step.
    """
    ws: Workspace = init_workspace(workspace)
    report = LoopOnceReport(workspace=ws.root)

    def step(name: str, result: str) -> None:
        report.steps.append((name, result))
        logger.info("%s: %s", name, result)
        on_step(name, result)

    step("ingest", ingest_folder(ws, labeled, source=source, labeled=True, items_csv=items_csv,
                                 on_progress=on_progress).summary())

    from loop.gate import deploy
    from loop.train import train

    trained = train(ws, on_progress=on_progress)
    step("train", f"candidate {trained.version} ({trained.mode}): {_accuracy_line(trained.metrics)}")
    decision = deploy(ws, trained.version)
    step("deploy", f"{'promoted' if decision.promoted else 'kept the current model'}: {'; '.join(decision.reasons)}")

    from loop.sort import sort_folder

    sorted_report = sort_folder(ws, new, dest, on_progress=on_progress)
    report.sort_ok = sorted_report.ok
    step("sort", sorted_report.summary())

    if with_review:
        info = server.up(ws)
        report.review_url = info.url
        if info.credentials is not None:
            report.username = info.credentials.username
            if info.first_start:
                report.password = info.credentials.password
        step("labelstudio", f"running at {info.url}")
        step("push", push.push(ws).summary())
    return report


def _accuracy_line(metrics: dict[str, Any]) -> str:
    user = metrics.get("user_valid") or {}
    web = metrics.get("web_valid") or {}
    parts = []
    if user.get("n"):
        parts.append(f"user-photo validation accuracy {user['accuracy']:.3f} on {user['n']} photos")
    if web.get("n"):
        parts.append(f"web validation accuracy {web['accuracy']:.3f} on {web['n']}")
    return ", ".join(parts) or "no validation photos yet"
