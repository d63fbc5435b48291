"""Build, once, a migrated Label Studio TEMPLATE data dir for the integration tests.

A fresh data dir costs about a minute of migrations on 2 cores; a copy of a migrated one starts in ~6 s.
The template holds a known admin user and legacy API token (test-only secrets, written to
`sortloop-template.json` inside it). Idempotent: a template that exists and is valid is reused.

Usage:  python tests/prepare_labelstudio.py [--dir DIR] [--force]
        (default DIR: $SORTLOOP_TEST_LS_TEMPLATE, else <repo>/.cache/ls-template); prints the template path.
Caveat: the server is started with the same environment sortloop uses (`labeling.server.server_env`), so
legacy token auth is on because this script performs the organisation's first start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labeling.server import Credentials, start_process, stop_process, wait_healthy  # noqa: E402

DEFAULT_DIR = REPO / ".cache" / "ls-template"
MARKER = "sortloop-template.json"
TEST_CREDENTIALS = Credentials(
    username="admin@sortloop.test", password="sortloop-test-password", token="5017100ba5eb0a11ab1e0000000000000000test"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_studio_version() -> str:
    from importlib.metadata import version

    return version("label-studio")


def is_valid(template: Path) -> bool:
    """A complete template (marker written last, database present) made by this Label Studio version."""
    if not ((template / MARKER).exists() and (template / "label_studio.sqlite3").exists()):
        return False
    try:
        return json.loads((template / MARKER).read_text()).get("label_studio") == label_studio_version()
    except ValueError:
        return False


def read_marker(template: Path) -> Credentials:
    raw = json.loads((template / MARKER).read_text())
    return Credentials(raw["username"], raw["password"], raw["token"])


def build(template: Path, *, timeout_s: float = 600.0) -> float:
    """Migrate a new data dir next to `template`, check the token works, then move it into place."""
    import httpx

    template.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ls-template-", dir=template.parent))
    data = work / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    (work / "served").mkdir()
    proc = start_process(data, TEST_CREDENTIALS, host="127.0.0.1", port=port, log_file=work / "server.log",
                         document_root=work / "served")
    try:
        wait_healthy(url, proc, timeout_s, work / "server.log")
        r = httpx.get(f"{url}/api/current-user/whoami", headers={"Authorization": f"Token {TEST_CREDENTIALS.token}"})
        if r.status_code != 200:
            raise SystemExit(f"template server rejected the legacy token: HTTP {r.status_code} {r.text[:200]}")
    finally:
        stop_process(proc.pid)
        proc.wait(timeout=30)
    elapsed = time.monotonic() - start
    (data / MARKER).write_text(json.dumps({**TEST_CREDENTIALS.__dict__, "label_studio": label_studio_version()}))
    if template.exists():
        shutil.rmtree(template)
    os.replace(data, template)
    shutil.rmtree(work, ignore_errors=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("SORTLOOP_TEST_LS_TEMPLATE") or DEFAULT_DIR))
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid template exists")
    args = parser.parse_args()
    template = args.dir.resolve()
    if is_valid(template) and not args.force:
        print(f"reusing Label Studio template {template}", file=sys.stderr)
    else:
        seconds = build(template)
        print(f"built Label Studio template {template} in {seconds:.1f} s", file=sys.stderr)
    print(template)


if __name__ == "__main__":
    main()
