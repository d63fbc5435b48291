"""Label Studio through its official SDK (label-studio-sdk 2.x), with sortloop's retries and error messages.

`connect(ws)` returns a `Client`, which *is* a `label_studio_sdk.LabelStudio` (always built with an explicit
`base_url`: the SDK's default is port 8000, Label Studio's is 8080). The SDK picks the auth scheme from the
token: a legacy API token is sent as `Authorization: Token ...`; a Personal Access Token (a JWT refresh
token; the only kind a Label Studio 1.23 organisation accepts unless legacy tokens were enabled when it was
created) is exchanged at `POST /api/token/refresh/` for a short-lived access token sent as `Bearer ...`
and refreshed when it expires. So the embedded server's legacy token and a team's PAT both just work.

Library code calls the SDK's typed methods through `Client.call` (and `Client.pages` for paged lists),
which adds what the SDK lacks for an unattended loop:
* retries with exponential backoff on connection failures. For calls that are not idempotent (an import,
  a create) only failures *before* the request reached the server are retried, so a retry never imports
  twice; idempotent calls also retry 429/502/503/504 answers. The SDK's own `max_retries` is set to 0: it
  only covers some statuses (5xx, 408, 409, 429) and would repeat a POST import after a 5xx or 409;
* one `LabelStudioError` per failure, naming the URL: unreachable, the token refused (401/403, naming where
  the token came from, with a hint when the server has legacy tokens disabled), or the server's answer.

Caveat: the SDK parses every answer into pydantic models (about a millisecond per task) and importing it
takes a second or two; payloads are still built and read in Label Studio's own JSON shape
(`labeling.payloads`), the bulk read (`labeling.pull`) goes through an export snapshot whose download is
raw JSON, and the bulk import (`Client.import_tasks`) sends its body encoded once by `json.dumps`.
The token is never logged (the SDK redacts `Authorization` in its own debug logs).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from loop.errors import LabelStudioError
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ATTEMPTS = 5
DEFAULT_BACKOFF_S = 0.5  # 0.5, 1, 2, 4 s between attempts
DEFAULT_TIMEOUT_S = 600.0  # a 10k-task import takes ~20 s on 2 cores; exports of big projects longer
RETRY_STATUSES = (429, 502, 503, 504)  # transient answers (rate limit, a proxy in front of a restarting server)
PAT_HINT = ("this server accepts only Personal Access Tokens: create one in Label Studio (Account & Settings > "
            "Personal Access Token) and put it in SORTLOOP_LABELSTUDIO_TOKEN")


class Client(LabelStudio):
    """The official SDK client for one Label Studio server, plus `call`/`pages` (retries, clear errors).

    Args:
        url: base URL, e.g. `http://127.0.0.1:8080` (passed to the SDK as `base_url`).
        token: a legacy API token or a Personal Access Token (the SDK tells them apart).
        attempts: tries per call on connection errors (>= 1).
        backoff_s: first wait between tries; doubles each time.
        timeout_s: per-request timeout.
        token_source: where the token came from, for error messages (e.g. "SORTLOOP_LABELSTUDIO_TOKEN").

    Raises:
        LabelStudioError: the token is a JWT that has already expired (the SDK checks this up front).
    """

    def __init__(
        self, url: str, token: str, *, attempts: int = DEFAULT_ATTEMPTS, backoff_s: float = DEFAULT_BACKOFF_S,
        timeout_s: float = DEFAULT_TIMEOUT_S, token_source: str = "the API token",
    ):
        self.url = url.rstrip("/")
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.token_source = token_source
        try:
            super().__init__(base_url=self.url, api_key=token, timeout=timeout_s, max_retries=0)
        except ApiError as exc:  # an expired or claim-less JWT is refused before any request
            raise LabelStudioError(self._refused(exc, "connect")) from None

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def close(self) -> None:
        """Close the SDK's HTTP connection pool (the SDK itself offers no close)."""
        self._client_wrapper.httpx_client.httpx_client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, what: str, fn: Callable[..., T], *args: Any, idempotent: bool = True, missing_ok: bool = False,
        rerun_hint: str = "run the command again", **kwargs: Any,
    ) -> T:
        """Run one SDK call, e.g. `call("get project 3", client.projects.get, 3)`, with retries and clear errors.

        Args:
            what: what the call does, for messages.
            fn: an SDK method (or any callable making SDK requests: it is re-run whole on a retry).
            idempotent: False for calls that change something each time (imports, creates): then only
                failures before the request reached the server are retried.
            missing_ok: return None on a 404 instead of raising.
            rerun_hint: what to do when a call that is not idempotent was lost mid-way (say why a rerun is safe).

        Raises:
            LabelStudioError: unreachable after all attempts, the token refused, or another error answer.
        """
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            try:
                return fn(*args, **kwargs)
            except ApiError as exc:
                status = exc.status_code
                if status == 404 and missing_ok:
                    return None  # type: ignore[return-value]
                if status in (401, 403):
                    raise LabelStudioError(self._refused(exc, what)) from None
                if not (idempotent and status in RETRY_STATUSES) or last:
                    raise LabelStudioError(
                        f"Label Studio at {self.url} answered {status} to {what}: {_reason(exc.body)}"
                    ) from None
                problem = f"HTTP {status}"
            except httpx.TransportError as exc:
                sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if sent and not idempotent:
                    raise LabelStudioError(
                        f"lost Label Studio at {self.url} during {what} ({exc.__class__.__name__}: {exc}); it may or "
                        f"may not have been applied; {rerun_hint}"
                    ) from None
                if last:
                    raise LabelStudioError(
                        f"cannot reach Label Studio at {self.url} ({exc.__class__.__name__}: {exc}) after "
                        f"{self.attempts} attempts; is it running? (`sortloop labelstudio up`)"
                    ) from None
                problem = exc.__class__.__name__
            except json.JSONDecodeError:
                raise LabelStudioError(f"Label Studio at {self.url} answered {what} with something that is not "
                                       "JSON (is labelstudio.url the server's base URL?)") from None
            logger.warning("Label Studio at %s: %s during %s; retry %d/%d in %.1f s",
                           self.url, problem, what, attempt, self.attempts - 1, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # the loop returns or raises

    def pages(self, what: str, list_fn: Callable[..., Any], **kwargs: Any) -> Iterator[list]:
        """Items of one of the SDK's paged list methods (e.g. `client.tasks.list`), a page at a time.

        Each page is fetched through `call` (retried on its own). Iteration stops at the total the server
        reports, so there is no request past the last page (the SDK's own pager fetches one more and gets
        404 "Invalid page", an ERROR with a traceback in the server log).
        """
        pager = self.call(what, list_fn, page=1, **kwargs)
        seen = 0
        while pager is not None and pager.items:
            yield list(pager.items)
            seen += len(pager.items)
            total = getattr(pager.response, "total", None)
            if total is None:
                total = getattr(pager.response, "count", None)
            if (total is not None and seen >= int(total)) or not pager.has_next or pager.get_next is None:
                return
            pager = self.call(what, pager.get_next, missing_ok=True)

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Bulk-import tasks into a project in one request; their new ids, in the order of `tasks`.

        The same request as the SDK's `projects.import_tasks(id, request=tasks, return_task_ids=True)`
        (`POST /api/projects/{id}/import`, through the SDK's own HTTP client: base URL, token or PAT refresh,
        timeout), but the body is encoded once by `json.dumps` and the answer read as plain JSON. The SDK
        walks every value of every task in Python first (`jsonable_encoder` and its annotation-metadata
        pass: ~0.15 ms per task, a fifth of the server's own import time) and parses the answer into
        pydantic. Not retried by itself: call it through `call(..., idempotent=False)`.

        Raises:
            ApiError: the server's error answer (as the SDK raises it, so `call` reports it the same way).
        """
        body = json.dumps(tasks, separators=(",", ":")).encode()
        response = self._client_wrapper.httpx_client.request(
            f"api/projects/{int(project_id)}/import", method="POST", params={"return_task_ids": True},
            content=body, headers={"content-type": "application/json"},
        )
        if not 200 <= response.status_code < 300:
            try:
                detail: Any = response.json()
            except ValueError:
                detail = response.text
            raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=detail)
        answer = response.json()
        return [int(i) for i in answer.get("task_ids") or []]

    def whoami(self) -> Any:
        """The user the token belongs to (`/api/current-user/whoami`), as the SDK's model."""
        return self.call("who am I", self.users.whoami)

    def _refused(self, exc: ApiError, what: str) -> str:
        status, reason = exc.status_code, _reason(exc.body)
        if status == 403:
            text = (f"Label Studio at {self.url} forbade {what} (403: {reason}); check that the user of "
                    f"{self.token_source} may do this")
        else:
            text = f"Label Studio at {self.url} refused {self.token_source} ({status}: {reason})"
        if "legacy token" in reason.lower():
            text += f"; {PAT_HINT}"
        return text


def _reason(body: object) -> str:
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("validation_errors") or body
        return str(detail)[:300]
    return str(body)[:300]


def connect(ws: Workspace, *, attempts: int = DEFAULT_ATTEMPTS, backoff_s: float = DEFAULT_BACKOFF_S) -> Client:
    """An authenticated SDK client for the workspace's Label Studio (embedded or `labelstudio.url`), checked live.

    The token (legacy or Personal Access Token) comes from `SORTLOOP_LABELSTUDIO_TOKEN`, else from the
    embedded server's `<workspace>/labelstudio/credentials.json` (see `labeling.server.connection`).

    Raises:
        LabelStudioError: no token, the server is unreachable after retries, or the token is refused.

    Example:
        >>> with connect(open_workspace("data")) as ls:   # doctest: +SKIP
        ...     ls.whoami().email
        'admin@sortloop.local'
    """
    from labeling.server import connection

    conn = connection(ws)
    client = Client(conn.url, conn.token, attempts=attempts, backoff_s=backoff_s, token_source=conn.source)
    try:
        client.whoami()
    except LabelStudioError:
        client.close()
        raise
    return client
