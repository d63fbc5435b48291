"""The small family of errors sortloop raises on purpose.

Every message says what went wrong and what to do next; the CLI prints it as one line and exits non-zero.
Anything else escaping the library is a bug.
"""


class SortloopError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class ConfigError(SortloopError):
    """A configuration value is missing or invalid (the message names the key)."""


class WorkspaceError(SortloopError):
    """The workspace is missing, not initialised, or locked by another process."""


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


class ClassNameError(SortloopError):
    """A class name that cannot be a category folder (path separators, hidden, empty...)."""
