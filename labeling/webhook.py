"""Optional: pull as soon as a reviewer saves, through a Label Studio webhook (ANNOTATION_CREATED/UPDATED).

The receiver is a tiny HTTP server on `labelstudio.host:labelstudio.webhook_port`. Label Studio sends a
shared secret in an `X-Sortloop-Secret` header (stored owner-only in `<workspace>/labelstudio/
webhook_secret`); a request without it is refused with 403. A valid call only *wakes* a worker thread,
which runs the ordinary incremental `pull` (debounced, one at a time), so the pull stays the source of
truth: a lost or forged-but-valid call changes nothing a scheduled pull would not.
Caveat: Label Studio delivers webhooks synchronously inside the reviewer's save (1 s timeout), so the
receiver answers at once and pulls afterwards. Webhooks to 127.0.0.1 need the embedded server started with
`webhook_port` set (it then disables Label Studio's SSRF protection); a team server must be able to reach
this machine.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from labeling.client import Client
from loop.errors import LabelStudioError, SortloopError
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

PATH = "/labelstudio/webhook"
HEADER = "X-Sortloop-Secret"
ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
SOCKET_TIMEOUT_S = 10.0  # a caller that stops sending mid-request is dropped (Label Studio itself waits 1 s)
REQUEST_DEADLINE_S = 15.0  # a whole request, however it drips in: then the connection is closed
MAX_CONNECTIONS = 16  # open at once; more are closed at once (Label Studio sends one call per save)


def secret_path(ws: Workspace) -> Path:
    return ws.labelstudio_dir / "webhook_secret"


def webhook_secret(ws: Workspace) -> str:
    """The shared secret, created (mode 0600) on first use."""
    path = secret_path(ws)
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_hex(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value


def receiver_url(ws: Workspace) -> str:
    cfg = ws.settings.labelstudio
    return f"http://{cfg.host}:{cfg.webhook_port}{PATH}"


def ensure_webhook(client: Client, ws: Workspace, project_id: int) -> Any:
    """Register (or update) the project's webhook to this workspace's receiver; idempotent. Returns the SDK's model."""
    url = receiver_url(ws)
    body = {"url": url, "send_payload": False, "send_for_all_actions": False,
            "headers": {HEADER: webhook_secret(ws)}, "is_active": True, "actions": ACTIONS}
    for hook in client.call(f"list webhooks of project {project_id}", client.webhooks.list, project=str(project_id)):
        if hook.url == url:
            return client.call(f"update webhook {hook.id}", client.webhooks.update, hook.id, **body)
    try:
        return client.call(f"register a webhook for project {project_id}", client.webhooks.create, idempotent=False,
                           project=project_id, **body)
    except LabelStudioError as exc:
        if "reserved network" in str(exc) or "403" in str(exc):
            raise LabelStudioError(f"{exc}; start the embedded server with labelstudio.webhook_port set "
                                   "(`sortloop labelstudio down && sortloop labelstudio up`)") from None
        raise


class Receiver:
    """Receives webhook calls and runs `on_event()` (default: `pull(ws)`) in one worker thread.

    Args:
        ws: the workspace (host, port, secret).
        on_event: what to run after a valid call; calls arriving meanwhile coalesce into one more run.
        debounce_s: wait this long after a call before running, so a burst of saves is one pull.
        socket_timeout_s: a connection idle this long mid-request is closed, so a stalled or hostile
            caller cannot hold a receiver thread forever.
        request_deadline_s: a connection is closed this long after it opened, however slowly its bytes
            drip in (the socket timeout is per read).
        max_connections: connections handled at once; one more is closed unanswered.
    """

    def __init__(self, ws: Workspace, *, on_event: Callable[[], object] | None = None, debounce_s: float = 1.0,
                 socket_timeout_s: float = SOCKET_TIMEOUT_S, request_deadline_s: float = REQUEST_DEADLINE_S,
                 max_connections: int = MAX_CONNECTIONS):
        cfg = ws.settings.labelstudio
        if cfg.webhook_port <= 0:
            raise LabelStudioError("labelstudio.webhook_port is 0 (off); set a port to receive webhooks")
        self.ws = ws
        self.secret = webhook_secret(ws)
        self.debounce_s = debounce_s
        self.socket_timeout_s = socket_timeout_s
        self.request_deadline_s = request_deadline_s
        self.on_event = on_event or self._pull
        self.calls = 0  # valid calls received
        self.runs = 0  # on_event runs completed
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._server = _CappedServer((cfg.host, cfg.webhook_port), self._handler(), max_connections)
        self._threads = [threading.Thread(target=self._server.serve_forever, name="webhook-http", daemon=True),
                         threading.Thread(target=self._work, name="webhook-pull", daemon=True)]

    def _pull(self) -> object:
        from labeling.pull import pull

        return pull(self.ws)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = receiver.socket_timeout_s  # socketserver sets it on the connection: reads cannot hang

            def setup(self) -> None:
                super().setup()
                self._deadline = threading.Timer(receiver.request_deadline_s, self._expire)
                self._deadline.daemon = True
                self._deadline.start()

            def _expire(self) -> None:  # the whole request took too long: its reads end now
                logger.warning("webhook caller %s exceeded %.0f s; disconnected", self.client_address[0],
                               receiver.request_deadline_s)
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                self._deadline.cancel()
                with contextlib.suppress(OSError):  # the deadline may have closed it under us
                    super().finish()

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    self.send_error(400, "bad Content-Length")
                    return
                self.rfile.read(max(0, min(length, 1 << 20)))  # drain; the payload is not trusted or needed
                given = self.headers.get(HEADER, "")
                if self.path != PATH:
                    self.send_response(404)
                elif not hmac.compare_digest(given.encode(), receiver.secret.encode()):
                    logger.warning("webhook call without the right secret from %s", self.client_address[0])
                    self.send_response(403)
                else:
                    receiver.calls += 1
                    receiver._wake.set()
                    self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                logger.debug("webhook: " + format, *args)

        return Handler

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(timeout=0.5):
                continue
            if self._stop.wait(self.debounce_s):
                return
            self._wake.clear()
            try:
                self.on_event()
            except SortloopError as exc:  # the next call or scheduled pull retries; nothing is lost
                logger.error("pull after webhook failed: %s", exc)
            except Exception:  # never let one bad pull end the thread while the receiver keeps answering 204
                logger.exception("pull after webhook failed; the next call retries")
            self.runs += 1

    def start(self) -> Receiver:
        """Start serving (a no-op if already started, so `with listen(ws):` works)."""
        if self._threads[0].is_alive():
            return self
        for t in self._threads:
            t.start()
        logger.info("webhook receiver listening on %s", receiver_url(self.ws))
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._threads[0].is_alive():
            self._server.shutdown()  # blocks until serve_forever returns, so only when it runs
        self._server.server_close()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=10)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _CappedServer(ThreadingHTTPServer):
    """A threading HTTP server that handles at most `max_connections` connections at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int):
        self.max_connections = max_connections
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            logger.warning("webhook: %d connections open; closing one more from %s", self.max_connections,
                           client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def listen(ws: Workspace, *, on_event: Callable[[], object] | None = None, debounce_s: float = 1.0) -> Receiver:
    """Register the webhook on the workspace's project and start a receiver that pulls on each save.

    Args:
        on_event: what a valid call triggers (default: `pull(ws)`).

    Raises:
        LabelStudioError: webhooks are off, no project exists yet (push first), or the server refuses.

    Example:
        >>> with listen(open_workspace("data")):   # doctest: +SKIP
        ...     time.sleep(3600)
    """
    from labeling.client import connect
    from labeling.project import find_project

    receiver = Receiver(ws, on_event=on_event, debounce_s=debounce_s)
    try:
        with connect(ws) as client:
            project = find_project(client, ws)
            if project is None:
                raise LabelStudioError("no sortloop project yet; run `sortloop review push` first")
            ensure_webhook(client, ws, int(project.id))
    except BaseException:
        receiver.stop()
        raise
    return receiver.start()
