"""Files that are never seen half-written: write beside, fsync, rename; and durable JSON-lines appends.

Why one module: the manifest, model files, caches, the deployed-model pointer, Label Studio state and
credentials all need "readers see the old file or the new one, never a torn one", and the logs (label
history, registry decisions, job runs) all need "an appended line survives a crash right after".
Caveat: temp files are hidden (`.name.xxx.tmp`) in the target folder; a kill -9 mid-write can leave one
behind (harmless; sortloop never reads hidden files).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


@contextmanager
def atomic_write(path: Path | str, mode: str = "wb", *, perms: int = 0o644, durable: bool = True) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on success it replaces `path` in one rename.

    Args:
        mode: "wb" or "w" (text, UTF-8).
        perms: the file's permission bits, set before any byte is written (0o600 for secrets).
        durable: fsync before the rename (off for caches that can be recomputed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows (Python < 3.13) has no fchmod and no such bits
            os.fchmod(fd, perms)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path | str, data: Any, *, perms: int = 0o644, **dump_options: Any) -> None:
    """`json.dump` into `path` through `atomic_write` (durable)."""
    with atomic_write(path, "w", perms=perms) as fh:
        json.dump(data, fh, **dump_options)


def append_jsonl(path: Path | str, records: Iterable[Any], **dump_options: Any) -> None:
    """Append one JSON line per record to `path` and fsync, so the lines survive a crash right after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, **dump_options) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path | str) -> list[Any]:
    """Every record of a JSON-lines file, oldest first ([] if absent). A damaged line — the torn last line
    of a crash mid-append — is logged and skipped, so a log stays readable whatever happened to it."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring a damaged line in %s", path)
    return records
