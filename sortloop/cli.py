"""The `sortloop` command line: a thin typer layer; each command calls one library function and prints.

Library errors (`SortloopError`) become one red line and exit code 1; there are no tracebacks for
expected failures. Shared options and helpers live in `sortloop.console`; the Label Studio sub-commands
in `sortloop.labelstudio_cli`.
"""

from __future__ import annotations

import json
import shlex
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer
from rich.markup import escape

from loop.config import ModelConfig
from sortloop.console import (
    GlobalOptions,
    JsonOption,
    WorkspaceOption,
    cli_hint,
    command_of,
    console,
    out,
    print_json,
    progress_bar,
    quiet_library_logs,
    set_global_options,
    sortloop_command,
)
from sortloop.labelstudio_cli import labelstudio_app, review_app
from sortloop.watch_cli import watch_app

# Choices listed in --help, from the library's own lists.
Source = StrEnum("Source", {name: name for name in ("user", "web")})  # loop.data.ingest.SOURCES (pandas: slow import)
TrainMode = StrEnum("TrainMode", {name: name for name in get_args(ModelConfig.model_fields["train_mode"].annotation)})

if TYPE_CHECKING:
    from loop.workspace import Workspace

app = typer.Typer(
    help="Sort photos into category folders with a classifier that learns from your corrections.\n\n"
         "Example: sortloop sort ~/Photos/inbox ~/Photos/sorted   (every command: sortloop COMMAND --help)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def global_options(
    ctx: typer.Context,
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace folder for every command "
                                                   "(default $SORTLOOP_WORKSPACE, else ./data).")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Log what happens (-vv: debug).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output, for the commands that read state.")] = False,
) -> None:
    """Sort photos into category folders with a classifier that learns from your corrections.

    Example: sortloop -w ./data status --json
    """
    set_global_options(ctx, GlobalOptions(workspace=workspace, verbose=verbose, as_json=as_json))


def command(*args: Any, **kwargs: Any) -> Any:
    """`@app.command` with friendly errors."""
    return command_of(app, *args, **kwargs)


RayOption = Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (needs `pip install 'sortloop[ray]'`); "
                                         "default: sort.engine / model.feature_engine.")]
RayAddressOption = Annotated[str | None, typer.Option(help="The Ray cluster: host:6379, ray://host:10001, or "
                                                       "'local' for a fresh local instance (default: ray.address, "
                                                       "else $RAY_ADDRESS).")]


def _with_ray(workspace: Path | None, address: str | None) -> Workspace:
    """The workspace, with `ray.address` set from --ray-address when given."""
    from loop.workspace import open_workspace

    ws = open_workspace(workspace)
    if address is not None:
        ws.settings.ray.address = address
    return ws


# --- workspace and data -----------------------------------------------------------------------------


@command()
def init(
    path: Annotated[Path | None, typer.Argument(metavar="PATH", help="Workspace folder (default "
                                                "$SORTLOOP_WORKSPACE, else ./data).")] = None,
    classes: Annotated[str | None, typer.Option(help="Your categories, separated by commas (they become the "
                                                "folders under DEST), e.g. table,console,cabinet.")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Create a workspace: config file with documented defaults, manifest, history, models, caches.

    Run it again to add categories; an existing config is kept.

    Example: sortloop init ./data --classes table,console,cabinet
    """
    from loop.data.classes import declare_classes, parse_class_list
    from loop.workspace import init_workspace

    names = parse_class_list(classes) if classes is not None else None  # a bad list creates nothing
    ws = init_workspace(path or workspace)
    out.print(f"workspace ready: {ws.root}  (settings: {ws.config_file})", highlight=False)
    if names is not None:
        out.print(f"categories: {', '.join(declare_classes(ws, names))}", highlight=False)


@command()
def ingest(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder of images (searched recursively).")],
    source: Annotated[Source, typer.Option(help="'user' for real photos, 'web' for web images.")] = Source.user,
    labeled: Annotated[bool, typer.Option(help="Take labels from class folder names (imagenet style).")] = False,
    items: Annotated[Path | None, typer.Option(help="CSV with columns path,item_id.")] = None,
    classes: Annotated[str | None, typer.Option(help="With --labeled: your categories, separated by commas; a "
                                                "photo takes the first folder on its path named like one.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="With --labeled: take the folder names as categories even "
                                      "if they look like projects or dates, or hold few photos.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Add a folder of images to the manifest (idempotent), group them into items, assign splits.

    With --labeled, prints the categories it made and their photo counts. Exit code 1 if any file could not
    be read (each listed with why; the others are added), like sort.

    Example: sortloop ingest ~/photos/labeled --source user --labeled
    """
    from loop.data.classes import parse_class_list
    from loop.data.ingest import ingest_folder
    from loop.workspace import open_workspace

    ws = open_workspace(workspace)
    names = parse_class_list(classes) if classes is not None else None
    with progress_bar("ingesting") as on_progress:
        report = ingest_folder(ws, folder, source=source.value, labeled=labeled, items_csv=items, classes=names,
                               check_folders=not yes, on_progress=on_progress)
    out.print(report.summary())
    for path, reason in report.unreadable:
        console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False)
    if report.unreadable:
        raise typer.Exit(1)


@command()
def labels(
    label: Annotated[str | None, typer.Option(help="Only this class ('none': unlabeled).")] = None,
    source: Annotated[str | None, typer.Option(help="Only 'user' or 'web' photos.")] = None,
    label_source: Annotated[str | None, typer.Option(help="Only labels from folder, review, user_move...")] = None,
    flag: Annotated[str | None, typer.Option(help="Only this flag (low_confidence, user_moved; 'none').")] = None,
    review: Annotated[str | None, typer.Option(help="Only this review status (queued, pushed, reviewed, "
                                               "skipped; 'none').")] = None,
    split: Annotated[str | None, typer.Option(help="Only 'train' or 'valid' ('none': no side yet).")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (every column, full sha256).")] = False,
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """List, filter and export the labels in the manifest.

    Example: sortloop labels --label chair --review reviewed --csv > chairs.csv
    """
    from loop.data.labels import filter_labels
    from loop.workspace import open_workspace

    rows = filter_labels(open_workspace(workspace), label=label, source=source, label_source=label_source,
                         flag=flag, review=review, split=split)
    if as_json:
        return print_json(json.loads(rows.to_json(orient="records")))
    if as_csv:
        return out.file.write(rows.to_csv(index=False))
    if not rows.empty:
        short = rows.assign(image_id=rows["image_id"].str[:12], pred_conf=rows["pred_conf"].round(3)).astype(object)
        out.print(short.where(short.notna(), "-").to_string(index=False), highlight=False, markup=False)
    console.print(f"{len(rows)} photo(s)", highlight=False)


@command()
def history(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="A photo's path, or a prefix of its sha256.")],
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Show one photo's label history: who changed it, from what to what, when, and through which way.

    Example: sortloop history ~/photos/sorted/chair/IMG_0001.JPG
    """
    from loop.data.labels import image_history
    from loop.workspace import open_workspace

    found = image_history(open_workspace(workspace), image)
    if as_json:
        return print_json({"image": json.loads(found.row.to_json(date_format="iso")),
                           "changes": json.loads(found.changes.to_json(orient="records", date_format="iso"))})
    out.print("\n".join(found.lines()), highlight=False, markup=False)


# --- the whole loop -------------------------------------------------------------------------------


@command()
def start(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Your unsorted photos (searched recursively; "
                                           "never changed).")],
    per_class: Annotated[int, typer.Option(min=1, max=100, help="Photos per category in the first batch "
                                           "to label.")] = 8,
    workspace: WorkspaceOption = None,
) -> None:
    """Start from an archive where nothing is sorted: add its photos, send the first ones to label for review.

    Declare your categories first (`sortloop init --classes ...`). The first batch covers the archive: the
    most typical photo of each group of similar ones, about --per-class per category. Label them in Label
    Studio, then `review pull`, `train`, `deploy` and `sort`.

    Example: sortloop init --classes table,console,cabinet && sortloop start ~/Photos/archive
    """
    from loop.workspace import open_workspace
    from sortloop.first_steps.start import start_archive

    ws = open_workspace(workspace)
    with progress_bar("preparing") as on_progress:
        report = start_archive(ws, folder, per_class=per_class, on_progress=on_progress,
                               on_step=lambda name, text: console.print(f"{name}: {text}", highlight=False,
                                                                        markup=False))
    out.print(report.lines()[-1], highlight=False, soft_wrap=True)
    run = lambda args: cli_hint(args, ws.root)  # noqa: E731
    out.print(f"then: {run('review pull')} && {run('train')} && {run('deploy')}", highlight=False, soft_wrap=True)


@command()
def demo(
    labeled: Annotated[Path, typer.Option(help="Folder of class folders to learn from.")],
    new: Annotated[Path, typer.Option(help="Folder of photos to sort as your new photos (class folders in it are "
                                      "an answer key for --simulate-review, never labels); the same as "
                                      "--labeled: sort held-out photos of it.")],
    dest: Annotated[Path, typer.Option(help="Where the sorted copies go (<dest>/<category>/).")],
    items: Annotated[Path | None, typer.Option(help="Optional CSV path,item_id for the labeled folder.")] = None,
    holdout: Annotated[float, typer.Option(min=0.0, max=0.9, help="With --new = --labeled: share of each class's "
                                           "items held out of training and sorted as new photos.")] = 0.3,
    review: Annotated[bool, typer.Option(help="Start the local Label Studio and push flagged photos.")] = True,
    simulate_review: Annotated[int, typer.Option(min=0, metavar="N", help="Then play the reviewer: label the first N "
                                                 "photos review push sent with their true class, retrain, gate, "
                                                 "re-sort.")] = 0,
    workspace: WorkspaceOption = None,
) -> None:
    """Run the whole loop once: ingest, train, deploy, sort the new photos, start Label Studio, push.

    Example: sortloop demo --labeled ../shared/data/ikea_products --new ../shared/data/rooms --dest data/sorted
    --simulate-review 40
    """
    from sortloop.demo import run_loop_once

    report = run_loop_once(
        labeled, new, dest, workspace=workspace, items_csv=items, holdout=holdout, with_review=review,
        on_step=lambda name, result: out.print(f"[bold]{name}[/bold]: {escape(result)}", highlight=False),
        step_progress=progress_bar,
    )
    if simulate_review:
        from loop.workspace import open_workspace
        from sortloop.demo_review import simulate_review as play_reviewer

        played = play_reviewer(open_workspace(report.workspace), simulate_review, step_progress=progress_bar)
        out.print("\n".join(played.lines()), highlight=False, markup=False)
    again = " ".join(["demo", "--labeled", shlex.quote(str(labeled)), "--new", shlex.quote(str(new)), "--dest",
                      shlex.quote(str(dest)), *(["--no-review"] if not review else []), "--simulate-review 40"])
    out.print("\n".join(next_steps(report, again)), highlight=False)
    if not report.sort_ok:
        raise typer.Exit(1)


def next_steps(report: Any, simulate: str) -> list[str]:
    """What to do after `demo`, as commands that run as printed."""
    run = lambda args: cli_hint(args, report.workspace)  # noqa: E731
    lines = ["", "[bold]Next steps[/bold]"]
    if report.review_url:
        login = f" (login {report.username}" + (f", password {report.password} - shown once, also in "
                                                f"{report.workspace}/labelstudio/credentials.json" if report.password
                                                else "") + ")"
        lines.append(f"  1. review the flagged photos in your browser: {report.review_url}{login}")
    else:
        lines.append(f"  1. start the review server and send the flagged photos: {run('labelstudio up')} && "
                     f"{run('review push')}")
    lines += [f"  2. bring the reviewers' labels back:  {run('review pull')}",
              f"  3. train a candidate model:           {run('train')}",
              f"  4. deploy it unless it is worse:      {run('deploy')}",
              f"  or keep the loop running (pull, push, scan {report.dest}, nightly retrain): {run('serve')}",
              f"  no reviewer at hand? play one: {run(simulate)}"]
    typed = run("x").split()[0]
    if typed != "sortloop":
        lines.append(f"  (or `source {Path(typed).parent}/activate` once, then type plain `sortloop`)")
    return lines


# --- sorting -------------------------------------------------------------------------------------------


@command()
def sort(
    src: Annotated[Path, typer.Argument(metavar="SRC",
                                        help="Folder of photos to sort (searched recursively; never changed).")],
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="Sorted tree: copies go to DEST/<category>/.")],
    keep_tree: Annotated[bool | None, typer.Option("--keep-tree/--flat", help="Keep SRC's sub-folders under "
                                                   "each category (default: sort.keep_tree, true).")] = None,
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Copy every photo under SRC into DEST/<predicted category>/ with the deployed model; flag unsure ones.

    Rerunning copies nothing already sorted. Exit code 1 if any file could not be sorted (listed with why).
    With --ray, a Ray cluster decodes, predicts and copies (SRC and DEST mounted at the same path on every
    node); records and flags are written here.

    Example: sortloop sort ~/photos/inbox ~/photos/sorted   (on a cluster: --ray --ray-address head:6379)
    """
    from loop.sorting.folder import sort_folder

    ws = _with_ray(workspace, ray_address)
    with progress_bar("sorting") as on_progress:
        report = sort_folder(ws, src, dest, keep_tree=keep_tree, engine="ray" if ray else None,
                             on_progress=on_progress)
    out.print(report.summary(), highlight=False, soft_wrap=True)
    from loop.folders.watchlist import add_sorted_tree

    if add_sorted_tree(ws, dest):  # `serve` scans it for moves from now on (`watch list` shows it)
        out.print(f"registered {dest.expanduser().resolve()} for `serve` to scan for corrections "
                  f"(undo: {cli_hint(f'watch remove-tree {shlex.quote(str(dest))}', ws.root)})",
                  highlight=False, soft_wrap=True)
    for path, reason in report.failed:
        console.print(f"[yellow]not sorted[/yellow] {path}: {reason}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@command()
def scan(
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="A tree written by `sortloop sort`.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Find sorted copies a person moved to another category folder and record them as corrections.

    Example: sortloop scan ~/photos/sorted
    """
    from loop.folders.corrections import scan as scan_tree
    from loop.workspace import open_workspace

    with progress_bar("scanning") as on_progress:
        report = scan_tree(open_workspace(workspace), dest, on_progress=on_progress)
    out.print(report.summary(), highlight=False, soft_wrap=True)


@command()
def select(
    budget: Annotated[int, typer.Option(help="How many photos to choose.", min=0)] = 50,
    strategy: Annotated[str | None, typer.Option(help="random, least_confidence, margin, entropy, hybrid, badge "
                                                 "or typiclust (default: review.strategy).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print; do not queue them for review.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the selection as JSON.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Choose which unlabeled or flagged photos a reviewer sees next, and queue them for `review push`.

    Example: sortloop select --budget 50 --strategy hybrid
    """
    from loop.review.queue import choose
    from loop.workspace import open_workspace

    with progress_bar("selecting") as on_progress:
        chosen = choose(open_workspace(workspace), budget, strategy, dry_run=dry_run, on_progress=on_progress)
    if as_json:
        return print_json({"strategy": chosen.strategy, "used": chosen.used, "candidates": chosen.candidates,
                           "selected": [{"image_id": i, "path": p, "guess": g} for i, p, g in
                                        zip(chosen.image_ids, chosen.paths, chosen.pred_labels, strict=True)]})
    for rank, (path, guess) in enumerate(zip(chosen.paths, chosen.pred_labels, strict=True), start=1):
        out.print(f"{rank:4d}  {guess or '?':<20} {path}", highlight=False, soft_wrap=True)
    out.print(chosen.summary() + ("" if dry_run else "; queued for `sortloop review push`"), highlight=False)


@command()
def audit(
    folds: Annotated[int, typer.Option(help="Item-grouped folds for out-of-fold probabilities.", min=2)] = 5,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list suspects; do not flag them.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the suspects as JSON.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Find labels that are probably wrong (confident learning on out-of-fold probabilities) and flag them.

    Suspects are flagged `suspected_mislabel` with the model's alternative as the guess; `review push`
    sends them like any flag.

    Example: sortloop audit --dry-run
    """
    from loop.review.audit import audit as run_audit
    from loop.workspace import open_workspace

    with progress_bar("auditing") as on_progress:
        report = run_audit(open_workspace(workspace), folds=folds, flag=not dry_run, on_progress=on_progress)
    if as_json:
        return print_json(report.suspects.to_dict(orient="records"))
    for row in report.suspects.head(30).itertuples():
        out.print(f"{row.score:5.2f}  {row.label} -> {row.alternative:<16} {row.path}", highlight=False,
                  soft_wrap=True)
    out.print(report.summary(), highlight=False)


@command()
def apply(
    dest: Annotated[Path | None, typer.Argument(help="A tree written by `sortloop sort` (default: every one).")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Move sorted copies of labeled photos (reviews, confirmed moves) to their label's category folder.

    Only copies sortloop made and nobody moved or edited move; `review pull` runs this by itself.

    Example: sortloop apply ~/photos/sorted
    """
    from loop.folders.apply import apply_labels
    from loop.workspace import open_workspace

    out.print(apply_labels(open_workspace(workspace), dest).summary(), highlight=False, soft_wrap=True)


@command()
def resort(
    dest: Annotated[Path, typer.Argument(help="A tree written by `sortloop sort`.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the moves (old -> new class, both "
                                          "confidences); change nothing.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Move copies no person has checked to the class the deployed model gives them now (logged; undoable).

    Photos a person labeled, reviewed or moved are never re-routed. Undo a run with `sortloop undo`.

    Example: sortloop resort ~/photos/sorted --dry-run
    """
    from loop.folders.resort import resort as run_resort
    from loop.workspace import open_workspace

    with progress_bar("re-sorting") as on_progress:
        report = run_resort(open_workspace(workspace), dest, dry_run=dry_run, on_progress=on_progress)
    out.print(report.summary(), highlight=False, soft_wrap=True, markup=False)


@command()
def undo(
    run: Annotated[str | None, typer.Argument(help="The re-sort run id (default: the latest not undone).")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Put back the copies a re-sort moved, with their old predictions and flags.

    Example: sortloop undo
    """
    from loop.folders.resort import undo_resort
    from loop.workspace import open_workspace

    out.print(undo_resort(open_workspace(workspace), run).summary(), highlight=False, soft_wrap=True)


@command()
def bundle(
    target: Annotated[Path, typer.Argument(metavar="OUT", help="Bundle folder to write (or zip file with --zip).")],
    zip_: Annotated[bool, typer.Option("--zip", help="Write one zip file instead of a folder.")] = False,
    sorter: Annotated[Path | None, typer.Option(help="A sortloop-sort folder frozen elsewhere from the same spec "
                                                     "(e.g. the Windows CI build); default: build one here.")] = None,
    for_platform: Annotated[str | None, typer.Option("--platform", help="windows, linux or macos (default: the "
                                                     "--sorter's system, else this one). Another system than this "
                                                     "one needs --sorter.")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Write a standalone sorter with the deployed model, for a PC with no Python (runs `sortloop-sort SRC DEST`).

    Its copies are recorded in DEST/.sortloop/; `sortloop scan DEST` brings them (and moves) back here.

    Example: sortloop bundle ~/sorter-v0003 --zip --sorter ~/Downloads/sortloop-sort-windows/sortloop-sort
    """
    from loop.workspace import open_workspace
    from sortloop.bundle import build_bundle

    with console.status("building the sorter bundle (a minute or two the first time)"):
        report = build_bundle(open_workspace(workspace), target, as_zip=zip_, sorter=sorter, for_platform=for_platform)
    out.print(report.summary(), highlight=False, soft_wrap=True)


# --- model ---------------------------------------------------------------------------------------------


@command()
def train(
    mode: Annotated[TrainMode | None, typer.Option(help="'head' (linear head on cached features) or 'finetune' "
                                                   "(fastai); default: model.train_mode.")] = None,
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    force: Annotated[bool, typer.Option("--force", help="Train even if the labels and settings are those of the "
                                        "newest version.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Train a candidate model from the labeled manifest rows and store it as a new version (not deployed).

    Every label trains except the small gate set; metrics, calibration and flag sizing come from
    item-grouped cross-validation. With nothing new to learn from, it says so and makes no version.

    With --ray, the features of photos not in the feature cache yet are computed on a Ray cluster (the
    workspace mounted at the same path on every node).

    Example: sortloop train --mode head
    """
    from loop.learning.train import train as run_training

    ws = _with_ray(workspace, ray_address)
    if ray:
        ws.settings.model.feature_engine = "ray"
    with progress_bar("training") as on_progress:
        result = run_training(ws, mode=mode and mode.value, force=force, on_progress=on_progress)
    out.print(result.summary(), highlight=False)
    if not result.unchanged:
        promote = cli_hint(f"deploy {result.version}", ws.root)
        out.print(f"candidate stored in {result.model_dir}; promote it with: {promote}", highlight=False)


@command()
def deploy(
    version: Annotated[str | None, typer.Argument(metavar="VERSION",
                                                  help="Version to promote (default: the newest).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the gate refuses (logged).")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Promote a candidate unless it is significantly worse than the deployed model.

    Both models are compared on the same photos neither trained on: your labeled set (the gate set) and
    your photos labeled since the last model (reviews, moves: the deployed model as it is, the candidate out
    of fold). It is refused if it is significantly worse overall or on a class on either (exact McNemar /
    binomial tests, Holm-corrected at gate.alpha), or if it dropped a class that still has labels. A tie or
    a loss that is not significant promotes: the candidate learned from more labels.

    Example: sortloop deploy v0003
    """
    from loop.learning.deployment import deploy as run_gate
    from loop.workspace import open_workspace

    with progress_bar("evaluating") as on_progress:
        decision = run_gate(open_workspace(workspace), version, force=force, on_progress=on_progress)
    out.print(decision.summary(), highlight=False, markup=False)
    if not decision.promoted and not decision.unchanged:
        raise typer.Exit(2)


@command()
def rollback(workspace: WorkspaceOption = None) -> None:
    """Restore the previously deployed model version.

    Example: sortloop rollback
    """
    from loop.learning.deployment import rollback as run_rollback
    from loop.workspace import open_workspace

    out.print(f"deployed model is now {run_rollback(open_workspace(workspace))}")


@command()
def models(
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """List model versions with their validation metrics and the gate's last verdict; * marks the deployed one.

    The verdict compares the deployed model with the version (deployed -> version) on your labeled set and
    on your photos labeled since the last model.

    Example: sortloop models --json
    """
    from loop.learning.deployment import describe_versions
    from loop.learning.gate import describe_evidence
    from loop.workspace import open_workspace

    rows = describe_versions(open_workspace(workspace))
    if as_json:
        return print_json(rows)
    for r in rows:
        acc = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
        out.print(f"{'*' if r['deployed'] else ' '} {r['version']}  {r['train_mode'] or '?':8s} labeled set "
                  f"{acc(r['user_valid_accuracy'])} (n={r['user_valid_n']})  web-valid {acc(r['web_valid_accuracy'])}"
                  f"  {str(r['created_at'])[:16]}", highlight=False)
        if r["gate"] and r["gate"]["evidence"]:
            out.print(f"      {r['gate']['event']}: {describe_evidence(r['gate']['evidence'])}", highlight=False)


# --- service -------------------------------------------------------------------------------------------


@command()
def serve(
    init: Annotated[bool, typer.Option("--init", help="Create the workspace first if needed (containers).")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Run the loop as a service: pull/push reviews, scan sorted trees, sort inboxes, retrain nightly.

    One per workspace (a lock refuses a second one); stop with Ctrl-C or SIGTERM.

    Example: sortloop serve --workspace ./data
    """
    import logging

    from loop.workspace import init_workspace, open_workspace
    from sortloop.jobs import job_log_path
    from sortloop.schedule import describe_jobs
    from sortloop.schedule import serve as run_service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler.scheduler").setLevel(logging.WARNING)  # job runs are logged by sortloop.jobs
    quiet_library_logs()
    ws = init_workspace(workspace) if init else open_workspace(workspace)

    def started(scheduler: Any) -> None:
        console.print(f"serving {ws.root} (job log {job_log_path(ws)}; Ctrl-C to stop):", markup=False)
        for line in describe_jobs(ws, scheduler, sortloop=sortloop_command()):
            console.print(f"  {line}", markup=False, highlight=False)

    run_service(ws, on_started=started)
    console.print("stopped", highlight=False)


@command()
def status(
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Show the deployed model, candidates, labels, splits, flags, jobs and Label Studio reachability.

    Example: sortloop status --json
    """
    from loop.workspace import open_workspace
    from sortloop.status import collect_status, format_status

    result = collect_status(open_workspace(workspace))
    if as_json:
        print_json(result)
    else:
        out.print(format_status(result), highlight=False, markup=False, soft_wrap=True)


@command()
def report(workspace: WorkspaceOption = None) -> None:
    """Write an HTML report with plots (accuracy per version, recall, confusion, labels, flags).

    Example: sortloop report && xdg-open data/report/index.html
    """
    from loop.workspace import open_workspace
    from sortloop.report import write_report

    out.print(f"report written: {write_report(open_workspace(workspace))}", highlight=False)


# --- labeling -------------------------------------------------------------------------------------------

app.add_typer(labelstudio_app, name="labelstudio")
app.add_typer(review_app, name="review")
app.add_typer(watch_app, name="watch")


def main() -> None:  # pragma: no cover
    app()
