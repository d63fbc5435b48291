"""The workspace: one folder holding the manifest, label history, model registry, caches and the embedded
Label Studio's data. Everything sortloop writes on its own account goes here (sorted copies go to the
destination the user names, nothing else goes anywhere).

Caveat: the workspace is found as `--workspace`, else `$SORTLOOP_WORKSPACE`, else `./data`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from loop.atomic import atomic_write, remove_stale_temps
from loop.config import CONFIG_FILENAME, DEFAULT_TOML, Settings, load_settings
from loop.errors import WorkspaceError

if TYPE_CHECKING:
    import tomlkit

DEFAULT_WORKSPACE = Path("data")


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace folder, and its settings."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILENAME

    @property
    def manifest_dir(self) -> Path:
        return self.root / "manifest"

    @property
    def history_dir(self) -> Path:
        return self.root / "history"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def runs_dir(self) -> Path:
        """Per-run records: sort logs, scheduler job store, reports."""
        return self.root / "runs"

    @property
    def labelstudio_dir(self) -> Path:
        return self.root / "labelstudio"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @cached_property
    def settings(self) -> Settings:
        return load_settings(self.config_file)

    def folders(self) -> list[Path]:
        return [self.manifest_dir, self.history_dir, self.models_dir, self.cache_dir, self.runs_dir]

    def private_folders(self) -> list[Path]:
        """Folders of files derived from the user's photos (resized copies, features, the report's
        thumbnails): owner-only, so a photo readable only by its owner stays so in every derived form."""
        return [self.cache_dir, self.report_dir]


PRIVATE_MODE = 0o700


def make_private(folder: Path) -> Path:
    """Create `folder` owner-only, or take the group/other bits off an existing one (older versions made
    them 0755); returns it. One chmod, not a walk: the files inside are reachable only through it."""
    folder.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
    if os.name == "posix" and folder.stat().st_mode & 0o077:
        os.chmod(folder, PRIVATE_MODE)
    return folder


def resolve_root(path: Path | str | None = None) -> Path:
    """The workspace folder: `path`, else `$SORTLOOP_WORKSPACE`, else `./data` (absolute)."""
    chosen = path or os.environ.get("SORTLOOP_WORKSPACE") or DEFAULT_WORKSPACE
    return Path(chosen).expanduser().resolve()


def _folder_or_error(root: Path) -> Path:
    """`root`, unless it (or a folder above it) is a file: a workspace is a folder (one line, no traceback)."""
    for place in (root, *root.parents):
        if place.exists() and not place.is_dir():
            raise WorkspaceError(f"{place} is a file, not a workspace folder; give a folder (e.g. -w ./data)")
        if place.exists():
            break
    return root


def init_workspace(path: Path | str | None = None) -> Workspace:
    """Create (or complete) a workspace; an existing config file is never overwritten.

    Example:
        >>> ws = init_workspace("/tmp/ws")   # doctest: +SKIP
        >>> ws.config_file.exists()
        True
    """
    ws = Workspace(_folder_or_error(resolve_root(path)))
    ws.root.mkdir(parents=True, exist_ok=True)
    for folder in ws.folders():
        folder.mkdir(exist_ok=True)
    for folder in ws.private_folders():
        make_private(folder)
    if not ws.config_file.exists():
        ws.config_file.write_text(DEFAULT_TOML)
    ws.settings  # noqa: B018  (fail now, with the key named, if the config is bad)
    return ws


def open_workspace(path: Path | str | None = None) -> Workspace:
    """An existing workspace; raises WorkspaceError with the fix if it was never initialised.

    Also removes the temp files that writes killed midway left behind (`loop.atomic.remove_stale_temps`;
    a live process's are kept): in the workspace's own folders, not in the caches (recomputable, and too
    many files to walk at every start) nor in Label Studio's server data.
    """
    ws = Workspace(_folder_or_error(resolve_root(path)))
    if not ws.config_file.exists():
        raise WorkspaceError(f"{ws.root} is not a sortloop workspace; run `sortloop init {ws.root}` first")
    for folder, recursive in ((ws.root, False), (ws.manifest_dir, True), (ws.history_dir, True),
                              (ws.models_dir, True), (ws.runs_dir, True), (ws.labelstudio_dir, False)):
        remove_stale_temps(folder, recursive=recursive)
    for folder in ws.private_folders():
        if folder.exists():
            make_private(folder)
    return ws


def edit_config(ws: Workspace, change: Callable[[tomlkit.TOMLDocument], None]) -> None:
    """Edit the workspace config in place with `change(document)`, keeping its comments (tomlkit).

    The new text must load as a whole valid config before it replaces the file (atomically, under a lock),
    so a bad edit or a crash leaves the old file in place.
    """
    import tomlkit
    from filelock import FileLock

    with FileLock(str(ws.config_file) + ".lock", timeout=30):
        doc = tomlkit.parse(ws.config_file.read_text() if ws.config_file.exists() else "")
        change(doc)
        new_text = tomlkit.dumps(doc)
        with tempfile.NamedTemporaryFile("w", dir=ws.root, prefix=".check-", suffix=".toml") as check:
            check.write(new_text)
            check.flush()
            load_settings(Path(check.name))  # the whole file must still be a valid config
        with atomic_write(ws.config_file, "w") as fh:
            fh.write(new_text)
    ws.__dict__.pop("settings", None)  # the Workspace caches its settings
