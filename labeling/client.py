"""A small HTTP client for Label Studio's REST API, with retries on connection errors.

Why not the SDK here: sortloop needs a handful of endpoints, and plain JSON keeps the payloads in Label
Studio's own shape (built in `labeling.payloads`) without per-task model parsing, the SDK pager's extra
"Invalid page" request, or its silently ignored parameters (`only_annotated`, `ids=`). The SDK is still
used by the tests and the benchmark as an independent second client.

Caveat: only connection-level failures (refused, reset, timeouts) are retried, with exponential backoff;
an HTTP error answer is reported at once as a LabelStudioError naming the URL, status and reason.
The token is sent as `Authorization: Token ...` (legacy token) and never logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from loop.errors import LabelStudioError
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 5
DEFAULT_BACKOFF_S = 0.5  # 0.5, 1, 2, 4 s between attempts
DEFAULT_TIMEOUT_S = 600.0  # a 10k-task import takes ~20 s on 2 cores; exports of big projects longer


class Client:
    """An authenticated session with one Label Studio server.

    Args:
        url: base URL, e.g. `http://127.0.0.1:8080`.
        token: legacy API token.
        attempts: tries per request on connection errors (>= 1).
        backoff_s: first wait between tries; doubles each time.
    """

    def __init__(
        self, url: str, token: str, *, attempts: int = DEFAULT_ATTEMPTS, backoff_s: float = DEFAULT_BACKOFF_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        self.url = url.rstrip("/")
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Token {token}"}, timeout=timeout_s
        )

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        """Send one request; returns the decoded JSON (None for an empty body, or a 404 if `missing_ok`).

        Raises:
            LabelStudioError: unreachable after all attempts, or an HTTP error answer.
        """
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                response = self._http.request(method, path, **kwargs)
                break
            except httpx.TransportError as exc:
                if attempt == self.attempts:
                    raise LabelStudioError(
                        f"cannot reach Label Studio at {self.url} ({exc.__class__.__name__}: {exc}) after "
                        f"{self.attempts} attempts; is it running? (`sortloop labelstudio up`)"
                    ) from None
                logger.warning("Label Studio at %s: %s; retry %d/%d in %.1f s",
                               self.url, exc.__class__.__name__, attempt, self.attempts - 1, delay)
                time.sleep(delay)
                delay *= 2
        if response.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio at {self.url} refused the token ({response.status_code}: {_reason(response)}); "
                "check SORTLOOP_LABELSTUDIO_TOKEN or the workspace's labelstudio/credentials.json"
            )
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio at {self.url} answered {response.status_code} to {method} {path}: {_reason(response)}"
            )
        if not response.content:
            return None
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, json: Any = None, **params: Any) -> Any:
        return self.request("POST", path, json=json, params=params)

    def patch(self, path: str, json: Any = None) -> Any:
        return self.request("PATCH", path, json=json)

    def whoami(self) -> dict:
        """The user the token belongs to (`/api/current-user/whoami`)."""
        return self.get("/api/current-user/whoami")


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("validation_errors") or body
        return str(detail)[:300]
    return str(body)[:300]


def connect(ws: Workspace, *, attempts: int = DEFAULT_ATTEMPTS, backoff_s: float = DEFAULT_BACKOFF_S) -> Client:
    """An authenticated client for the workspace's Label Studio (embedded or `labelstudio.url`), checked live.

    Raises:
        LabelStudioError: no token, the server is unreachable after retries, or the token is refused.

    Example:
        >>> with connect(open_workspace("data")) as ls:   # doctest: +SKIP
        ...     ls.whoami()["email"]
        'admin@sortloop.local'
    """
    from labeling.server import connection

    conn = connection(ws)
    client = Client(conn.url, conn.token, attempts=attempts, backoff_s=backoff_s)
    try:
        client.whoami()
    except LabelStudioError:
        client.close()
        raise
    return client
