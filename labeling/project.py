"""One Label Studio project per workspace: found or created idempotently, label config from the class list,
and a local-files storage per image root so photos are served in place (never uploaded or copied).

The project is found by the id remembered in `<workspace>/labelstudio/project.json` (if it still exists on
that server with the configured title), else by its exact title, else created; all through the SDK's typed
project and local-storage calls (`labeling.client`).
Caveat: the label config only ever *grows*: a class that disappears from the model and the manifest stays
in the config, because removing a choice would orphan annotations that use it. The storages are never
synced (a sync would import every file of the folder as a task); they exist only to grant file access.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from labeling import payloads
from labeling.client import Client
from loop.atomic import write_json_atomic
from loop.errors import LabelStudioError, ModelError
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

MAX_ROOTS = 64


@dataclass(frozen=True)
class ProjectInfo:
    """The workspace's project on one server."""

    id: int
    title: str
    classes: list[str]
    created: bool = False
    storages_added: list[str] = field(default_factory=list)


def state_path(ws: Workspace) -> Path:
    return ws.labelstudio_dir / "project.json"


def known_classes(ws: Workspace, manifest: pd.DataFrame | None = None) -> list[str]:
    """Classes a reviewer may pick: the deployed model's (in its order), then manifest labels (sorted)."""
    from loop import manifest as mf
    from loop.registry import current_model_dir

    classes: list[str] = []
    try:
        spec = json.loads((current_model_dir(ws) / "model.json").read_text())
        classes = [str(c) for c in spec.get("classes", [])]
    except ModelError:
        pass  # no model deployed yet: the manifest's labels are the classes
    df = mf.load(ws) if manifest is None else manifest
    extra = sorted({str(v) for v in df["label"].dropna().unique()} - set(classes))
    return classes + extra


def image_roots(paths: list[str], *, max_roots: int = MAX_ROOTS) -> list[str]:
    """The fewest folders that contain every path's folder: each image's folder, minus nested ones.

    If that leaves more than `max_roots` folders, they are replaced by their parents until it does not
    (so a photo library organised by day does not become thousands of storages).
    """
    dirs = {str(PurePosixPath(p).parent) for p in paths}
    while True:
        roots = sorted(d for d in dirs if not any(_is_under(d, other) for other in dirs if other != d))
        if len(roots) <= max_roots:
            return roots
        dirs = {str(PurePosixPath(d).parent) if PurePosixPath(d).parent != PurePosixPath("/") else d for d in roots}


def _is_under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def _read_state(ws: Workspace) -> dict:
    path = state_path(ws)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        logger.warning("ignoring unreadable %s", path)
        return {}


def _write_state(ws: Workspace, state: dict) -> None:
    write_json_atomic(state_path(ws), state, indent=1)


def remembered_project(ws: Workspace, url: str) -> int | None:
    """The project id last used for this workspace on `url`, if any."""
    state = _read_state(ws)
    return int(state["project_id"]) if state.get("url") == url and state.get("project_id") else None


def find_project(client: Client, ws: Workspace) -> Any | None:
    """The workspace's project on this server (by remembered id, then exact title) as the SDK's model, or None."""
    title = ws.settings.labelstudio.project_title
    remembered = remembered_project(ws, client.url)
    if remembered is not None:
        project = client.call(f"get project {remembered}", client.projects.get, remembered, missing_ok=True)
        if project is not None and project.title == title:
            return project
    matches = sorted(int(p.id) for p in _list_projects(client, title) if p.title == title)
    if len(matches) > 1:
        logger.warning("%d projects titled %r; using the oldest (id %s)", len(matches), title, matches[0])
    return client.call(f"get project {matches[0]}", client.projects.get, matches[0]) if matches else None


def _list_projects(client: Client, title: str) -> list[Any]:
    found: list[Any] = []
    for page in client.pages(f"list projects titled {title!r}", client.projects.list, title=title, page_size=1000):
        found += page
    return found


def ensure_project(
    client: Client, ws: Workspace, *, classes: list[str] | None = None, image_paths: list[str] | None = None
) -> ProjectInfo:
    """Find or create the project, make its config cover `classes`, and storages cover `image_paths`.

    Args:
        classes: classes to offer (default: `known_classes(ws)`); new ones are appended to the config.
        image_paths: absolute image paths that must be servable (default: every path in the manifest).

    Raises:
        LabelStudioError: no classes are known yet, or the server refused the project or a storage.
    """
    from loop import manifest as mf

    title = ws.settings.labelstudio.project_title
    df = mf.load(ws) if classes is None or image_paths is None else None
    classes = known_classes(ws, df) if classes is None else classes
    image_paths = [str(p) for p in df["path"].dropna()] if image_paths is None else image_paths

    project, created = find_project(client, ws), False
    if project is None:
        if not classes:
            raise LabelStudioError("no classes known yet: ingest labeled photos (`sortloop ingest --labeled`) "
                                   "or deploy a model before pushing to Label Studio")
        project = client.call(f"create project {title!r}", client.projects.create, idempotent=False, title=title,
                              label_config=payloads.label_config(classes), show_skip_button=True,
                              show_collab_predictions=True, expert_instruction=payloads.INSTRUCTIONS,
                              show_instruction=True)
        created = True
        tab = payloads.review_tab(int(project.id))
        client.call(f"create the review tab of project {project.id}", client.views.create, idempotent=False,
                    project=tab["project"], data=tab["data"])
        logger.info("created Label Studio project %s (%r) with %d classes", project.id, title, len(classes))
    pid = int(project.id)

    current = payloads.config_classes(project.label_config)
    wanted = current + [c for c in classes if c not in current]
    if wanted != current:
        client.call(f"update the label config of project {pid}", client.projects.update, pid,
                    label_config=payloads.label_config(wanted))
        logger.info("project %s: added classes %s to the label config", pid, wanted[len(current):])

    added = _ensure_storages(client, pid, image_roots(image_paths))
    _write_state(ws, {"url": client.url, "project_id": pid, "title": title})
    return ProjectInfo(pid, title, wanted, created, added)


def _ensure_storages(client: Client, pid: int, roots: list[str]) -> list[str]:
    existing = [s.path for s in client.call(f"list local-files storages of project {pid}",
                                            client.import_storage.local.list, project=pid) if s.path]
    added = []
    for root in roots:
        if any(_is_under(root, path) for path in existing):
            continue
        if not Path(root).is_dir():
            logger.warning("image folder %s no longer exists; its photos cannot be shown in Label Studio", root)
            continue
        client.call(f"add a local-files storage for {root} to project {pid}", client.import_storage.local.create,
                    idempotent=False, project=pid, path=root, title=f"sortloop {root}"[:250], use_blob_urls=False,
                    recursive_scan=False)
        existing.append(root)
        added.append(root)
    if added:
        logger.info("project %s: %d local-files storage(s) added", pid, len(added))
    return added
