"""What every `sortloop` command shares: the consoles, the workspace option, friendly errors, progress bars.

Caveat: only the application layer prints; library modules log and report progress through callbacks.
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

from loop.errors import DiskFullError, SortloopError, is_disk_full
from loop.progress import ProgressCallback

console = Console(stderr=True)
out = Console()

WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", envvar="SORTLOOP_WORKSPACE", help="Workspace folder (default ./data)."),
]


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SortloopError (and a full disk anywhere) into a one-line message and exit code 1; a command
    stopped midway (DiskFullError) first prints the summary of what it did."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (SortloopError, OSError) as exc:
            if not isinstance(exc, SortloopError) and not is_disk_full(exc):
                raise
            if isinstance(exc, DiskFullError) and exc.summary:
                out.print(exc.summary, highlight=False, markup=False, soft_wrap=True)
            message = exc if isinstance(exc, SortloopError) else DiskFullError(exc.filename or "a folder it writes")
            console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def command_of(app: typer.Typer, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@app.command(...)` with friendly errors."""

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
