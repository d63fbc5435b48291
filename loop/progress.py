"""Progress reporting without printing: library functions take an optional `on_progress(done, total)`.

Why: only the CLI prints (a rich progress bar); the library and the scheduler stay quiet and testable.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int, int | None], None]


def no_progress(done: int, total: int | None) -> None:
    """The default callback: do nothing."""
