"""A start for an archive where nothing is sorted yet: what `sortloop start FOLDER` runs.

The categories are declared first (`sortloop init --classes table,console,...`). `start` adds every photo
of FOLDER to the manifest unlabeled, picks about `per_class` photos per category with TypiClust (the most
typical photo of each of the largest clusters of similar photos: a head trained on no label has no useful
uncertainty, so the first batch should cover the archive), starts the embedded Label Studio (unless a team
server is configured) and pushes that batch. After a reviewer labels them: `review pull`, `train`,
`deploy`, then `sort`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labeling import push, server
from loop.data.ingest import ingest_folder
from loop.errors import ConfigError
from loop.progress import ProgressCallback
from loop.review.queue import choose
from loop.workspace import Workspace

PER_CLASS = 8  # photos per category in the first batch: 5-10 labels each are enough for a first model
COLD_START_STRATEGY = "typiclust"


@dataclass
class StartReport:
    """What `start` did, step by step, and where the reviewer goes next."""

    classes: list[str]
    ingested: str = ""
    selected: int = 0
    review_url: str = ""
    pushed: str = ""
    username: str | None = None
    password: str | None = None  # only on the embedded server's first start (shown once)

    def lines(self) -> list[str]:
        out = [f"categories: {', '.join(self.classes)}", f"ingest: {self.ingested}",
               f"selected {self.selected} photos to label first (the most typical of each group of similar "
               "photos)", f"push: {self.pushed}"]
        login = ""
        if self.username:
            login = f" (login {self.username}" + (f", password {self.password}, shown once" if self.password else "")
            login += ")"
        out.append(f"Label them in your browser: {self.review_url}{login}")
        return out


def start_archive(ws: Workspace, folder: Path | str, *, per_class: int = PER_CLASS,
                  on_step: Callable[[str, str], None] = lambda step, text: None,
                  on_progress: ProgressCallback | None = None) -> StartReport:
    """Ingest `folder` unlabeled, queue about `per_class` photos per declared category, and push them.

    Raises:
        ConfigError: fewer than 2 categories declared (`sortloop init --classes ...`).
        LabelStudioError: the review server cannot be started or reached.
    """
    classes = list(ws.settings.classes)
    if len(classes) < 2:
        raise ConfigError("declare your categories first, e.g. `sortloop init --classes table,console,cabinet` "
                          f"(now: {', '.join(classes) or 'none'})")
    report = StartReport(classes)
    ingested = ingest_folder(ws, folder, source="user", labeled=False, on_progress=on_progress or (lambda d, t: None))
    report.ingested = ingested.summary()
    on_step("ingest", report.ingested)
    selection = choose(ws, per_class * len(classes), COLD_START_STRATEGY, on_progress=on_progress)
    report.selected = len(selection.image_ids)
    on_step("select", selection.summary())
    if not ws.settings.labelstudio.url:
        if not server.status(ws).running:
            on_step("labelstudio", "starting (the first start takes about a minute)")
        info = server.up(ws)
        report.review_url = info.url
        if info.credentials is not None:
            report.username = info.credentials.username
            report.password = info.credentials.password if info.first_start else None
    else:
        report.review_url = ws.settings.labelstudio.url
    pushed = push.push(ws, select=False, limit=report.selected)
    report.pushed = pushed.summary()
    report.review_url = pushed.url if not report.review_url else report.review_url
    on_step("push", report.pushed)
    return report
