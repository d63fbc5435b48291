"""One Label Studio project per workspace: found or created idempotently, label config from the class list,
and ONE local-files storage, on the served photos (`labeling.served`): nothing else is servable.

The project is found by the id remembered in `<workspace>/labelstudio/project.json` (if it still exists on
that server with the configured title), else by its exact title, else created; all through the SDK's typed
project and local-storage calls (`labeling.client`).
Caveat: the label config only ever *grows*: a class that disappears from the model and the manifest stays
in the config, because removing a choice would orphan annotations that use it. The storage is never
synced (a sync would import every file of the folder as a task); it exists only to grant file access.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from labeling import payloads, served
from labeling.client import Client
from loop.atomic import write_json_atomic
from loop.data.classnames import OTHER_LABEL
from loop.errors import LabelStudioError, ModelError
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

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
    """Classes a reviewer may pick: the deployed model's (in its order), the declared ones, then other manifest
    labels (sorted)."""
    from loop.data import manifest as mf
    from loop.learning.registry import current_model_dir
    from loop.model.artifact import read_spec

    classes: list[str] = []
    try:
        spec = read_spec(current_model_dir(ws))
        classes = [str(c) for c in spec.get("classes", [])]
    except ModelError:
        pass  # no model deployed yet: the declared classes and the manifest's labels are the classes
    classes += [c for c in ws.settings.classes if c not in classes]  # declared: `sortloop init --classes`
    df = mf.load(ws) if manifest is None else manifest
    extra = sorted({str(v) for v in df["label"].dropna().unique()} - set(classes) - {OTHER_LABEL})
    return classes + extra


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
    write_json_atomic(state_path(ws), state, indent=1, perms=0o600)


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


def ensure_project(client: Client, ws: Workspace, *, classes: list[str] | None = None) -> ProjectInfo:
    """Find or create the project, make its config cover `classes`, and its one storage the served photos.

    Args:
        classes: classes to offer (default: `known_classes(ws)`); new ones are appended to the config.

    Raises:
        LabelStudioError: no classes are known yet, or the server refused the project or the storage.
        ConfigError: `labelstudio.served_dir` could expose more than the pushed photos.
    """
    title = ws.settings.labelstudio.project_title
    classes = known_classes(ws) if classes is None else classes

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
    wanted = current + [c for c in classes if c not in current and c != OTHER_LABEL]
    if wanted != current or not payloads.has_other_choice(project.label_config):
        client.call(f"update the label config of project {pid}", client.projects.update, pid,
                    label_config=payloads.label_config(wanted))
        logger.info("project %s: added classes %s to the label config", pid, wanted[len(current):])

    added = _ensure_storage(client, pid, str(served.prepare(ws)))  # the server checks that the folder exists
    state = _read_state(ws)
    if not created and not (state.get("url") == client.url and state.get("project_id") == pid and state.get("served")):
        _point_tasks_at_served(client, ws, pid)
    _write_state(ws, {"url": client.url, "project_id": pid, "title": title, "served": True})
    return ProjectInfo(pid, title, wanted, created, added)


def _point_tasks_at_served(client: Client, ws: Workspace, pid: int) -> int:
    """Once per project: tasks pushed by versions that served photos in place (`?d=<absolute path>`) get their
    photo published and their image URL pointed at it, so they still show after the upgrade; returns how many."""
    from loop.data import manifest as mf

    paths = mf.load(ws).dropna(subset=["path"]).set_index("image_id")["path"]
    prefix = payloads.image_url("")
    stale: dict[int, tuple[str, dict]] = {}
    for page in client.pages(f"list the tasks of project {pid}", client.tasks.list, project=pid, page_size=1000,
                             fields="task_only", include="id,data"):
        for t in page:
            image_id = payloads.task_image_id({"data": t.data, "meta": None})
            if image_id in paths.index and not str((t.data or {}).get(payloads.TO_NAME, "")).startswith(prefix):
                stale[int(t.id)] = (image_id, dict(t.data))
    names, _ = served.publish(ws, {image_id: str(paths[image_id]) for image_id, _ in stale.values()})
    moved = 0
    for tid, (image_id, data) in stale.items():
        if image_id in names:  # a refused photo (symlink out, gone...) keeps its old, now unserved, URL
            client.call(f"point task {tid} at its served photo", client.tasks.update, str(tid),
                        data={**data, payloads.TO_NAME: payloads.image_url(names[image_id])})
            moved += 1
    if moved:
        logger.info("project %s: %d task(s) from an earlier version now show their served photo", pid, moved)
    return moved


def _ensure_storage(client: Client, pid: int, root: str) -> list[str]:
    """One local-files storage on `root` (the served photos); any other storage of the project is removed.

    Other storages are what earlier versions made (one per photo folder, or a common ancestor such as the
    home folder): each lets the server show every file under it, so none may stay.
    """
    existing = client.call(f"list local-files storages of project {pid}", client.import_storage.local.list,
                           project=pid)
    for storage in existing:
        if storage.path != root:
            client.call(f"remove local-files storage {storage.id} ({storage.path}) of project {pid}",
                        client.import_storage.local.delete, storage.id, missing_ok=True)
            logger.warning("project %s: removed local-files storage %s (%s): only %s is served now", pid,
                           storage.id, storage.path, root)
    if any(storage.path == root for storage in existing):
        return []
    client.call(f"add a local-files storage for {root} to project {pid}", client.import_storage.local.create,
                idempotent=False, project=pid, path=root, title="sortloop served photos",
                use_blob_urls=False, recursive_scan=False)
    logger.info("project %s: local-files storage added on %s", pid, root)
    return [root]
