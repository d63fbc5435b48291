"""Every Label Studio payload sortloop sends or reads, in Label Studio's own JSON shape, in one place.

Tasks carry the image's content hash (`image_id`, sha256) in `data` and `meta`: that is the permanent key.
Label Studio task ids are only hints (SQLite reuses a deleted maximum id).
Caveat: images are referenced by `/data/local-files/?d=photos/<served name>`, relative to the server's
`LOCAL_FILES_DOCUMENT_ROOT`, which must be the workspace's served folder (`labeling.served`), with the
project's one local-files storage on its `photos` sub-folder (`labeling.project`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import pandas as pd

from loop.data.classnames import OTHER_LABEL
from loop.data.label_sources import USER_MOVE
from loop.flags import UNFAMILIAR, USER_MOVED

FROM_NAME = "label"  # the Choices control
TO_NAME = "image"  # the Image object; task data key holding the image URL is also "image"
SERVED_SUBDIR = "photos"  # the storage folder under the document root (a storage may not BE the root)
HOTKEYS = "1234567890" + "qwertyuiopasdfgzxcvbnm"  # h, j, k, l avoided: the editor uses some of them


# The review screen: the photo on the left, every class as a vertical list on the right, so all choices stay
# visible (and the pre-selected guess can be seen) at 1280x800 with the Submit bar below.
_LAYOUT = (
    '<View style="display: flex; align-items: flex-start; gap: 20px">\n'
    '  <View style="flex: 1 1 auto; min-width: 0">\n'
    '    <Image name="{to}" value="${to}" zoom="true" zoomControl="true" maxHeight="520px"/>\n'
    "  </View>\n"
    '  <View style="flex: 0 0 230px">\n'
    '    <Text name="note" value="$note"/>\n'
    '    <Choices name="{name}" toName="{to}" choice="single-radio" required="true" layout="vertical">\n'
    "{choices}\n"
    "    </Choices>\n"
    "  </View>\n"
    "</View>"
)

INSTRUCTIONS = (
    "<p><b>Pick the category this photo belongs to.</b> One category is already selected: the one a person "
    "moved the photo to, or else the model's guess (the line above the categories says which). Press "
    "<b>Submit</b> if it is right, otherwise click the right category (or press its key) first.</p>"
    "<p>Pick <b>None of these</b> if the photo fits no category (the workshop, a truck, a sketch): it stays in "
    "the unfamiliar folder and teaches the model what is out of scope. Press <b>Skip</b> if you cannot tell; "
    "skipped photos are not used for training. <i>Label All Tasks</i> gives the most useful photos first: those "
    "a person moved, then those that teach the model most. The task list can also be sorted by "
    "<i>confidence</i> (least sure first).</p>"
)
OTHER_TEXT = "None of these"  # what the reviewer reads; the result carries OTHER_LABEL

# Every prediction carries this one `model_version`: Label Studio pre-selects, in "Label All Tasks", only the
# predictions whose version equals the project's (set once, from the first import), so a per-model version
# would stop pre-selecting after the next deploy. Which model guessed is in the task's `model` field.
PREDICTION_VERSION = "sortloop"


def label_config(classes: list[str]) -> str:
    """A single-choice image classification config: the photo beside a vertical list of classes with hotkeys,
    and "None of these" last (a reviewer's answer for a photo that fits no category: `OTHER_LABEL`).

    Args:
        classes: class names in display order (non-empty, unique).
    """
    choices = []
    for i, name in enumerate([c for c in classes if c != OTHER_LABEL]):
        hotkey = f" hotkey={quoteattr(HOTKEYS[i])}" if i < len(HOTKEYS) else ""
        choices.append(f"      <Choice value={quoteattr(name)}{hotkey}/>")
    # "None of these": last; `html` shows the words, the result keeps OTHER_LABEL
    choices.append(f"      <Choice value={quoteattr(OTHER_LABEL)} html={quoteattr(OTHER_TEXT)}/>")
    return _LAYOUT.replace("{to}", TO_NAME).replace("{name}", FROM_NAME).replace("{choices}", "\n".join(choices))


# Task-list columns hidden in the review tab: sortloop's keys (sha256, absolute path: in the task data, not for
# reading) and Label Studio's own default-hidden bookkeeping columns, so photo, guess and confidence fit on screen.
HIDDEN_COLUMNS = [
    "tasks:data.image_id", "tasks:data.path", "tasks:data.note", "tasks:inner_id", "tasks:annotations_results",
    "tasks:annotations_ids", "tasks:predictions_score", "tasks:predictions_model_versions",
    "tasks:predictions_results", "tasks:file_upload", "tasks:storage_filename", "tasks:created_at",
    "tasks:updated_at", "tasks:updated_by", "tasks:avg_lead_time", "tasks:draft_exists",
]


def review_tab(project_id: int) -> dict:
    """The project's first Data Manager tab: the tasks nobody annotated or skipped yet, in push order (the most
    useful first: "Label All Tasks" follows it), sha256 and path hidden."""
    hidden = {"explore": HIDDEN_COLUMNS, "labeling": HIDDEN_COLUMNS}
    waiting = {"conjunction": "and", "items": [
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
        {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0},
    ]}
    return {"project": project_id, "data": {"title": "To review", "hiddenColumns": hidden, "filters": waiting,
                                            "ordering": ["tasks:id"]}}


def config_classes(config_xml: str) -> list[str]:
    """The class names in a label config made by `label_config` (or edited by hand), in order
    ("None of these" is not a class: left out)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(config_xml)
    for choices in root.iter("Choices"):
        if choices.get("name") == FROM_NAME:
            names = [c.get("value") or c.get("alias") or "" for c in choices.iter("Choice")]
            return [n for n in names if n != OTHER_LABEL]
    return []


def has_other_choice(config_xml: str) -> bool:
    """Whether the config offers "None of these" (projects made before it existed do not)."""
    return f"value={quoteattr(OTHER_LABEL)}" in config_xml


def image_url(served_name: str) -> str:
    """The local-files URL of a published photo (`labeling.served`), relative to the served folder."""
    return "/data/local-files/?d=" + quote(f"{SERVED_SUBDIR}/{served_name}")


def choice_result(label: str) -> list[dict]:
    """The `result` of an annotation or prediction that picks `label`."""
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}]


def prediction(label: str, score: float | None) -> dict:
    """A pre-filled choice; `score` is the model's confidence in `label` (0..1), None for a person's choice."""
    pred: dict = {"model_version": PREDICTION_VERSION, "result": choice_result(label)}
    if score is not None and not pd.isna(score):
        pred["score"] = float(score)
    return pred


def moved_by_person(row: dict | pd.Series) -> bool:
    """A photo whose label is a person's move of its sorted copy (scan), waiting for a reviewer to confirm it."""
    return (_str(row.get("flag")) == USER_MOVED and _str(row.get("label_source")) == USER_MOVE
            and _str(row.get("label")) is not None)


def note(row: dict | pd.Series) -> str:
    """The line above the choices: what is pre-selected and why (a person's move, or the model's guess)."""
    guess, conf, model = _str(row.get("pred_label")), row.get("pred_conf"), _str(row.get("pred_model"))
    said = "" if guess is None else f"the model{f' {model}' if model else ''} guessed {guess}" + (
        "" if conf is None or pd.isna(conf) else f" ({float(conf):.0%} sure)")
    if moved_by_person(row):
        at = row.get("label_at")
        when = "" if at is None or pd.isna(at) else f" on {pd.Timestamp(at).strftime('%Y-%m-%d')}"
        return f"Moved by a person from {guess or 'its folder'} to {row['label']}{when}" + (
            f"; {said}." if said else ".")
    return (said[0].upper() + said[1:] + ".") if said else "No guess yet: pick the category."


def task(row: pd.Series, served_name: str) -> dict:
    """A task for one manifest row whose photo is published as `served_name`: the model's guess and, for a copy a
    person moved, their choice (pre-selected) as predictions, and a `note` saying which is pre-selected."""
    image_id = str(row["image_id"])
    guess, conf = row.get("pred_label"), row.get("pred_conf")
    out: dict = {
        "data": {
            TO_NAME: image_url(served_name),
            "guess": None if pd.isna(guess) else str(guess),  # sortable columns in the task list
            "confidence": None if conf is None or pd.isna(conf) else round(float(conf), 3),
            "flag": None if pd.isna(row.get("flag")) else str(row["flag"]),
            "image_id": image_id,  # the permanent key (hidden in the task list, see `review_tab`)
            "path": str(row["path"]),
        },
        "meta": {"image_id": image_id, "source": "sortloop"},
    }
    out["data"]["model"] = _str(row.get("pred_model"))
    out["data"]["note"] = note(row)
    # Label Studio lists a task's predictions newest first and pre-selects the first one listed (seen in the
    # browser test): the person's choice is imported last, so it is listed first and the model's guess second.
    predictions = []
    if not pd.isna(row.get("pred_label")):
        # an unfamiliar photo (the model sent it to the unfamiliar folder): "None of these" is its guess
        guessed = OTHER_LABEL if _str(row.get("flag")) == UNFAMILIAR else str(row["pred_label"])
        predictions.append(prediction(guessed, row.get("pred_conf")))
    if moved_by_person(row):
        predictions.append(prediction(str(row["label"]), None))
    if predictions:
        out["predictions"] = predictions
    return out


def task_image_id(task_json: dict) -> str | None:
    """The content hash a task was created for (data first, then meta), or None for a foreign task."""
    data, meta = task_json.get("data"), task_json.get("meta")
    data, meta = data if isinstance(data, dict) else {}, meta if isinstance(meta, dict) else {}
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
    """The class an annotation picks in our Choices control, or None if it picks none (empty result).

    Raises:
        ValueError: the annotation is not in the shape our config makes (see `annotation_problem`).
    """
    problem = annotation_problem(annotation)
    if problem is not None:
        raise ValueError(problem)
    for item in annotation.get("result") or []:
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            picked = item["value"].get("choices") or []
            if picked:
                return str(picked[0])
    return None


def annotation_problem(annotation: object) -> str | None:
    """Why an annotation cannot be read (a few words), or None.

    Label Studio's API stores what a client sends (`{"value": {"choices": {"a": 1}}}`, `"value": "bed"`), so
    one hand-made annotation must be skipped and reported, never stop the pull of every other one.
    """
    if not isinstance(annotation, dict):
        return "the annotation is not a JSON object"
    try:
        int(annotation["id"])
        pd.Timestamp(annotation.get("updated_at") or annotation.get("created_at"))
    except (KeyError, TypeError, ValueError):
        return "the annotation has no valid id or time"
    result = annotation.get("result") or []
    if not isinstance(result, list):
        return "its result is not a list"
    for item in result:
        if not isinstance(item, dict):
            return "a result entry is not a JSON object"
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            value = item.get("value")
            if not isinstance(value, dict):
                return f"its choice value is {type(value).__name__}, not an object with 'choices'"
            picked = value.get("choices")
            if picked is not None and not (isinstance(picked, list) and all(isinstance(c, str) for c in picked)):
                return "its 'choices' is not a list of class names"
    return None


def unreadable_annotations(task_json: dict) -> list[tuple[int | None, str]]:
    """(annotation id or None, why) for each annotation of a task that `decide` skips as unreadable."""
    out = []
    for a in task_json.get("annotations") or []:
        problem = annotation_problem(a)
        if problem is not None:
            ident = a.get("id") if isinstance(a, dict) else None
            out.append((ident if isinstance(ident, int) else None, problem))
    return out


def decide(task_json: dict) -> Decision | None:
    """The decision for a task: latest non-cancelled annotation with a choice wins; else skipped; else None.

    Cancelled ("skipped") annotations and annotations with an empty result never become labels; unreadable
    ones (`annotation_problem`) are left out (`unreadable_annotations` lists them for the pull's report).
    """
    image_id = task_image_id(task_json)
    try:
        task_id = int(task_json["id"])
    except (KeyError, TypeError, ValueError):
        return None
    annotations = [a for a in task_json.get("annotations") or [] if annotation_problem(a) is None]
    if image_id is None or not annotations:
        return None

    def stamp(a: dict) -> tuple[pd.Timestamp, int]:
        return pd.Timestamp(a.get("updated_at") or a.get("created_at")), int(a["id"])

    labelled = [a for a in annotations if not a.get("was_cancelled") and annotation_label(a) is not None]
    if labelled:
        best = max(labelled, key=stamp)
        return Decision(image_id, task_id, "label", annotation_label(best), int(best["id"]),
                        _reviewer(best), stamp(best)[0])
    cancelled = [a for a in annotations if a.get("was_cancelled")]
    if cancelled:
        best = max(cancelled, key=stamp)
        return Decision(image_id, task_id, "skipped", None, int(best["id"]), _reviewer(best),
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


def unannotated_query(updated_after: str | None, task_ids: tuple[int, int]) -> dict:
    """Data Manager filter: tasks with ids in [min, max] changed after `updated_after` with no annotation and no
    skip (e.g. all deleted). The id range keeps tasks pushed after the reviewed ones out of the answer."""
    items = _updated_after(updated_after) + [
        {"filter": "filter:tasks:id", "operator": "in", "type": "Number",
         "value": {"min": task_ids[0], "max": task_ids[1]}},
        {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0},
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
    ]
    return {"filters": {"conjunction": "and", "items": items}}
