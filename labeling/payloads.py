"""Every Label Studio payload sortloop sends or reads, in Label Studio's own JSON shape, in one place.

Tasks carry the image's content hash (`image_id`, sha256) in `data` and `meta`: that is the permanent key.
Label Studio task ids are only hints (SQLite reuses a deleted maximum id).
Caveat: images are referenced by `/data/local-files/?d=<path relative to />`, which only works on a server
whose `LOCAL_FILES_DOCUMENT_ROOT` is `/` and whose project has a local-files storage covering the folder
(see `labeling.server` and `labeling.project`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import pandas as pd

FROM_NAME = "label"  # the Choices control
TO_NAME = "image"  # the Image object; task data key holding the image URL is also "image"
HOTKEYS = "1234567890" + "qwertyuiopasdfgzxcvbnm"  # h, j, k, l avoided: the editor uses some of them


def label_config(classes: list[str]) -> str:
    """A single-choice image classification config, one `<Choice>` per class with a hotkey.

    Args:
        classes: class names in display order (non-empty, unique).
    """
    choices = []
    for i, name in enumerate(classes):
        hotkey = f" hotkey={quoteattr(HOTKEYS[i])}" if i < len(HOTKEYS) else ""
        choices.append(f"    <Choice value={quoteattr(name)}{hotkey}/>")
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" required="true" showInline="true">\n'
        + "\n".join(choices)
        + "\n  </Choices>\n</View>"
    )


def config_classes(config_xml: str) -> list[str]:
    """The class names in a label config made by `label_config` (or edited by hand), in order."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(config_xml)
    for choices in root.iter("Choices"):
        if choices.get("name") == FROM_NAME:
            return [c.get("value") or c.get("alias") or "" for c in choices.iter("Choice")]
    return []


def image_url(path: str) -> str:
    """The local-files URL Label Studio serves `path` (absolute) under, with document root `/`."""
    # an absolute path with no "//", "/." or trailing "/" (any resolved path) is what PurePosixPath would make
    # of it: skipping that parse halves the cost of building a task
    normal = path.startswith("/") and "//" not in path and "/." not in path and not path.endswith("/")
    rel = (path if normal else str(PurePosixPath(path))).lstrip("/")
    return "/data/local-files/?d=" + quote(rel)


def choice_result(label: str) -> list[dict]:
    """The `result` of an annotation or prediction that picks `label`."""
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}]


def prediction(label: str, score: float | None, model_version: str | None) -> dict:
    """A pre-filled guess; `score` is the model's confidence in `label` (0..1)."""
    pred: dict = {"model_version": model_version or "unknown", "result": choice_result(label)}
    if score is not None and not pd.isna(score):
        pred["score"] = float(score)
    return pred


def task(row: pd.Series) -> dict:
    """A task for one manifest row, with the model's prediction when the row has one."""
    image_id = str(row["image_id"])
    out: dict = {
        "data": {
            TO_NAME: image_url(str(row["path"])),
            "image_id": image_id,
            "path": str(row["path"]),
            "flag": None if pd.isna(row.get("flag")) else str(row["flag"]),
        },
        "meta": {"image_id": image_id, "source": "sortloop"},
    }
    if not pd.isna(row.get("pred_label")):
        out["predictions"] = [prediction(str(row["pred_label"]), row.get("pred_conf"), _str(row.get("pred_model")))]
    return out


def task_image_id(task_json: dict) -> str | None:
    """The content hash a task was created for (data first, then meta), or None for a foreign task."""
    data = task_json.get("data") or {}
    meta = task_json.get("meta") or {}
    value = data.get("image_id") or meta.get("image_id")
    return str(value) if value else None


@dataclass(frozen=True)
class Decision:
    """What reviewers said about one task: its latest annotation, read from Label Studio's JSON.

    `kind` is "label" (the latest non-cancelled annotation picks `label`) or "skipped" (only cancelled
    annotations). `annotation_id`/`updated_at` identify the annotation that decided it; `reviewer` is its annotator.
    """

    image_id: str
    task_id: int
    kind: str
    label: str | None
    annotation_id: int
    reviewer: str
    updated_at: pd.Timestamp


def annotation_label(annotation: dict) -> str | None:
    """The class an annotation picks in our Choices control, or None if it picks none (empty result)."""
    for item in annotation.get("result") or []:
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            picked = (item.get("value") or {}).get("choices") or []
            if picked:
                return str(picked[0])
    return None


def decide(task_json: dict) -> Decision | None:
    """The decision for a task: latest non-cancelled annotation with a choice wins; else skipped; else None.

    Cancelled ("skipped") annotations and annotations with an empty result never become labels.
    """
    image_id = task_image_id(task_json)
    annotations = task_json.get("annotations") or []
    if image_id is None or not annotations:
        return None

    def stamp(a: dict) -> tuple[pd.Timestamp, int]:
        return pd.Timestamp(a.get("updated_at") or a.get("created_at")), int(a["id"])

    labelled = [a for a in annotations if not a.get("was_cancelled") and annotation_label(a) is not None]
    if labelled:
        best = max(labelled, key=stamp)
        return Decision(image_id, int(task_json["id"]), "label", annotation_label(best), int(best["id"]),
                        _reviewer(best), stamp(best)[0])
    cancelled = [a for a in annotations if a.get("was_cancelled")]
    if cancelled:
        best = max(cancelled, key=stamp)
        return Decision(image_id, int(task_json["id"]), "skipped", None, int(best["id"]), _reviewer(best),
                        stamp(best)[0])
    return None


def _reviewer(annotation: dict) -> str:
    """The annotator's e-mail when the export expanded `completed_by`, else "user <id>"."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or who.get("username") or f"user {who.get('id')}")
    return f"user {who}" if who is not None else "unknown"


def _str(value: object) -> str | None:
    return None if value is None or pd.isna(value) else str(value)


def _updated_after(updated_after: str | None) -> list[dict]:
    if not updated_after:
        return []
    return [{"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime", "value": updated_after}]


def pull_view(project_id: int, updated_after: str | None) -> dict:
    """A temporary Data Manager tab holding the tasks changed after `updated_after` (ISO, microseconds, Z).

    The comparison is strict; with None the tab holds every task.
    """
    filters = {"conjunction": "and", "items": _updated_after(updated_after)}
    return {"project": project_id, "data": {"title": "sortloop pull (temporary)", "filters": filters}}


def pull_snapshot(view_id: int | None) -> dict:
    """An export snapshot of the tasks with a non-cancelled annotation (in tab `view_id`, if given).

    All their annotations are included (skips too), with the annotators' e-mails expanded.
    """
    task_filter: dict = {"annotated": "only"}
    if view_id is not None:
        task_filter["view"] = view_id
    return {
        "title": "sortloop pull",
        "task_filter_options": task_filter,
        "annotation_filter_options": {"usual": True, "ground_truth": True, "skipped": True},
        "serialization_options": {"annotations__completed_by": {"only_id": False},
                                  "predictions": {"only_id": True}, "drafts": {"only_id": True}},
    }


def skipped_only_query(updated_after: str | None) -> dict:
    """Data Manager filter: tasks changed after `updated_after` whose only annotations are skips."""
    items = _updated_after(updated_after) + [
        {"filter": "filter:tasks:cancelled_annotations", "operator": "greater", "type": "Number", "value": 0},
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
    ]
    return {"filters": {"conjunction": "and", "items": items}}
