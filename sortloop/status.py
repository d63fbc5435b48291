"""Where the loop stands, as one dict: model, versions, labels, splits, flags, jobs, Label Studio.

`collect_status` only reads: the manifest, the label history, the registry, the job log and the job store
file (directly, without starting a scheduler), and asks Label Studio's `/health` with a short timeout.
Caveat: "reviewed since last train" counts label-history entries from reviews after the newest version's
`created_at`, so a review pulled during a training run counts for the next round.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import pandas as pd

from loop.data.label_sources import HUMAN_SOURCES, REVIEW
from loop.flags import MODEL_FLAGS
from loop.learning.gate import describe_evidence
from loop.model.artifact import read_spec
from loop.scoring.flagging import describe, settings_point
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
MEASURED_CATCH_PHOTOS = 100  # status measures the flags on this many of the latest photos a person labeled


def _counts(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in series.dropna().value_counts().sort_index().items()}


def _models(ws: Workspace, problems: list[str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]],
                                                        list[dict[str, Any]]]:
    """(current model, all versions, candidates = versions newer than the current one); what cannot be
    read is left out and said in `problems` (one line each, with the repair)."""
    from loop.errors import ModelError
    from loop.learning.deployment import describe_versions
    from loop.learning.registry import REPAIR, current_version, pointer_path

    try:
        current = current_version(ws)
    except ModelError as exc:
        problems.append(str(exc))
        current = None
    versions = [{**row, "current": row["deployed"]} for row in describe_versions(ws, problems)]
    model = None
    try:
        spec = read_spec(ws.models_dir / current) if current is not None else None
    except ModelError:
        spec = None
        problems.append(f"the deployed version {current} has no readable {ws.models_dir / current / 'model.json'} "
                        f"(folder deleted?); sorting stops until {REPAIR}")
    if current is not None and spec is not None:
        since = json.loads(pointer_path(ws).read_bytes()).get("since")
        model = {
            "version": current,
            "since": since,
            "architecture": spec.get("architecture"),
            "train_mode": spec.get("train_mode"),
            "classes": spec.get("classes"),
            "metrics": {k: v for k, v in (spec.get("metrics") or {}).items()
                        if k in ("user_valid", "web_valid", "cv_user")},
            "n_train": spec.get("n_train"),
            "calibration": spec.get("calibration"),
            "flag_point": settings_point(spec, ws.settings.sort),
            "sort_precision": _sort_precision(ws, spec),
            "unfamiliar": {**{k: v for k, v in (spec.get("unfamiliar") or {}).items() if k in (
                "threshold", "max_share", "oof_in_scope_sent", "reference_rows", "negative_rows")},
                "summary": _describe_unfamiliar(spec.get("unfamiliar") or {}, ws.settings.sort)},
        }
    newer = [v for v in versions if current is None or v["version"] > current]
    return model, versions, newer


def _describe_unfamiliar(section: dict, sort) -> str:
    """One line: where unfamiliar photos go and what the threshold was calibrated to send there."""
    if not sort.unfamiliar:
        return "off (sort.unfamiliar = false): every photo goes to a category"
    if not section:
        return "no score in this model (trained before it): every photo goes to a category; retrain to add it"
    taught = f", {section['negative_rows']} 'none of these' photos" if section.get("negative_rows") else ""
    shop = (f", and at most {section['max_share']:.0%} of your {section['shop_photos']} photos labeled after sorting"
            if section.get("threshold_shop_photos") is not None else "")
    return (f"photos unlike every labeled one go to {sort.other_folder}/ (threshold {section['threshold']:.3f}: "
            f"{section['oof_in_scope_sent']:.0%} of labeled photos of unseen items out of fold{shop}; "
            f"{section['reference_rows']} reference photos{taught})")


def _sort_precision(ws: Workspace, spec: dict[str, Any]) -> dict[str, Any]:
    """Which model file `sort` runs (INT8 or float) and why, from the version's INT8 gate verdict."""
    from loop.model.artifact import INT8_WEIGHT_BITS, int8_passed

    verdict = spec.get("int8") or {}
    if ws.settings.sort.runtime == "onnx" and ws.settings.sort.precision == "int8":
        return {"int8": True, "reason": "sort.precision = 'int8' (forced, whatever the INT8 gate said: "
                                        f"{verdict.get('reason', 'no verdict')})"}
    if ws.settings.sort.runtime != "onnx" or ws.settings.sort.precision == "float":
        why = f"sort.runtime = {ws.settings.sort.runtime!r}, sort.precision = {ws.settings.sort.precision!r}"
        return {"int8": False, "reason": f"float: {why}"}
    if not verdict:
        return {"int8": False, "reason": "float: this version has no INT8 model (trained before INT8, or model.int8 "
                                         "= false)"}
    if verdict.get("passed") and not int8_passed(spec):
        return {"int8": False, "reason": f"float: this version's INT8 model has 8-bit weights (quantised before "
                                         f"{INT8_WEIGHT_BITS}-bit ones), which give other answers on CPUs without "
                                         "VNNI than where its gate passed; the next train quantises again"}
    return {"int8": int8_passed(spec), "reason": verdict.get("reason", "")}


def _labels_and_splits(ws: Workspace, last_trained_at: pd.Timestamp | None) -> dict[str, Any]:
    from loop.data.manifest import history, load

    df = load(ws)
    labeled = df[df["label"].notna()]
    splits: dict[str, dict[str, int]] = {}
    for split, part in df.groupby(df["split"].fillna("unassigned")):
        splits[str(split)] = {
            "images": len(part),
            "items": int(part["item_id"].nunique()),
            "labeled_images": int(part["label"].notna().sum()),
            "user_images": int((part["source"] == "user").sum()),
        }
    from labeling.push import reason_counts, select_candidates, within_budget
    from loop.review.queue import budget_left

    flagged = df[df["flag"].notna()]
    status = flagged["review_status"].fillna("queued")
    waiting = select_candidates(df)  # what `review push` would send, most useful first
    today = within_budget(waiting, budget_left(ws))
    hist = history(ws)
    reviews = hist[hist["source"] == REVIEW]
    if last_trained_at is not None:
        reviews = reviews[reviews["at"] > last_trained_at]
    return {
        "images": {"total": len(df), "by_source": _counts(df["source"])},
        "labels": {
            "labeled": len(labeled),
            "unlabeled": int(df["label"].isna().sum()),
            "by_label_source": _counts(labeled["label_source"]),
            "by_source": _counts(labeled["source"]),
            "classes": _counts(labeled["label"]),
        },
        "splits": splits,
        "flags": {
            "total": len(flagged),
            "by_reason": _counts(flagged["flag"]),
            "waiting": len(waiting),  # wanting review, not sent yet (flagged by sort, chosen, moved by a person)
            "waiting_by_reason": reason_counts(waiting),
            "sendable_today": len(today),  # of those, what today's budget lets `review push` send
            "daily_budget": ws.settings.review.daily_budget,
            "in_review": int((status == "pushed").sum()),
            "reviewed": int((status == "reviewed").sum()),
            "skipped": int((status == "skipped").sum()),
            "reviewed_since_last_train": int(reviews["image_id"].nunique()),
            "measured": measured_catch(hist),
        },
    }


def measured_catch(hist: pd.DataFrame, last: int = MEASURED_CATCH_PHOTOS) -> dict[str, Any]:
    """Of the last `last` photos a person labeled after sorting (first label per photo), how many of the
    model's mistakes (label != its guess then) the flags had marked. Reviews are mostly flagged photos, so
    this overstates the catch rate on all sorted photos; user moves (unflagged mistakes) pull it back."""
    human = hist[hist["source"].isin(HUMAN_SOURCES) & hist["pred_label"].notna()]
    first = human.drop_duplicates("image_id", keep="first").tail(last)
    wrong = (first["new_label"].astype(str) != first["pred_label"].astype(str)).to_numpy(bool)
    flagged = first["flag"].isin(MODEL_FLAGS).to_numpy(bool)
    return {"photos": len(first), "mistakes": int(wrong.sum()), "flagged_mistakes": int((wrong & flagged).sum()),
            "flagged": int(flagged.sum()), "models": sorted(first["pred_model"].dropna().astype(str).unique())}


def _jobs(ws: Workspace, problems: list[str]) -> dict[str, Any]:
    from sortloop.jobs import read_job_log
    from sortloop.schedule import JOB_IDS, is_serving, jobstore_problem, next_run_times

    damaged = jobstore_problem(ws)
    if damaged:
        problems.append(damaged)
    next_runs = {} if damaged else next_run_times(ws)
    log = read_job_log(ws)
    jobs: dict[str, Any] = {}
    for job_id in JOB_IDS:
        runs = [r for r in log if r.get("job") == job_id and not r.get("missed")]
        missed = [r for r in log if r.get("job") == job_id and r.get("missed")]
        nxt = next_runs.get(job_id)
        jobs[job_id] = {
            "scheduled": job_id in next_runs,
            "next_run": nxt.isoformat() if isinstance(nxt, datetime) else None,
            "last_run": runs[-1] if runs else None,
            "runs": len(runs),
            "failures": sum(1 for r in runs if not r.get("ok")),
            "missed": len(missed),
        }
    serve_events = [r for r in log if r.get("job") == "serve"]
    return {"serving": is_serving(ws), "last_serve_event": serve_events[-1] if serve_events else None, "jobs": jobs}


def labelstudio_url(ws: Workspace) -> str:
    """The configured Label Studio base URL (the embedded server's when `labelstudio.url` is empty)."""
    cfg = ws.settings.labelstudio
    return (cfg.url or f"http://{cfg.host}:{cfg.port}").rstrip("/")


def labelstudio_health(ws: Workspace, *, timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Any]:
    """Whether Label Studio answers `/health` within `timeout` seconds (no credentials are sent)."""
    import httpx

    url = labelstudio_url(ws)
    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        return {"url": url, "reachable": False, "detail": f"{type(exc).__name__}: {exc}"}
    ok = response.status_code == 200
    return {"url": url, "reachable": ok, "detail": f"HTTP {response.status_code}",
            "whose": whose_server(ws) if ok else None}


def whose_server(ws: Workspace) -> str:
    """Whose Label Studio answers at the configured URL: "team" (labelstudio.url), "this workspace" (the embedded
    one it started, or one that accepts its login), or "another" (someone else's server on that port)."""
    from labeling import server

    if ws.settings.labelstudio.url:
        return "team"
    return "another" if server.status(ws).foreign else "this workspace"


def collect_status(ws: Workspace, *, check_labelstudio: bool = True) -> dict[str, Any]:
    """Everything `sortloop status` shows, as a JSON-friendly dict.

    Keys: workspace, model (deployed version + metrics, or None), versions, candidates, images, labels,
    splits, flags (by reason, waiting, in review, reviewed since last train), serving, jobs (last and
    next run of each), labelstudio (url, reachable).

    Example:
        >>> status = collect_status(open_workspace("data"))   # doctest: +SKIP
        >>> status["model"]["version"], status["flags"]["waiting"]
        ('v0003', 12)
    """
    problems: list[str] = []
    model, versions, candidates = _models(ws, problems)
    last_trained_at = None
    if versions and versions[-1]["created_at"]:
        last_trained_at = pd.Timestamp(versions[-1]["created_at"])
        if last_trained_at.tzinfo is None:
            last_trained_at = last_trained_at.tz_localize("UTC")
    status: dict[str, Any] = {"workspace": str(ws.root), "model": model, "versions": versions, "candidates": candidates}
    status.update(_labels_and_splits(ws, last_trained_at))
    status.update(_jobs(ws, problems))
    problems += damaged_logs(ws)
    from labeling.pull import unreadable_count  # the SDK loads only when status runs

    skipped = unreadable_count(ws)
    if skipped:
        problems.append(f"{skipped} unreadable annotation(s) skipped by `review pull` (each listed once, with its "
                        "task link, by the pull that found it); fix or delete them in Label Studio")
    status["problems"] = problems
    status["labelstudio"] = (
        labelstudio_health(ws) if check_labelstudio else {"url": labelstudio_url(ws), "reachable": None}
    )
    return status


def _fmt_acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def damaged_logs(ws: Workspace) -> list[str]:
    """One line per JSON-lines log with damaged lines (skipped by every reader: `loop.atomic.read_jsonl`)."""
    from loop.atomic import damaged_lines

    logs = [ws.history_dir / "labels.jsonl", ws.history_dir / "pushes.jsonl", ws.models_dir / "registry.jsonl",
            ws.runs_dir / "jobs.jsonl"]
    out = []
    for path in logs:
        n = damaged_lines(path)
        if n:
            out.append(f"{path}: {n} damaged line(s) skipped (a write torn by a crash; harmless, nothing to repair)")
    return out


def format_status(status: dict[str, Any]) -> str:
    """`collect_status`'s dict as a few lines of plain text for the terminal."""
    lines = [f"workspace   {status['workspace']}"]
    lines += [f"PROBLEM     {line}" for line in status.get("problems") or []]
    model = status["model"]
    if model is None:
        lines.append("model       none deployed (run `sortloop train` then `sortloop deploy`)")
    else:
        uv = model["metrics"].get("user_valid") or {}
        lines.append(
            f"model       {model['version']} ({model.get('train_mode')}, since {model.get('since')}): "
            f"accuracy on your labeled set {_fmt_acc(uv.get('accuracy'))} on {uv.get('n', '?')} photos"
        )
        cv = model["metrics"].get("cv_user") or {}
        if cv.get("accuracy") is not None:
            lines.append(f"            out-of-fold accuracy {_fmt_acc(cv['accuracy'])} on {cv['n']} training photos "
                         f"({model.get('n_train')} labels trained)")
        cal = model.get("calibration") or {}
        if cal.get("ece_oof_before") is not None:  # temperature and ECE: `status --json` and the report
            lines.append(f"            confidence calibrated: off by {cal['ece_oof_before']:.0%} on average before, "
                         f"{cal['ece_oof_after']:.0%} after (out of fold)")
        lines.append(f"flags       {describe(model['flag_point'])}")
        measured = status["flags"].get("measured")
        if measured and measured["photos"]:
            share = f" ({measured['flagged_mistakes'] / measured['mistakes']:.0%})" if measured["mistakes"] else ""
            lines.append(f"            of the last {measured['photos']} photos a person labeled after sorting, the "
                         f"flags had marked {measured['flagged_mistakes']} of the model's {measured['mistakes']} "
                         f"mistakes{share}")
        deployed = next((v for v in status["versions"] if v["current"]), None)
        decision = (deployed or {}).get("last_decision") or {}
        if decision.get("evidence"):
            lines.append(f"            deployed by the gate: {describe_evidence(decision['evidence'])} "
                         "(previous -> this model)")
        lines.append(f"unfamiliar  {(model.get('unfamiliar') or {}).get('summary', '')}")
        precision = model.get("sort_precision") or {}
        lines.append(f"sorting     {'INT8' if precision.get('int8') else 'float'} model: {precision.get('reason', '')}")
    for cand in status["candidates"]:
        decision = cand["last_decision"]
        if decision is None:
            note = " - not gated yet"
        else:
            failed = [r for r in decision.get("reasons") or [] if r.startswith("FAIL")]
            note = f" - {decision.get('event', '')}" + (f" ({'; '.join(failed)})" if failed else "")
            if decision.get("evidence"):
                note += f"; {describe_evidence(decision['evidence'])} (deployed -> candidate)"
        lines.append(
            f"candidate   {cand['version']}: accuracy on your labeled set {_fmt_acc(cand['user_valid_accuracy'])}{note}"
        )
    images, labels = status["images"], status["labels"]
    by_source = ", ".join(f"{k} {v}" for k, v in images["by_source"].items()) or "none"
    lines.append(f"images      {images['total']} ({by_source})")
    by_label_source = ", ".join(f"{k} {v}" for k, v in labels["by_label_source"].items()) or "none"
    lines.append(
        f"labels      {labels['labeled']} labeled, {labels['unlabeled']} unlabeled; by source: {by_label_source}"
    )
    for split, part in status["splits"].items():
        lines.append(
            f"split       {split}: {part['images']} images, {part['items']} items ({part['user_images']} user photos)"
        )
    flags = status["flags"]
    reasons = ", ".join(f"{k} {v}" for k, v in flags["by_reason"].items()) or "none"
    why = ", ".join(f"{n} {reason}" for reason, n in flags["waiting_by_reason"].items() if n)
    budget = ""
    if flags["daily_budget"] and flags["sendable_today"] < flags["waiting"]:
        budget = (f"; {flags['sendable_today']} can be sent today (review.daily_budget = {flags['daily_budget']} "
                  "a day, besides photos people moved), the rest tomorrow")
    lines.append(
        f"flags       {flags['waiting']} waiting to be sent for review{f' ({why})' if why else ''}{budget}; "
        f"{flags['in_review']} in review, {flags['reviewed_since_last_train']} reviewed since last train "
        f"(all flags by reason: {reasons})"
    )
    lines.append(f"serve       {'running' if status['serving'] else 'not running'}")
    for job_id, job in status["jobs"].items():
        last = job["last_run"]
        if last is None:
            last_text = "never ran"
        else:
            result = "ok" if last.get("ok") else "FAILED"
            last_text = (
                f"last {last.get('end') or last.get('start')} {result}: {last.get('summary') or last.get('error')}"
            )
        nxt = job["next_run"] or ("-" if not job["scheduled"] else "paused")
        lines.append(f"job {job_id:<8}next {nxt}; {last_text}")
    ls = status["labelstudio"]
    reach = {True: "reachable", False: f"NOT reachable ({ls.get('detail')})", None: "not checked"}[ls["reachable"]]
    whose = {"team": " (the team server of labelstudio.url)", "this workspace": " (this workspace's)",
             "another": " - but it is NOT this workspace's server (it refuses this workspace's login): another "
                        "workspace's Label Studio uses that port; set labelstudio.port in this workspace's "
                        "sortloop.toml, or stop the other one"}.get(ls.get("whose") or "", "")
    lines.append(f"labelstudio {ls['url']} {reach}{whose}")
    return "\n".join(lines)
