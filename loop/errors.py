"""The small family of errors sortloop raises on purpose.

Every message says what went wrong and what to do next; the CLI prints it as one line and exits non-zero.
Anything else escaping the library is a bug.
"""

import errno


class SortloopError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1  # what the CLI exits with


class UnknownChoiceError(SortloopError, ValueError):
    """An option got a value that is none of its choices (a typo): a usage error, like click's."""

    exit_code = 2


class ConfigError(SortloopError):
    """A configuration value is missing or invalid (the message names the key)."""


class WorkspaceError(SortloopError):
    """The workspace is missing, not initialised, or locked by another process."""


class IngestRefused(SortloopError):
    """`ingest --labeled` was given folders that do not look like categories (the message says how to go on)."""


class ManifestError(SortloopError):
    """The manifest cannot be read or written."""


class ImageError(SortloopError):
    """An image file cannot be read; `reason` says why in a few words."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ModelError(SortloopError):
    """No usable model, a missing backbone weight file, or an artifact that does not load."""


class LabelStudioError(SortloopError):
    """Label Studio is unreachable, misconfigured, or answered with an error."""


class DiskFullError(SortloopError, OSError):
    """The disk (or the user's quota) under `path` is full. Nothing already done is lost: writes are
    atomic, so a rerun after freeing space continues. `summary` (set by the command that stopped) says what
    was done before it stopped. Also an OSError, so code that handles I/O errors still sees it as one."""

    def __init__(self, path: object, summary: str = ""):
        self.message = (f"no space left on the disk holding {path}; free some space there and run the command "
                        "again (nothing done so far is lost)")
        super().__init__(self.message)
        self.path = path
        self.summary = summary
        self.errno, self.strerror = errno.ENOSPC, "No space left on device"

    def __str__(self) -> str:
        return self.message


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left on device" and "disk quota exceeded"."""
    return isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in _NO_SPACE)


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def first_disk_full(exc: OSError, first: OSError | None) -> OSError:
    """A run's first full-disk error (`first`, else `exc`); any other OSError is re-raised.

    A full disk stops a run, but what it did is still recorded before the error is reported (`sort`).
    """
    if not is_disk_full(exc):
        raise exc
    return first or exc


def stopped_by_full_disk(exc: OSError, where: object, summary: str) -> DiskFullError:
    """The one error a run stopped by a full disk raises: the disk's path (`exc`'s, else `where`) and what
    the run did before it stopped (`summary`)."""
    return DiskFullError(getattr(exc, "path", None) or exc.filename or where, summary=summary)


class ClassNameError(SortloopError):
    """A class name that cannot be a category folder (path separators, hidden, empty...)."""
