"""What every `sortloop` command shares: the consoles, global options, friendly errors, progress bars.

Global options (`sortloop -w DIR -v --json <command>`) are read by the root callback in `sortloop.cli` and
stored on the click context; `friendly_errors` fills a command's own `workspace`/`as_json` from them unless
the command was given its own on the command line (so `sortloop <command> -w DIR` keeps working).
Caveat: only the application layer prints; library modules log and report progress through callbacks.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from typer.core import TyperCommand

from loop.errors import DiskFullError, SortloopError, is_disk_full
from loop.progress import ProgressCallback

# soft_wrap: never break a line at the console width (a pipe or log file gets whole lines, printed commands
# stay copy-pasteable); a terminal wraps long lines itself.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", envvar="SORTLOOP_WORKSPACE", show_envvar=False,
                 help="Workspace folder (default $SORTLOOP_WORKSPACE, else ./data)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


@dataclass
class GlobalOptions:
    """What the root callback read: `sortloop -w DIR -v --json <command>`."""

    workspace: Path | None = None
    verbose: int = 0
    as_json: bool = False


# HTTP client libraries log every request at INFO (URL-encoded filters and all): only with -vv.
CHATTY_LOGGERS = ("httpx", "httpcore", "urllib3")
_verbosity = 0


def set_global_options(ctx: typer.Context, options: GlobalOptions) -> None:
    """Store the global options on the root context and turn on logging for -v/-vv."""
    global _verbosity
    ctx.obj = options
    _verbosity = options.verbose
    if options.verbose:
        logging.basicConfig(level=logging.DEBUG if options.verbose > 1 else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_library_logs()


def quiet_library_logs() -> None:
    """Keep the HTTP libraries' request lines out of the console unless -vv was given."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if _verbosity > 1 else logging.WARNING)


def _apply_global_options(ctx: typer.Context, kwargs: dict[str, Any]) -> None:
    """Fill `workspace` and `as_json` from the global options unless the command line gave them itself."""
    glob = ctx.find_root().obj
    if not isinstance(glob, GlobalOptions):
        return
    if "workspace" in kwargs and glob.workspace is not None:
        source = ctx.get_parameter_source("workspace")
        if source is None or source.name != "COMMANDLINE":
            kwargs["workspace"] = glob.workspace
    if "as_json" in kwargs and glob.as_json:
        kwargs["as_json"] = True


_CTX = "_sortloop_ctx"


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Apply the global options, and turn SortloopError (and a full disk anywhere) into a one-line message and
    exit code 1; a command stopped midway (DiskFullError) first prints the summary of what it did.

    The wrapper asks typer for the click context through an extra keyword-only parameter added to its
    signature (typer injects a `typer.Context`-typed parameter); the command itself never sees it.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.pop(_CTX, None)
        if ctx is not None:
            _apply_global_options(ctx, kwargs)
        try:
            return func(*args, **kwargs)
        except (SortloopError, OSError) as exc:
            if not isinstance(exc, SortloopError) and not is_disk_full(exc):
                raise
            if isinstance(exc, DiskFullError) and exc.summary:
                out.print(exc.summary, highlight=False, markup=False, soft_wrap=True)
            message = exc if isinstance(exc, SortloopError) else DiskFullError(exc.filename or "a folder it writes")
            console.print(Text.assemble(("error:", "red"), f" {message}"), highlight=False)
            raise typer.Exit(getattr(message, "exit_code", 1)) from None

    sig = inspect.signature(func, eval_str=True)
    extra = inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])  # type: ignore[attr-defined]
    return wrapper


class PlainUsageCommand(TyperCommand):
    """A command whose usage line reads `sortloop sort [OPTIONS] SRC DEST` (typer writes `{SRC} {DEST}`)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


def command_of(app: typer.Typer, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@app.command(...)` with global options, friendly errors and a plain usage line."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        return app.command(*args, cls=PlainUsageCommand, **kwargs)(friendly_errors(func))

    return decorate


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressCallback]:
    """A rich progress bar on stderr; yields an `on_progress(done, total)` callback for the library.

    The bar appears only once there is something to count (never "0/0"), and is erased if the work
    fails, so an error is not preceded by a half-drawn bar.
    """
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=False)
    task: list[Any] = []

    def update(done: int, total: int | None) -> None:
        if not total:  # nothing to count (e.g. every feature already cached): never show "0/0"
            return
        if not task:
            bar.start()
            task.append(bar.add_task(description, total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    except BaseException:
        bar.live.transient = True
        raise
    finally:
        if task:
            bar.stop()


def print_json(data: Any) -> None:
    """JSON on stdout, unwrapped, non-ASCII kept."""
    out.print_json(json.dumps(data, default=str, ensure_ascii=False))


def sortloop_command() -> str:
    """How to type `sortloop` here: `sortloop` if on PATH, else the script's path (e.g. `.venv/bin/sortloop`)."""
    script = Path(sys.executable).parent / "sortloop"
    on_path = shutil.which("sortloop")
    if on_path and (not script.exists() or Path(on_path).resolve() == script.resolve()):
        return "sortloop"
    if not script.exists():
        return "sortloop"
    try:
        return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script)
    except ValueError:  # another drive (Windows)
        return str(script)


def cli_hint(args: str, workspace: Path | None = None) -> str:
    """A command line the user can paste: `<sortloop> [-w WS] args`, -w only when WS is not the default."""
    from loop.workspace import resolve_root

    parts = [sortloop_command()]
    if workspace is not None and Path(workspace).resolve() != resolve_root(None):
        parts += ["-w", _quote(str(workspace))]
    return " ".join([*parts, args])


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
