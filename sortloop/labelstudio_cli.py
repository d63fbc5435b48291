"""`sortloop labelstudio up|down|status` and `sortloop review push|pull`: thin typer sub-apps.

Each command calls one library function and prints; `sortloop.cli` mounts them with `app.add_typer`.
Caveat: the embedded server's password is printed only by the `up` that created it (it is also stored,
owner-readable, in `<workspace>/labelstudio/credentials.json`); the API token is never printed.
"""

from __future__ import annotations

import typer

from sortloop.console import JsonOption, WorkspaceOption, command_of, console, out, print_json, progress_bar

labelstudio_app = typer.Typer(help="Run the embedded Label Studio review server.\n\n"
                              "Example: sortloop labelstudio up && sortloop labelstudio status", no_args_is_help=True)
review_app = typer.Typer(help="Send flagged photos to Label Studio and bring reviewers' labels back.\n\n"
                         "Example: sortloop review push && sortloop review pull", no_args_is_help=True)


@command_of(labelstudio_app, "up")
def up(workspace: WorkspaceOption = None) -> None:
    """Start the local Label Studio (first start: about a minute, creates the admin login) and wait for it.

    Example: sortloop labelstudio up
    """
    from labeling.server import credentials_path, status, up
    from loop.workspace import open_workspace

    ws = open_workspace(workspace)
    if not status(ws).running:
        console.print("starting Label Studio (the first start takes about a minute)...")
    info = up(ws)
    out.print(f"Label Studio is running at [bold]{info.url}[/bold] (pid {info.pid})", highlight=False)
    if info.credentials is not None:
        out.print(f"login: {info.credentials.username}", highlight=False, soft_wrap=True)
        if info.first_start:
            out.print(f"password (shown once; stored in {credentials_path(ws)}): {info.credentials.password}",
                      highlight=False, soft_wrap=True)


@command_of(labelstudio_app, "down")
def down(workspace: WorkspaceOption = None) -> None:
    """Stop the local Label Studio.

    Example: sortloop labelstudio down
    """
    from labeling.server import down
    from loop.workspace import open_workspace

    out.print("stopped Label Studio" if down(open_workspace(workspace)) else "Label Studio was not running")


@command_of(labelstudio_app, "status")
def status(
    as_json: JsonOption = False, workspace: WorkspaceOption = None
) -> None:
    """Say whether Label Studio (embedded or `labelstudio.url`) answers; exit 1 if it does not.

    Example: sortloop labelstudio status --json
    """
    from labeling.server import status
    from loop.workspace import open_workspace

    info = status(open_workspace(workspace))
    if as_json:
        print_json({"url": info.url, "running": info.running, "pid": info.pid, "embedded": info.embedded,
                    "other_server_answers": info.foreign})
    elif info.foreign:
        out.print(f"this workspace's Label Studio is NOT running; something else answers at {info.url} (another "
                  "workspace's server?): stop it, or set labelstudio.port", highlight=False)
    else:
        kind = "embedded" if info.embedded else "team server"
        out.print(f"{kind} Label Studio at {info.url}: {'running' if info.running else 'NOT running'}",
                  highlight=False)
    if not info.running:
        raise typer.Exit(1)


@command_of(review_app, "push")
def push(
    limit: int | None = typer.Option(None, help="Push at most this many (most useful first)."),
    workspace: WorkspaceOption = None,
) -> None:
    """Send flagged photos to Label Studio as tasks with the model's guess pre-filled (idempotent).

    Exit code 1 if a photo could not be sent (e.g. a symlink leaving its folder); the others are sent.

    Example: sortloop review push
    """
    from labeling.push import push
    from loop.workspace import open_workspace

    with progress_bar("pushing") as on_progress:
        report = push(open_workspace(workspace), limit=limit, on_progress=on_progress)
    out.print(report.summary(), highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@command_of(review_app, "pull")
def pull(workspace: WorkspaceOption = None) -> None:
    """Bring reviewers' labels made since the last pull into the manifest and label history; sorted copies follow.

    Exit code 1 if a label was rejected (not a known class); the others are applied.

    Example: sortloop review pull
    """
    from loop.workspace import open_workspace
    from sortloop.jobs import pull_reviews

    report = pull_reviews(open_workspace(workspace))
    out.print(report.summary())
    for r in report.rejected:
        console.print(f"[red]rejected[/red] task {r.task_id} (image {r.image_id[:12]}): {r.reason}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@command_of(review_app, "listen")
def listen(workspace: WorkspaceOption = None) -> None:
    """Pull as soon as a reviewer saves, via a Label Studio webhook (needs labelstudio.webhook_port). Ctrl-C stops.

    Example: SORTLOOP_LABELSTUDIO__WEBHOOK_PORT=8099 sortloop review listen
    """
    import time

    from labeling.webhook import listen, receiver_url
    from loop.workspace import open_workspace
    from sortloop.jobs import pull_reviews

    ws = open_workspace(workspace)
    receiver = listen(ws, on_event=lambda: out.print(pull_reviews(ws).summary(), highlight=False))
    out.print(f"listening for Label Studio at {receiver_url(ws)}; Ctrl-C stops", highlight=False)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
