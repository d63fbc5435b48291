"""Annotations deleted in Label Studio after a pull: the label they set is taken back.

Rule: when every annotation of a task is deleted after sortloop applied one of them, the image's label
reverts to what it was before the review(s) of that task (unlabeled, or e.g. its folder label), and the
change goes to the label history with `by = "labelstudio-delete"`; the task stays in the project, so
the image is `pushed` again (not re-imported) and a new annotation is pulled as usual. A task that still
has other annotations needs nothing here: the export brings it back and its latest remaining annotation
wins. Deleting an annotation bumps the task's `updated_at` (measured on 1.23.2), so the emptied tasks
are found by one Data Manager query per pull: `updated_at` after the watermark, no annotation at all, and
a task id within the range of the reviewed tasks (so a fresh push of unannotated tasks is not listed).
Caveat: a label changed since by someone else (a user move, another pull) is left alone: only the label
that the deleted annotation set is taken back.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from labeling import payloads
from labeling.client import Client
from loop.data import manifest as mf
from loop.data.label_sources import REVIEW

logger = logging.getLogger(__name__)

BY = "labelstudio-delete"


def emptied_tasks(client: Client, project_id: int, updated_after: str | None, task_ids: list[int]) -> list[dict]:
    """Tasks among `task_ids`' range changed after `updated_after` that have no annotation left (nor a skip):
    [{id, image_id, updated_at}]. Unreviewed tasks in the range match too; only applied decisions matter.
    """
    if not task_ids:
        return []
    query = json.dumps(payloads.unannotated_query(updated_after, (min(task_ids), max(task_ids))))
    found = []
    for page in client.pages(f"list emptied tasks of project {project_id}", client.tasks.list, project=project_id,
                             page_size=1000, query=query, fields="task_only", include="id,data,updated_at"):
        for t in page:
            image_id = payloads.task_image_id({"data": t.data, "meta": t.meta})
            if image_id:
                found.append({"id": int(t.id), "image_id": image_id, "updated_at": pd.Timestamp(t.updated_at)})
    return found


def reverts(ws, emptied: list[dict], applied: dict[str, list]) -> tuple[list[mf.LabelChange], list[str]]:
    """Label changes that take back deleted reviews, and the image ids whose applied decision is gone.

    Args:
        emptied: from `emptied_tasks`.
        applied: the pull state's image_id -> [annotation id, updated_at] of the decision last applied.
    """
    gone = [t for t in emptied if t["image_id"] in applied]
    if not gone:
        return [], []
    history = mf.history(ws)
    changes = []
    for t in gone:
        annotation_id = applied[t["image_id"]][0]
        rows = history[history["image_id"] == t["image_id"]]
        if rows.empty or not _set_by(rows.iloc[-1], annotation_id):
            continue  # a skip, or the label changed since (a user move...): nothing of that review to take back
        label, source = _before_reviews(rows)
        changes.append(mf.LabelChange(t["image_id"], label, source, BY, note=f"annotation {annotation_id} of "
                                      f"label studio task {t['id']} deleted"))
        logger.info("annotation %s of task %s was deleted in Label Studio: %s reverts to %s", annotation_id,
                    t["id"], t["image_id"][:12], label)
    return changes, [t["image_id"] for t in gone]


def _set_by(row: pd.Series, annotation_id: int) -> bool:
    return row["source"] == REVIEW and str(row["note"]).endswith(f"annotation {annotation_id}")


def _before_reviews(rows: pd.DataFrame) -> tuple[str | None, str | None]:
    """(label, source) before the trailing run of review changes of one image's history."""
    label = source = None
    for _, row in rows.iloc[::-1].iterrows():
        if row["source"] != REVIEW:
            break
        label, source = row["old_label"], row["old_source"]
    return (None if pd.isna(label) else str(label)), (None if pd.isna(source) else str(source))
