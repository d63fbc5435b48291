"""The model registry: versions in `<workspace>/models/<version>/`, a `current.json` pointer, a decision log.

Why a pointer file: switching the deployed model is one `os.replace` of a tiny JSON, so a sort that is
reading the pointer sees either the old version or the new one, never half of each. Versions are never
deleted by sortloop, so any earlier model can be restored.
Caveat: version names are `v0001`, `v0002`, ... allocated under a lock; do not create them by hand.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from loop.atomic import append_jsonl, read_jsonl, write_json_atomic
from loop.errors import ModelError
from loop.model.artifact import SPEC_FILE
from loop.tables import locked
from loop.workspace import Workspace


def pointer_path(ws: Workspace) -> Path:
    return ws.models_dir / "current.json"


def log_path(ws: Workspace) -> Path:
    return ws.models_dir / "registry.jsonl"


def model_dir(ws: Workspace, version: str) -> Path:
    """Folder of one version; raises ModelError (listing what exists) if there is none."""
    path = ws.models_dir / version
    if not (path / SPEC_FILE).exists():
        known = ", ".join(list_versions(ws)) or "none"
        raise ModelError(f"no model version {version!r} in {ws.models_dir} (versions: {known})")
    return path


def list_versions(ws: Workspace) -> list[str]:
    """All complete versions, oldest first."""
    if not ws.models_dir.exists():
        return []
    return sorted(p.name for p in ws.models_dir.iterdir() if p.is_dir() and (p / SPEC_FILE).exists())


REPAIR = "`sortloop deploy VERSION` or `sortloop rollback` rewrites it"


def current_version(ws: Workspace) -> str | None:
    """The deployed version, or None if nothing was ever deployed.

    Raises:
        ModelError: `current.json` is torn or not sortloop's (one line naming the repair: `deploy` and
            `rollback` rewrite it, see `loop.gate`).
    """
    path = pointer_path(ws)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is damaged ({type(exc).__name__}); {REPAIR} "
                         f"(versions: {', '.join(list_versions(ws)) or 'none'})") from None
    version = data.get("version") if isinstance(data, dict) else None
    if not isinstance(version, str) or "/" in version or "\\" in version or version.startswith("."):
        known = ", ".join(list_versions(ws)) or "none"
        raise ModelError(f"{path} names no model version; {REPAIR} (versions: {known})")
    return version


def current_model_dir(ws: Workspace) -> Path:
    """Folder of the deployed model; raises ModelError with the fix if there is none."""
    version = current_version(ws)
    if version is None:
        raise ModelError("no model is deployed yet; run `sortloop train` then `sortloop deploy`")
    return model_dir(ws, version)


def new_version_dir(ws: Workspace) -> tuple[str, Path]:
    """Reserve the next version name and create its (empty) folder."""
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    with locked(ws.models_dir / "versions"):
        taken = [p.name for p in ws.models_dir.iterdir() if p.is_dir() and p.name.startswith("v")]
        numbers = [int(n[1:]) for n in taken if n[1:].isdigit()]
        version = f"v{max(numbers, default=0) + 1:04d}"
        path = ws.models_dir / version
        path.mkdir()
    return version, path


def set_current(ws: Workspace, version: str) -> None:
    """Atomically point `current.json` at `version` (which must exist)."""
    model_dir(ws, version)
    write_json_atomic(pointer_path(ws), {"version": version, "since": datetime.now(UTC).isoformat()})


def append_log(ws: Workspace, event: dict) -> None:
    """Append one decision (promoted, refused, rolled back, ...) to the registry log."""
    append_jsonl(log_path(ws), [{"at": datetime.now(UTC).isoformat(), **event}])


def read_log(ws: Workspace) -> list[dict]:
    """Every registry decision, oldest first (a line torn by a crash is skipped)."""
    return read_jsonl(log_path(ws))
