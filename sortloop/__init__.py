"""The application layer: what composes the core (`loop`) and the Label Studio adapter (`labeling`).

The CLI, the scheduled jobs and `serve`, the demo, status, report and bundle. Imports point down only:
the core never imports `labeling` or `sortloop`, and `labeling` never imports `sortloop`.

`main` is the `sortloop` command, and this module stays import-light on purpose: a sort's decode workers
are started with "spawn", and a spawned process first re-imports the parent's main script, the console
script, which imports this module. Had it imported the CLI (typer, rich, pydantic), every decode worker
would load them before its first photo: a spawned pool's first result came 0.50 s after its start instead
of 0.09 s on a 2-CPU machine.
"""

from __future__ import annotations


def main() -> None:
    """The `sortloop` command: run the CLI (`sortloop.cli.app`)."""
    from sortloop.cli import app  # here, not at the top: see the module docstring

    app()
