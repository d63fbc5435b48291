"""Files that are never seen half-written: write beside, fsync, rename; and durable JSON-lines appends.

Why one module: the manifest, model files, caches, the deployed-model pointer, Label Studio state and
credentials all need "readers see the old file or the new one, never a torn one", and the logs (label
history, registry decisions, job runs) all need "an appended line survives a crash right after".
A full disk is reported as `DiskFullError` (one line, "free space and run it again"), never a traceback.
Caveat: temp files are hidden (`.name.<pid>.xxx.tmp`) in the target folder; a kill -9 mid-write leaves
one behind, which `remove_stale_temps` deletes once its process is gone (run when a workspace is opened).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from loop.errors import DiskFullError, is_disk_full

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
# `.name.<host>-<pid>.<mkstemp's 8 random characters>.tmp`: host and pid tell a live writer's temp from a
# dead one's (a container sharing the workspace has its own host name and pid numbers)
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]*)-(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp$")
_OLD_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # written before pids were in the name
STALE_AFTER_S = 3600.0  # a temp without a live owner we can see (other host, old name) is stale after this

KILL_ENV = "SORTLOOP_TEST_KILL_AT"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32]


_HOST = _host()


def fault_point(event: str, path: Path) -> None:
    """Fault injection for the crash tests: `SORTLOOP_TEST_KILL_AT=event:file-name[:n]` makes this process
    SIGKILL itself at the n-th (default first) such event. Events: "tmp" (an atomic write's temp file was
    just created), "append" (about to append to a log), "appended" (the append is durable). Unset: no-op."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want_event, want_name, *count = spec.split(":")
    if (want_event, want_name) != (event, path.name):
        return
    seen = _fault_counts[spec] = _fault_counts.get(spec, 0) + 1
    if seen == int(count[0] if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)


_fault_counts: dict[str, int] = {}


@contextmanager
def atomic_write(path: Path | str, mode: str = "wb", *, perms: int = 0o644, durable: bool = True) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on success it replaces `path` in one rename.

    Args:
        mode: "wb" or "w" (text, UTF-8).
        perms: the file's permission bits, set before any byte is written (0o600 for secrets).
        durable: fsync before the rename (off for caches that can be recomputed).
    Raises:
        DiskFullError: the disk (or quota) is full; `path` is unchanged and no temp file is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise _as_disk_full(exc, path) from None
    fault_point("tmp", path)
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows (Python < 3.13) has no fchmod and no such bits
            os.fchmod(fd, perms)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _as_disk_full(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _as_disk_full(exc: OSError, path: Path) -> OSError:
    """`exc` itself, or a DiskFullError naming `path` when the disk or quota is full."""
    return DiskFullError(path) if is_disk_full(exc) else exc


def write_json_atomic(path: Path | str, data: Any, *, perms: int = 0o644, **dump_options: Any) -> None:
    """`json.dump` into `path` through `atomic_write` (durable)."""
    with atomic_write(path, "w", perms=perms) as fh:
        json.dump(data, fh, **dump_options)


def append_jsonl(path: Path | str, records: Iterable[Any], **dump_options: Any) -> None:
    """Append one JSON line per record to `path` and fsync, so the lines survive a crash right after.

    A last line torn by an earlier crash is ended first, so it can never swallow the first new record.
    Raises DiskFullError when the disk is full (the lines written so far may be torn; readers skip those).
    """
    path = Path(path)
    fault_point("append", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            text = "".join(json.dumps(record, **dump_options) + "\n" for record in records)
            if fh.tell() > 0 and not _ends_with_newline(path):
                text = "\n" + text
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _as_disk_full(exc, path) from None
    fault_point("appended", path)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def read_jsonl(path: Path | str) -> list[Any]:
    """Every record of a JSON-lines file, oldest first ([] if absent). A damaged line — the torn last line
    of a crash mid-append, even one torn inside a multi-byte character — is logged and skipped, so a log
    stays readable whatever happened to it (lines are split and decoded as bytes, one at a time)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("ignoring a damaged line (line %d) in %s", number, path)
    return records


def damaged_lines(path: Path | str) -> int:
    """How many lines `read_jsonl` skips in `path` (0 if absent): for `sortloop status`."""
    path = Path(path)
    if not path.exists():
        return 0
    damaged = 0
    for line in path.read_bytes().split(b"\n"):
        if line.strip():
            try:
                json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                damaged += 1
    return damaged


def remove_stale_temps(folder: Path, *, recursive: bool = True) -> list[Path]:
    """Delete the temp files of atomic writes that were killed, in `folder` (and its sub-folders).

    A temp is stale when the process named in it is gone (same host name), or, for a temp whose owner
    cannot be checked (another host or container, an older name), when it is older than STALE_AFTER_S; a
    live writer's temp is never touched.
    Returns the removed paths.
    """
    removed: list[Path] = []
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if not recursive:
            dirnames.clear()
        for name in filenames:
            match = _TEMP_NAME.match(name)
            if not match and not _OLD_TEMP_NAME.match(name):
                continue
            path = here / name
            try:
                old = now - path.stat().st_mtime > STALE_AFTER_S
                if old or (match and match["host"] == _HOST and not process_alive(int(match["pid"]))):
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone meanwhile (its writer renamed it), or not ours to delete
                continue
    if removed:
        logger.info("removed %d temp file(s) left by killed writes, e.g. %s", len(removed), removed[0])
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine and has not exited (a zombie has: it only awaits its
    parent). Used for a dead writer's temp files here, and for the embedded Label Studio's pid file."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False
