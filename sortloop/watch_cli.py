"""`sortloop watch add|list|remove|add-tree|remove-tree`: what `serve` sorts and scans, without editing TOML.

Each command calls one `loop.folders.watchlist` function and prints. Caveat: a running `serve` schedules the
watch and scan jobs at start-up, so restart it after registering the first inbox or sorted tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sortloop.console import JsonOption, WorkspaceOption, cli_hint, command_of, out, print_json

watch_app = typer.Typer(help="Inboxes `serve` sorts and sorted trees it scans for user moves.\n\n"
                        "Example: sortloop watch add ~/Photos/inbox ~/Photos/sorted && sortloop watch list",
                        no_args_is_help=True)


def _restart_note(ws) -> str:  # noqa: ANN001
    from sortloop.schedule import is_serving

    return " (restart `sortloop serve` to schedule it)" if is_serving(ws) else ""


@command_of(watch_app, "add")
def add(
    inbox: Annotated[Path, typer.Argument(metavar="INBOX", help="Folder where new photos arrive.")],
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="Sorted tree the photos are copied into.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Sort new photos arriving in INBOX into DEST every few minutes while `serve` runs (DEST is scanned too).

    Example: sortloop watch add ~/photos/inbox ~/photos/sorted
    """
    from loop.folders.watchlist import add_inbox
    from loop.workspace import open_workspace

    ws = open_workspace(workspace)
    added = add_inbox(ws, inbox, dest)
    out.print(f"{'watching' if added else 'already watching'} {inbox.resolve()} -> {dest.resolve()}"
              f"{_restart_note(ws) if added else ''}", highlight=False)


@command_of(watch_app, "remove")
def remove(
    inbox: Annotated[Path, typer.Argument(metavar="INBOX", help="A watched inbox.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Stop sorting INBOX (no file is touched).

    Example: sortloop watch remove ~/photos/inbox
    """
    from loop.folders.watchlist import remove_inbox
    from loop.workspace import open_workspace

    removed = remove_inbox(open_workspace(workspace), inbox)
    out.print(f"{'no longer watching' if removed else 'was not watching'} {inbox.resolve()}", highlight=False)


@command_of(watch_app, "add-tree")
def add_tree(
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="A tree written by `sortloop sort`.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Scan DEST every hour while `serve` runs: photos moved to another category folder become corrections.

    Example: sortloop watch add-tree ~/photos/sorted
    """
    from loop.folders.watchlist import add_sorted_tree
    from loop.workspace import open_workspace

    ws = open_workspace(workspace)
    added = add_sorted_tree(ws, dest)
    out.print(f"{'scanning' if added else 'already scanning'} {dest.resolve()}{_restart_note(ws) if added else ''}",
              highlight=False)


@command_of(watch_app, "remove-tree")
def remove_tree(
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="A scanned sorted tree.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Stop scanning DEST (no file is touched).

    Example: sortloop watch remove-tree ~/photos/sorted
    """
    from loop.folders.watchlist import remove_sorted_tree
    from loop.workspace import open_workspace

    removed = remove_sorted_tree(open_workspace(workspace), dest)
    out.print(f"{'no longer scanning' if removed else 'was not scanning'} {dest.resolve()}", highlight=False)


@command_of(watch_app, "list")
def list_(as_json: JsonOption = False, workspace: WorkspaceOption = None) -> None:
    """List the watched inboxes and the scanned sorted trees.

    Example: sortloop watch list --json
    """
    from loop.workspace import open_workspace
    from sortloop.jobs import sorted_trees

    ws = open_workspace(workspace)
    inboxes = [{"inbox": str(s), "dest": str(d)} for s, d in ws.settings.schedule.inboxes]
    trees = [str(t) for t in sorted_trees(ws)]
    if as_json:
        return print_json({"inboxes": inboxes, "sorted_trees": trees})
    for pair in inboxes:
        out.print(f"watch {pair['inbox']} -> {pair['dest']}", highlight=False)
    for tree in trees:
        out.print(f"scan  {tree}", highlight=False)
    if not inboxes and not trees:
        out.print(f"nothing registered: {cli_hint('watch add INBOX DEST', ws.root)}, "
                  f"{cli_hint('watch add-tree DEST', ws.root)}", highlight=False)
