"""The embedded Label Studio server: `up`, `down`, `status`, and where to connect (embedded or a team's).

The embedded server is the `label-studio` console script of the *same* Python environment (installed by
the `sortloop[labelstudio]` extra), run as Django `runserver` on 127.0.0.1 with SQLite, its data dir at
`<workspace>/labelstudio/server`. On the first start sortloop creates an admin user with a generated
password and a legacy API token, stores them in `<workspace>/labelstudio/credentials.json` (mode 0600) and
enables legacy token auth for the organisation (`LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN`).

Local files: `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT` is the workspace's served folder
(`labeling.served`), which holds only the pushed photos; nothing outside it can be asked for, and inside
it Label Studio serves a file only to a logged-in user of a project with a storage covering it.
Files: the whole `<workspace>/labelstudio/` tree is owner-only (folders 0700, files 0600: the SQLite
database holds the admin token too); `up` makes it so, also for files left by older versions, and the
server runs with umask 077 so everything it creates later is owner-only as well.

Caveat: legacy token auth can only be switched on when the organisation is created, i.e. on the very first
start of a data dir; a data dir created by hand without it answers 401 to the stored token.
A team server is used instead when `labelstudio.url` is set; its token comes from
`SORTLOOP_LABELSTUDIO_TOKEN`: a Personal Access Token (what Label Studio 1.23 issues by default; the SDK
exchanges it for short-lived access tokens) or a legacy token where the team enabled those.
The token and password are never written to a log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from labeling import private, served
from loop.atomic import process_alive, write_json_atomic
from loop.errors import LabelStudioError
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

TOKEN_ENV = "SORTLOOP_LABELSTUDIO_TOKEN"


@dataclass(frozen=True)
class Credentials:
    """Login of the embedded server's admin (stored owner-only; never logged)."""

    username: str
    password: str
    token: str

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"Credentials(username={self.username!r}, password=***, token=***)"


@dataclass(frozen=True)
class Connection:
    """Where to reach Label Studio and how to authenticate."""

    url: str
    token: str  # a legacy API token or a Personal Access Token (JWT); the SDK handles both
    embedded: bool
    source: str = "the API token"  # where the token came from, for error messages

    def __repr__(self) -> str:
        return f"Connection(url={self.url!r}, token=***, embedded={self.embedded})"


@dataclass(frozen=True)
class ServerInfo:
    """What `up` and `status` report."""

    url: str
    running: bool
    pid: int | None
    embedded: bool
    data_dir: Path | None
    credentials: Credentials | None = None
    first_start: bool = False  # credentials were just created: show them to the user once
    startup_s: float | None = None
    foreign: bool = False  # the embedded URL answers, but not with this workspace's server


def data_dir(ws: Workspace) -> Path:
    return ws.labelstudio_dir / "server"


def credentials_path(ws: Workspace) -> Path:
    return ws.labelstudio_dir / "credentials.json"


def pid_path(ws: Workspace) -> Path:
    return ws.labelstudio_dir / "server.pid"


def log_path(ws: Workspace) -> Path:
    return ws.labelstudio_dir / "server.log"


def embedded_url(ws: Workspace) -> str:
    cfg = ws.settings.labelstudio
    return f"http://{cfg.host}:{cfg.port}"


# --- credentials ------------------------------------------------------------------------------------


def new_credentials(username: str) -> Credentials:
    """A fresh admin login: generated password and a 40-hex-digit legacy API token."""
    return Credentials(username=username, password=secrets.token_urlsafe(18), token=secrets.token_hex(20))


def write_credentials(path: Path, creds: Credentials) -> None:
    """Store credentials readable by the owner only (0600), created with that mode from the start."""
    data = {"username": creds.username, "password": creds.password, "token": creds.token}
    write_json_atomic(path, data, perms=0o600)


def read_credentials(path: Path) -> Credentials | None:
    """The stored credentials, or None if there are none yet."""
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        return Credentials(username=raw["username"], password=raw["password"], token=raw["token"])
    except (ValueError, KeyError) as exc:
        raise LabelStudioError(f"{path} is damaged ({exc.__class__.__name__}); delete it together with "
                               f"{path.parent / 'server'} to start Label Studio afresh") from None


# --- process ----------------------------------------------------------------------------------------


def label_studio_executable() -> Path:
    """The `label-studio` script next to this Python; a clear error if the extra is not installed."""
    exe = Path(sys.executable).parent / "label-studio"
    if not exe.exists():
        raise LabelStudioError(
            f"Label Studio is not installed in this environment ({exe} missing); "
            "run `pip install 'sortloop[labelstudio]'` or set labelstudio.url to a running server"
        )
    return exe


def server_env(
    data: Path, creds: Credentials, *, document_root: Path, base: dict[str, str] | None = None,
    local_webhooks: bool = False,
) -> dict[str, str]:
    """Environment for a non-interactive `label-studio start` (SQLite, no telemetry, local files served
    from `document_root` only: the served folder of pushed photos).

    `local_webhooks` turns Label Studio's SSRF protection off so it may call sortloop's webhook receiver on
    127.0.0.1 (it also lets admins import tasks from local URLs; only set with `labelstudio.webhook_port`).
    """
    env = dict(os.environ if base is None else base)
    for key in ("DJANGO_DB", "DATABASE_NAME", "LABEL_STUDIO_DATABASE_NAME", "LABEL_STUDIO_HOST", "HOST"):
        env.pop(key, None)  # SQLite in the data dir, URLs relative to where it is served
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data),
            # username + password every start: without them `start` prompts when the user exists
            "LABEL_STUDIO_USERNAME": creds.username,
            "LABEL_STUDIO_PASSWORD": creds.password,
            "LABEL_STUDIO_USER_TOKEN": creds.token,  # applied only when the user is created
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # read only when the organisation is created
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if local_webhooks:
        env["SSRF_PROTECTION_ENABLED"] = "false"
    return env


def start_process(
    data: Path, creds: Credentials, *, host: str, port: int, log_file: Path, document_root: Path,
    local_webhooks: bool = False,
) -> subprocess.Popen:
    """Launch `label-studio start` detached in its own session, umask 077; returns the process (the server)."""
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cmd = [str(label_studio_executable()), "start", "--no-browser", "--internal-host", host, "--port", str(port)]
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with open(fd, "ab") as log:
        return subprocess.Popen(
            cmd, env=server_env(data, creds, document_root=document_root, local_webhooks=local_webhooks),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=data, umask=private.SERVER_UMASK,
        )


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True if `url/health` answers 200."""
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float, log_file: Path | None = None) -> float:
    """Poll `/health` until it answers; returns seconds waited.

    Raises:
        LabelStudioError: the process died, or `timeout_s` passed (the message points at the log).
    """
    start = time.monotonic()
    where = f"; see {log_file}" if log_file else ""
    while time.monotonic() - start < timeout_s:
        if is_healthy(url):
            return time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            raise LabelStudioError(f"Label Studio exited with code {proc.returncode} before it was ready{where}")
        time.sleep(0.5)
    raise LabelStudioError(f"Label Studio did not answer at {url}/health within {timeout_s:.0f} s{where}")


def stop_process(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    logger.warning("Label Studio (pid %d) ignored SIGTERM; killing it", pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    return process_alive(pid)


def _read_pid(ws: Workspace) -> dict | None:
    path = pid_path(ws)
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        pid = int(info["pid"])
    except (ValueError, KeyError):
        return None
    return info if _alive(pid) and _is_label_studio(pid) else None


def _is_label_studio(pid: int) -> bool:
    """Guard against a recycled pid: the process must be a `label-studio` command."""
    try:
        return b"label-studio" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc").is_dir()  # no procfs (macOS): trust the pid file


# --- the three commands -----------------------------------------------------------------------------


def up(ws: Workspace) -> ServerInfo:
    """Start the embedded Label Studio (or find it running) and wait until it is healthy.

    The first start creates the data dir (migrations: about a minute), the admin user and the token, and
    returns them in `credentials` with `first_start=True` so the caller can show them once.

    Raises:
        LabelStudioError: `labelstudio.url` points at a team server, Label Studio is not installed, the
            port is taken by something else, or the server did not become healthy in
            `labelstudio.start_timeout_s`.

    Example:
        >>> info = up(open_workspace("data"))   # doctest: +SKIP
        >>> info.url
        'http://127.0.0.1:8080'
    """
    cfg = ws.settings.labelstudio
    if cfg.url:
        raise LabelStudioError(f"labelstudio.url is set ({cfg.url}): that server is managed elsewhere, not by `up`")
    url = embedded_url(ws)
    data = data_dir(ws)
    root = served.prepare(ws).parent  # also makes labelstudio/ owner-only
    private.make_owner_only(ws.labelstudio_dir)
    running = _read_pid(ws)
    if running and is_healthy(url):
        if running.get("document_root") == str(root):
            return ServerInfo(url, True, int(running["pid"]), True, data, read_credentials(credentials_path(ws)))
        logger.warning("Label Studio (pid %s) serves files from %s; restarting it to serve %s only",
                       running["pid"], running.get("document_root", "/"), root)
        down(ws)
    if is_healthy(url):
        raise LabelStudioError(f"something else already answers at {url}; stop it or set labelstudio.port")
    creds = read_credentials(credentials_path(ws))
    first = creds is None or not (data / "label_studio.sqlite3").exists()
    if creds is None:
        creds = new_credentials(cfg.username)
        write_credentials(credentials_path(ws), creds)  # before the start, so a crash cannot lose them
    proc = start_process(data, creds, host=cfg.host, port=cfg.port, log_file=log_path(ws), document_root=root,
                         local_webhooks=cfg.webhook_port > 0)
    write_json_atomic(pid_path(ws), {"pid": proc.pid, "url": url, "document_root": str(root),
                                     "started_at": datetime.now(UTC).isoformat()}, perms=0o600)
    logger.info("started Label Studio pid %d at %s (data %s)", proc.pid, url, data)
    try:
        waited = wait_healthy(url, proc, cfg.start_timeout_s, log_path(ws))
    except LabelStudioError:
        stop_process(proc.pid)
        pid_path(ws).unlink(missing_ok=True)
        raise
    return ServerInfo(url, True, proc.pid, True, data, creds, first_start=first, startup_s=waited)


def down(ws: Workspace) -> bool:
    """Stop the embedded server; returns False if it was not running."""
    info = _read_pid(ws)
    pid_path(ws).unlink(missing_ok=True)
    if info is None:
        return False
    stop_process(int(info["pid"]))
    logger.info("stopped Label Studio pid %s", info["pid"])
    return True


def status(ws: Workspace) -> ServerInfo:
    """Whether the configured server (embedded or team) answers, without starting anything."""
    cfg = ws.settings.labelstudio
    if cfg.url:
        return ServerInfo(cfg.url.rstrip("/"), is_healthy(cfg.url.rstrip("/")), None, False, None)
    info = _read_pid(ws)  # None when this workspace did not start it (it may still answer: someone else's)
    url = embedded_url(ws)
    answers = is_healthy(url)
    ours = info is not None or (answers and _accepts_our_token(ws, url))
    return ServerInfo(url, answers and ours, int(info["pid"]) if info else None, True, data_dir(ws),
                      foreign=answers and not ours)


def _accepts_our_token(ws: Workspace, url: str) -> bool:
    """Whether a server this workspace did not start still accepts its stored token (a shared server)."""
    creds = read_credentials(credentials_path(ws))
    if creds is None:
        return False
    try:
        answer = httpx.get(f"{url}/api/current-user/whoami", headers={"Authorization": f"Token {creds.token}"},
                           timeout=5.0)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def connection(ws: Workspace) -> Connection:
    """URL and token to use: a team server (`labelstudio.url` + `SORTLOOP_LABELSTUDIO_TOKEN`) or the embedded one.

    The token may be a legacy API token or a Personal Access Token; `labeling.client` handles both.

    Raises:
        LabelStudioError: no token is available, with the fix.
    """
    cfg = ws.settings.labelstudio
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    if cfg.url:
        if not env_token:
            raise LabelStudioError(f"labelstudio.url is {cfg.url} but {TOKEN_ENV} is not set; "
                                   "put that server's API token in it")
        return Connection(cfg.url.rstrip("/"), env_token, embedded=False, source=f"the token in {TOKEN_ENV}")
    creds = read_credentials(credentials_path(ws))
    if env_token:
        return Connection(embedded_url(ws), env_token, embedded=True, source=f"the token in {TOKEN_ENV}")
    if creds is None:
        raise LabelStudioError("no Label Studio credentials yet; run `sortloop labelstudio up` first "
                               f"(or set labelstudio.url and {TOKEN_ENV} for a team server)")
    return Connection(embedded_url(ws), creds.token, embedded=True,
                      source=f"the token in {credentials_path(ws)}")
