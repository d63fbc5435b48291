"""`sortloop report`: one HTML page plus PNGs showing how the loop is learning.

Plots (matplotlib, `Figure` objects only, so no GUI backend and no global pyplot state): accuracy of every
model version on the user validation photos over time, per-class recall of the deployed model (with each
class's photo count), its confusion matrix, its most confident mistakes (`sortloop.mistakes`), labels gained
per round (label history between trainings), and flags by reason.
Caveat: every number comes from the versions' `model.json` (measured by `train` on the user validation
photos labeled at the time); nothing is re-evaluated here, so `report` is fast and needs no model runtime.
Versions trained on different validation sets are comparable only because splits are stable.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loop.atomic import atomic_write
from loop.learning.gate import describe_evidence
from loop.model.artifact import read_spec
from loop.scoring.flagging import describe, settings_point
from loop.workspace import Workspace, make_private
from sortloop.mistakes import plot_mistakes, worst_mistakes

logger = logging.getLogger(__name__)

VERSION_HEADERS = ["version", "trained", "mode", "accuracy on your labeled set", "n", "web-valid accuracy", "decision",
                   "gate evidence (deployed -> this version)", "why"]
PLOTS = {
    "accuracy": "accuracy.png",
    "recall": "recall.png",
    "confusion": "confusion.png",
    "labels": "labels.png",
    "flags": "flags.png",
    "catch": "catch.png",
    "mistakes": "mistakes.png",
}


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _empty(fig: Any, text: str) -> None:
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="0.4")


def _versions(ws: Workspace) -> list[dict[str, Any]]:
    """The version table (`loop.learning.deployment.describe_versions`), `created_at` as a UTC Timestamp."""
    from loop.learning.deployment import describe_versions

    rows = []
    for row in describe_versions(ws):
        created = pd.Timestamp(row["created_at"]) if row.get("created_at") else None
        if created is not None and created.tzinfo is None:
            created = created.tz_localize("UTC")
        rows.append({**row, "created_at": created})
    return rows


def _metric(spec: dict[str, Any], split: str, key: str = "accuracy") -> float | None:
    value = ((spec.get("metrics") or {}).get(split) or {}).get(key)
    return None if value is None else float(value)


# --- plots ---------------------------------------------------------------------------------------------


def plot_accuracy(
    versions: list[dict[str, Any]], current: str | None, out: Path, decisions: dict[str, dict[str, Any]] | None = None
) -> Any:
    """Accuracy per version on the user validation photos, with the gate's verdicts.

    The line is each version's accuracy when it was trained (model.json). Where the gate judged a version,
    a grey diamond shows the then-deployed model on the *same* photos, and the marker says promoted (green)
    or refused (red x); the orange star is the version deployed now.
    """
    decisions = decisions or {}
    fig = _figure(7.5, 4.2)
    points = [(v["created_at"], v["version"], v["user_valid_accuracy"]) for v in versions]
    points = [p for p in points if p[2] is not None]
    if not points:
        _empty(fig, "no model trained yet")
        fig.savefig(out)
        return fig
    ax = fig.subplots()
    xs = list(range(len(points)))
    ax.plot(xs, [p[2] for p in points], "-", color="tab:blue", zorder=2, label="version, at training (user photos)")
    seen: set[str] = set()

    def once(label: str) -> str:
        """The label the first time, then a hidden one (matplotlib skips labels starting with "_")."""
        if label in seen:
            return "_" + label
        seen.add(label)
        return label

    for x, (_, version, acc) in zip(xs, points, strict=True):
        decision = decisions.get(version) or {}
        event = decision.get("event")
        if event in ("promoted", "forced"):
            ax.plot([x], [acc], "o", color="tab:green", markersize=8, zorder=3, label=once("promoted by the gate"))
        elif event == "refused":
            ax.plot([x], [acc], "X", color="tab:red", markersize=9, zorder=3, label=once("refused by the gate"))
        else:
            ax.plot([x], [acc], "o", color="tab:blue", markersize=6, zorder=3)
        rival = (decision.get("current") or {}).get("accuracy")
        if rival is not None:
            ax.plot([x, x], [acc, rival], ":", color="0.5", zorder=1)
            ax.plot([x], [rival], "D", color="0.5", markersize=5, zorder=3, label=once("deployed model, same photos"))
        if version == current:
            ax.plot([x], [acc], "*", color="tab:orange", markersize=17, zorder=4, label=once("deployed now"))
        ax.annotate(f"{acc:.3f}", (x, acc), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    labels = [f"{p[1]}\n{p[0]:%m-%d %H:%M}" if p[0] is not None else p[1] for p in points]
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on user validation photos")
    ax.set_title("Accuracy per model version")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the plot: covers nothing
    fig.savefig(out)
    return fig


def plot_recall(spec: dict[str, Any] | None, out: Path) -> Any:
    """Per-class recall of the deployed model on the user validation photos."""
    fig = _figure()
    per_class = ((spec or {}).get("metrics", {}).get("user_valid") or {}).get("per_class") or {}
    # a class with no validation photo has no recall (None): leave it out rather than draw a 0
    recalls = {c: float(m["recall"]) for c, m in per_class.items() if m.get("recall") is not None}
    if not recalls:
        _empty(fig, "no deployed model" if spec is None else "no per-class recall in model.json")
    else:
        classes, recall = list(recalls), list(recalls.values())
        counts = [int(per_class[c].get("support") or 0) for c in classes]
        ax = fig.subplots()
        bars = ax.barh([f"{c} ({n})" for c, n in zip(classes, counts, strict=True)], recall, color="tab:blue")
        ax.bar_label(bars, labels=[f"{r:.2f} of {n} photo{'s' if n != 1 else ''}"
                                   for r, n in zip(recall, counts, strict=True)], fontsize=8, padding=2)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.3)  # room for the labels right of a full bar
        ax.set_xlabel("recall (user validation photos)")
        ax.set_title(f"Per-class recall of {spec.get('version', '')}")
    fig.savefig(out)
    return fig


def plot_catch(spec: dict[str, Any] | None, point: dict[str, Any] | None, out: Path) -> None:
    """The deployed model's catch curves (share of photos flagged -> share of mistakes caught), per strategy,
    with the current operating point marked."""
    fig = _figure()
    curves = ((spec or {}).get("flagging") or {}).get("curves") or {}
    if not curves:
        _empty(fig, "no deployed model" if spec is None else "no catch curve in model.json (older model)")
    else:
        ax = fig.subplots()
        for name, curve in curves.items():
            ax.plot(curve["share"], curve["catch"], label=name, lw=2 if point and name == point["strategy"] else 1)
        if point and point.get("expected_share") is not None:
            ax.plot([point["expected_share"]], [point["expected_catch"]], "o", color="black",
                    label=f"operating point ({point['strategy']})")
        ax.plot([0, 1], [0, 1], ":", color="0.6", label="random flags")
        ax.set_xlabel("share of photos flagged")
        ax.set_ylabel("share of the model's mistakes caught")
        ax.set_title(f"Flags of {spec.get('version', '')}: estimated {spec['flagging'].get('estimated_on', '')}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(out)


def plot_confusion(confusion: dict[str, Any] | None, version: str | None, out: Path) -> None:
    """Confusion matrix (rows = true label, columns = predicted), counts with row-normalised colour."""
    if confusion is None:
        fig = _figure()
        _empty(fig, "no deployed model" if version is None else "no confusion matrix in model.json")
        fig.savefig(out)
        return
    classes, matrix = confusion["classes"], np.asarray(confusion["matrix"], dtype=float)
    size = max(4.0, 0.55 * len(classes) + 2.0)
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    f"{int(matrix[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix of {version} ({confusion.get('source', '')})", fontsize=10)
    fig.savefig(out)


def label_rounds(history: pd.DataFrame, versions: list[dict[str, Any]]) -> pd.DataFrame:
    """Label changes per round, by source: a round ends when a version is trained; the last is "pending".

    Returns:
        A frame indexed by round name ("→v0001", ..., "pending") with one column per label source.
    """
    bounds = [(v["version"], v["created_at"]) for v in versions if v["created_at"] is not None]
    names, edges = [f"→{name}" for name, _ in bounds] + ["pending"], [at for _, at in bounds]
    if history.empty:
        return pd.DataFrame(index=pd.Index(names, name="round"))
    at = history["at"]
    index = np.searchsorted(
        np.array([e.value for e in edges], dtype="int64"), at.map(lambda t: t.value).to_numpy(), side="left"
    )
    frame = pd.DataFrame({"round": [names[i] for i in index], "source": history["source"].fillna("unknown")})
    table = frame.groupby(["round", "source"]).size().unstack(fill_value=0)
    return table.reindex(names, fill_value=0)


def _stacked_bars(ax: Any, table: pd.DataFrame) -> np.ndarray:
    """One bar per row of `table`, stacked by column (each column a legend entry); returns the totals."""
    bottom = np.zeros(len(table))
    for column in table.columns:
        values = table[column].to_numpy()
        ax.bar(table.index, values, bottom=bottom, label=str(column))
        bottom += values
    return bottom


def plot_labels(rounds: pd.DataFrame, out: Path) -> Any:
    """Stacked bars: label changes gained in each round, by who/what made them."""
    fig = _figure()
    if rounds.empty or rounds.to_numpy().sum() == 0:
        _empty(fig, "no labels yet")
    else:
        ax = fig.subplots()
        bottom = _stacked_bars(ax, rounds)
        for x, total in enumerate(bottom):
            ax.annotate(f"{int(total)}", (x, total), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        ax.set_ylim(0, max(bottom) * 1.15)  # room for the totals under the title
        ax.set_ylabel("label changes")
        ax.set_title("Labels gained per round (between trainings)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.tick_params(axis="x", labelsize=8)
    fig.savefig(out)
    return fig


def plot_flags(df: pd.DataFrame, out: Path) -> Any:
    """Stacked bars: flagged photos by reason, split by review status."""
    fig = _figure()
    flagged = df[df["flag"].notna()]
    if flagged.empty:
        _empty(fig, "no flagged photos")
    else:
        table = (
            flagged.assign(status=flagged["review_status"].fillna("queued"))
            .groupby(["flag", "status"])
            .size()
            .unstack(fill_value=0)
        )
        ax = fig.subplots()
        _stacked_bars(ax, table)
        ax.set_ylabel("photos")
        ax.set_title("Flags by reason")
        ax.legend(title="review status", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out)
    return fig


# --- confusion matrix ------------------------------------------------------------------------------------


def current_confusion(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The model's confusion matrix on the user validation photos, as `train` stored it in model.json.

    Returns:
        {"classes": [...], "matrix": (K, K) counts, rows = true label, "n": int, "source": text}, or None
        when the model.json has none (or it is empty).
    """
    stored = ((spec.get("metrics") or {}).get("user_valid") or {}).get("confusion")
    if not stored:
        return None
    matrix = np.asarray(stored["matrix"] if isinstance(stored, dict) else stored)
    classes = (stored.get("labels") or stored.get("classes")) if isinstance(stored, dict) else None
    n = int(matrix.sum()) if matrix.size else 0
    if n == 0:
        return None
    return {"classes": list(classes or spec["classes"]), "matrix": matrix.tolist(), "n": n, "source": f"n={n}"}


# --- the page ----------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@dataclass
class _Facts:
    """Everything the page shows, read once: the version table, the deployed model's spec, the manifest."""

    versions: list[dict[str, Any]]
    current: str | None
    spec: dict[str, Any] | None  # the deployed model's model.json
    decisions: dict[str, dict[str, Any]]  # version -> its last promoted/forced/refused log entry
    df: pd.DataFrame
    rounds: pd.DataFrame
    point: dict[str, Any] | None  # the deployed model's flag operating point under today's settings
    confusion: dict[str, Any] | None


def write_report(ws: Workspace) -> Path:
    """Write `<workspace>/report/index.html` and its PNGs; returns the HTML path.

    Three phases: read what the page shows, draw the plots, write the page (atomically).

    Example:
        >>> page = write_report(open_workspace("data"))   # doctest: +SKIP
        >>> page.name
        'index.html'
    """
    out = make_private(ws.report_dir)  # its thumbnails show the user's photos
    facts = _read_facts(ws)
    _draw_plots(ws, facts, out)
    page_path = out / "index.html"
    with atomic_write(page_path) as fh:
        fh.write(_page(ws, facts).encode("utf-8"))
    logger.info("report written to %s", page_path)
    return page_path


def _read_facts(ws: Workspace) -> _Facts:
    from loop.data.manifest import history, load
    from loop.learning.deployment import DECISION_EVENTS
    from loop.learning.registry import current_version, read_log

    versions = _versions(ws)
    current = current_version(ws)
    spec = read_spec(ws.models_dir / current) if current is not None else None
    decisions = {e["version"]: e for e in read_log(ws) if e.get("event") in DECISION_EVENTS and "version" in e}
    return _Facts(
        versions=versions, current=current, spec=spec, decisions=decisions, df=load(ws),
        rounds=label_rounds(history(ws), versions),
        point=settings_point(spec, ws.settings.sort) if spec is not None else None,
        confusion=current_confusion(spec) if spec is not None else None,
    )


def _draw_plots(ws: Workspace, facts: _Facts, out: Path) -> None:
    plot_accuracy(facts.versions, facts.current, out / PLOTS["accuracy"], facts.decisions)
    plot_recall(facts.spec, out / PLOTS["recall"])
    plot_confusion(facts.confusion, facts.current, out / PLOTS["confusion"])
    plot_labels(facts.rounds, out / PLOTS["labels"])
    plot_flags(facts.df, out / PLOTS["flags"])
    plot_catch(facts.spec, facts.point, out / PLOTS["catch"])
    mistakes = worst_mistakes(ws, facts.current) if facts.current else worst_mistakes(ws, "")[:0]
    plot_mistakes(mistakes, facts.current, out / PLOTS["mistakes"])


def _version_rows(facts: _Facts) -> list[list[Any]]:
    rows = []
    for v in facts.versions:
        last = v["last_decision"] or {}
        rows.append([
            v["version"] + (" (deployed)" if v["version"] == facts.current else ""),
            "" if v["created_at"] is None else f"{v['created_at']:%Y-%m-%d %H:%M}",
            v["train_mode"] or "",
            _fmt(v["user_valid_accuracy"]),
            "" if v["user_valid_n"] is None else v["user_valid_n"],
            _fmt(v["web_valid_accuracy"]),
            last.get("event", last.get("action", "")),
            describe_evidence(last.get("evidence")) if last.get("evidence") else "",
            "; ".join(last.get("reasons", []) or []),
        ])
    return rows


def _headline(facts: _Facts) -> str:
    spec = facts.spec
    if spec is None:
        return "No model deployed yet."
    headline = (
        f"Deployed model <b>{html.escape(facts.current or '')}</b>: accuracy "
        f"<b>{_fmt(_metric(spec, 'user_valid'))}</b> on "
        f"{((spec.get('metrics') or {}).get('user_valid') or {}).get('n', '?')} user validation photos."
    )
    cal = spec.get("calibration") or {}
    if cal.get("ece_oof_before") is not None:
        headline += (f" Calibrated (temperature {cal['temperature']:.2f}): expected calibration error "
                     f"{cal['ece_oof_before']:.3f} &rarr; {cal['ece_oof_after']:.3f} out of fold.")
    return headline + f" Flags: {html.escape(describe(facts.point, detail=True))}."


def _page(ws: Workspace, facts: _Facts) -> str:
    spec, df, rounds, confusion = facts.spec, facts.df, facts.rounds, facts.confusion
    per_class_rows = []
    if spec is not None:
        for cls, m in (((spec.get("metrics") or {}).get("user_valid") or {}).get("per_class") or {}).items():
            per_class_rows.append([cls, _fmt(m.get("precision")), _fmt(m.get("recall"))])
    flagged = df[df["flag"].notna()]
    round_rows = [
        [name, *[int(x) for x in row], int(sum(row))] for name, row in zip(rounds.index, rounds.to_numpy(), strict=True)
    ]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    confusion_caption = "Confusion matrix of the deployed model" + (f" ({confusion['source']})" if confusion else "")
    figure = '<figure><img src="{0}" alt="{1}"><figcaption>{1}</figcaption></figure>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sortloop report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; }} figure {{ margin: 1.5em 0; }}
</style></head><body>
<h1>sortloop report</h1>
<p>Workspace <code>{html.escape(str(ws.root))}</code>, written {stamp}. {_headline(facts)}</p>
<p>{len(df)} images, {int(df["label"].notna().sum())} labeled, {len(flagged)} flagged.</p>
<h2>Model versions</h2>
{_table(VERSION_HEADERS, _version_rows(facts))}
{figure.format(PLOTS["accuracy"], "Accuracy per model version on user validation photos")}
<h2>Deployed model</h2>
{_table(["class", "precision", "recall"], per_class_rows) if per_class_rows else "<p>No per-class metrics.</p>"}
{figure.format(PLOTS["recall"], "Per-class recall of the deployed model")}
{figure.format(PLOTS["confusion"], confusion_caption)}
{figure.format(PLOTS["mistakes"], "Most confident wrong predictions on validation photos: guess (probability), "
                                  "true label")}
<h2>Labels and flags</h2>
{_table(["round", *[str(c) for c in rounds.columns], "total"], round_rows)}
{figure.format(PLOTS["labels"], "Labels gained per round")}
{figure.format(PLOTS["flags"], "Flags by reason")}
{figure.format(PLOTS["catch"], "Share of photos flagged vs share of the model's mistakes caught (out of fold)")}
</body></html>
"""
