"""The whole loop once, on the embedded default: what `make demo` (`sortloop demo`) runs, and what it shows.

ingest the labeled folder → train → deploy (gated) → sort the new photos → register the sorted tree for
`scan` → start the local Label Studio → push the flagged photos for review. Each step is the same library
call the CLI and the scheduler use. The default (`make demo`) learns from ikea_products' studio shots and
sorts `rooms` as "your new photos": web photos in rooms, unlike anything labeled, as a shop's own photos are.

When the new photos sit in class folders (`new/<class>/...`, as the shared data sets do) their folder names
are the demo's **answer key**: kept in `runs/demo.json` for `--simulate-review` and for measuring how many
sorted copies land in the right folder, never used as labels; the photos are sorted from a flat folder of
links so the answer is not in their sorted path. With `--new` equal to `--labeled`, `--holdout` of each
class's items (whole item groups, stable across runs) are held out of training and sorted as the new
photos instead. A rerun with nothing new trains nothing (the newest version's labels fingerprint, as the
nightly retrain checks it) and copies nothing.
Caveat: the first start of the embedded Label Studio migrates its database (about a minute on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from labeling import push, server
from loop.atomic import write_json_atomic
from loop.data import manifest as mf
from loop.data.images import file_sha256, iter_image_files
from loop.data.ingest import ingest_folder
from loop.data.label_sources import FOLDER
from loop.errors import SortloopError
from loop.progress import ProgressCallback, no_progress
from loop.workspace import Workspace, init_workspace
from sortloop.jobs import new_labels_since_last_train

logger = logging.getLogger(__name__)

DEMO_STATE = "demo.json"
NEW_PHOTOS = "demo/new-photos"  # inside the workspace: links to the held-out photos, sorted as an inbox

StepProgress = Callable[[str], AbstractContextManager[ProgressCallback]]


def _no_step_progress(name: str) -> AbstractContextManager[ProgressCallback]:
    return nullcontext(no_progress)


@dataclass
class LoopOnceReport:
    """Outcome of each step, in order, plus what was held out and where to review."""

    workspace: Path
    dest: Path | None = None
    steps: list[tuple[str, str]] = field(default_factory=list)
    held_out: int = 0  # photos held out of training and sorted as new
    trained: str | None = None  # the version trained by this run (None: nothing new to train)
    deployed: str | None = None  # the model deployed after this run
    review_url: str = ""
    username: str = ""
    password: str = ""  # only when the server was started for the first time (shown once)
    sort_ok: bool = True


def state_path(ws: Workspace) -> Path:
    return ws.runs_dir / DEMO_STATE


def hold_out(truth: pd.DataFrame, fraction: float) -> set[str]:
    """Image ids of the held-out items: about `fraction` of each class's items, at least one item per class
    that has two or more, never all of a class's items. Stable: items are ranked by a hash of their id.

    Args:
        truth: rows with columns image_id, item_id, label (the class from the folder name).
    """
    if fraction <= 0 or truth.empty:
        return set()
    item_class = truth.groupby("item_id")["label"].agg(lambda s: s.value_counts().index[0])
    chosen: set[str] = set()
    for _, items in item_class.groupby(item_class):
        ranked = sorted(items.index, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
        n = min(len(ranked) - 1, max(1, round(fraction * len(ranked))))
        chosen.update(ranked[:n])
    return set(truth.loc[truth["item_id"].isin(chosen), "image_id"])


def prepare(ws: Workspace, labeled: Path, *, holdout: float, items_csv: Path | str | None,
            on_progress: ProgressCallback) -> tuple[str, dict[str, str]]:
    """Ingest the labeled folder; label the photos to learn from, keep the held-out ones unlabeled.

    Returns (one-line summary, {held-out image_id: true class}).
    """

    root = Path(labeled).expanduser().resolve()
    report = ingest_folder(ws, root, source="user", labeled=False, items_csv=items_csv, on_progress=on_progress)
    df = mf.load(ws)
    inside = df["path"].map(lambda p: _class_under(root, str(p)))
    truth = df.assign(truth=inside).dropna(subset=["truth"])[["image_id", "item_id", "truth", "label"]]
    if truth.empty:
        raise SortloopError(f"no photos in class folders under {root} (expected {root}/<class>/<photo>)")
    held = hold_out(truth.rename(columns={"label": "_", "truth": "label"}), holdout)
    learn = truth[~truth["image_id"].isin(held) & truth["label"].isna()]  # never overwrite a later label
    mf.set_labels(ws, [mf.LabelChange(r.image_id, r.truth, FOLDER, "demo", note=f"class folder under {root}")
                       for r in learn.itertuples()])
    held_out = {i: c for i, c in zip(truth["image_id"], truth["truth"], strict=True) if i in held}
    write_state(ws, {"labeled": str(root)})
    items_held = truth.loc[truth["image_id"].isin(held), "item_id"].nunique()
    held_text = f", holding out {len(held)} photos ({items_held} items) as new photos" if held else ""
    return f"{report.summary()}; learning from {len(truth) - len(held)} photos{held_text}", held_out


def answer_key(src: Path, classes: set[str]) -> dict[Path, str]:
    """Photos under `src/<class>/...` whose first folder names a labeled class -> that class (the demo's answer
    key; photos elsewhere in `src` are sorted too, without an answer)."""
    answers = {}
    for path in iter_image_files(src):
        rel = path.relative_to(src)
        if len(rel.parts) > 1 and rel.parts[0] in classes:
            answers[path] = rel.parts[0]
    return answers


def write_state(ws: Workspace, state: dict[str, Any]) -> None:
    """Update `runs/demo.json` (labeled folder, held-out photos and their classes, sorted tree)."""
    path = state_path(ws)
    old = json.loads(path.read_text()) if path.exists() else {}
    write_json_atomic(path, {**old, **state}, indent=1)


def _class_under(root: Path, path: str) -> str | None:
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 else None


def stage_new_photos(ws: Workspace, photos: list[Path]) -> Path:
    """A flat folder of links (or copies) to `photos`, so their class folder is not in the sorted path."""
    folder = ws.root / NEW_PHOTOS
    folder.mkdir(parents=True, exist_ok=True)
    for src in photos:
        target = folder / f"{src.stem}-{file_sha256(src)[:8]}{src.suffix}"
        if target.exists() or not src.exists():
            continue
        try:
            os.link(src, target)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, target)
    return folder


def run_loop_once(
    labeled: Path | str,
    new: Path | str,
    dest: Path | str,
    *,
    workspace: Path | str | None = None,
    items_csv: Path | str | None = None,
    holdout: float = 0.3,
    with_review: bool = True,
    on_step: Callable[[str, str], None] = lambda step, result: None,
    step_progress: StepProgress = _no_step_progress,
) -> LoopOnceReport:
    """Run every stage of the loop once; returns what each step did.

    Args:
        labeled: a folder of class folders (`labeled/<class>/...`) to learn from.
        new: a folder of unsorted photos to sort into `dest`; the same folder as `labeled` means "sort the
            held-out photos".
        holdout: share of each class's items kept out of training and sorted as new photos.
        with_review: also start the embedded Label Studio and push the flagged photos.
        on_step: called with (step name, one-line result) after each step, and before a slow start.
        step_progress: gives each step its own progress callback (a progress bar per step in the CLI).
    """
    ws: Workspace = init_workspace(workspace)
    report = LoopOnceReport(workspace=ws.root, dest=Path(dest).expanduser().resolve())
    labeled_root, src = Path(labeled).expanduser().resolve(), Path(new).expanduser().resolve()
    same = src == labeled_root

    def step(name: str, result: str) -> None:
        report.steps.append((name, result))
        logger.info("%s: %s", name, result)
        on_step(name, result)

    with step_progress("ingest") as on_progress:
        summary, held_out = prepare(ws, labeled_root, holdout=holdout if same else 0.0, items_csv=items_csv,
                                    on_progress=on_progress)
    report.held_out = len(held_out)
    step("ingest", summary)

    from loop.learning import registry
    from loop.learning.deployment import deploy
    from loop.learning.train import train

    changed, why = new_labels_since_last_train(ws)
    if changed:
        with step_progress("train") as on_progress:
            trained = train(ws, on_progress=on_progress)
        report.trained = trained.version
        step("train", f"candidate {trained.version} ({trained.mode}): {accuracy_line(trained.metrics)}")
    else:
        step("train", f"nothing new to train: {why}")
    newest = registry.list_versions(ws)[-1]
    judged = [e for e in registry.read_log(ws) if e.get("version") == newest and e.get("event") == "refused"]
    if registry.current_version(ws) != newest and judged and not report.trained:
        step("deploy", f"kept {registry.current_version(ws)}: the gate refused {newest} before: "
                       + "; ".join(judged[-1].get("reasons") or []))
    elif registry.current_version(ws) != newest:
        with step_progress("deploy") as on_progress:
            decision = deploy(ws, newest, on_progress=on_progress)
        step("deploy", f"{'promoted' if decision.promoted else 'kept the current model'} {newest}: "
                       + "; ".join(decision.reasons))
    else:
        step("deploy", f"{newest} is already deployed")
    report.deployed = registry.current_version(ws)

    from loop.folders.watchlist import add_sorted_tree
    from loop.sorting.folder import sort_folder

    if same:
        paths = mf.load(ws).set_index("image_id")["path"]
        answers = dict(held_out)
        src = stage_new_photos(ws, [Path(str(paths[i])) for i in held_out])
    else:
        classes = set(mf.load(ws)["label"].dropna().astype(str))
        by_path = answer_key(src, classes)
        answers = {file_sha256(p): c for p, c in by_path.items()}
        if answers:  # sorted from a flat folder of links: the answer is not in the sorted path
            src = stage_new_photos(ws, list(iter_image_files(src)))
    write_state(ws, {"answers": answers})
    with step_progress("sort") as on_progress:
        sorted_report = sort_folder(ws, src, report.dest, on_progress=on_progress)
    report.sort_ok = sorted_report.ok
    step("sort", sorted_report.summary())
    write_state(ws, {"dest": str(report.dest)})
    added = add_sorted_tree(ws, report.dest)
    step("scan", f"{'registered' if added else 'already registered'} {report.dest} for `serve` to scan for moves")

    if with_review:
        if not server.status(ws).running:
            first = not (server.data_dir(ws) / "label_studio.sqlite3").exists()
            on_step("labelstudio", "starting; the first start migrates its database, about a minute" if first
                    else "starting (a few seconds)")
        info = server.up(ws)
        report.review_url = info.url
        if info.credentials is not None:
            report.username = info.credentials.username
            if info.first_start:
                report.password = info.credentials.password
        step("labelstudio", f"running at {info.url}")
        with step_progress("push") as on_progress:
            step("push", push.push(ws, on_progress=on_progress).summary())
    return report


def accuracy_line(metrics: dict[str, Any]) -> str:
    """`user-photo validation accuracy 0.647 on 170 photos` (and web, when there are web photos)."""
    user = metrics.get("user_valid") or {}
    web = metrics.get("web_valid") or {}
    parts = []
    if user.get("n"):
        parts.append(f"user-photo validation accuracy {user['accuracy']:.3f} on {user['n']} photos")
    if web.get("n"):
        parts.append(f"web validation accuracy {web['accuracy']:.3f} on {web['n']}")
    return ", ".join(parts) or "no validation photos yet"
