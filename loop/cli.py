"""The `sortloop` command line: a thin typer layer; each command calls one library function and prints.

Library errors (`SortloopError`) become one red line and exit code 1; there are no tracebacks for
expected failures. Shared options (workspace) are defined once here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loop.errors import SortloopError
from loop.progress import ProgressCallback

app = typer.Typer(
    help="Sort photos into category folders with a classifier that learns from your corrections.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", envvar="SORTLOOP_WORKSPACE", help="Workspace folder (default ./data)."),
]


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SortloopError into a one-line message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SortloopError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@app.command` with friendly errors."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        return app.command(*args, **kwargs)(friendly_errors(func))

    return decorate


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressCallback]:
    """A rich progress bar on stderr; yields an `on_progress(done, total)` callback for the library."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


# --- workspace and data -----------------------------------------------------------------------------


@command()
def init(path: Annotated[Path | None, typer.Argument(help="Workspace folder (default ./data).")] = None) -> None:
    """Create a workspace: config file with documented defaults, manifest, history, models, caches.

    Example: sortloop init ./data
    """
    from loop.workspace import init_workspace

    ws = init_workspace(path)
    out.print(f"workspace ready: {ws.root}  (settings: {ws.config_file})")


@command()
def ingest(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    source: Annotated[str, typer.Option(help="'user' for real photos, 'web' for web images.")] = "user",
    labeled: Annotated[bool, typer.Option(help="Take labels from class folder names (imagenet style).")] = False,
    items: Annotated[Path | None, typer.Option(help="CSV with columns path,item_id.")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Add a folder of images to the manifest (idempotent), group them into items, assign splits.

    Example: sortloop ingest ~/photos/labeled --source user --labeled
    """
    from loop.ingest import ingest_folder
    from loop.workspace import open_workspace

    ws = open_workspace(workspace)
    with progress_bar("ingesting") as on_progress:
        report = ingest_folder(ws, folder, source=source, labeled=labeled, items_csv=items, on_progress=on_progress)
    out.print(report.summary())
    for path, reason in report.unreadable:
        console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False)


def main() -> None:  # pragma: no cover
    app()
