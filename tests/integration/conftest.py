"""Fixtures for tests against a real Label Studio: one server per test module, started from a copy of a
migrated template data dir (`tests/prepare_labelstudio.py`, ~40-60 s once; each copy starts in ~6 s).

`SORTLOOP_TEST_LS_TEMPLATE` points at the template; if unset, the prepare script is run here (cached).
The server is started through `labeling.server.up` on a workspace that owns it, exactly as users run it,
and stopped after the module. Each test gets its own workspace (own project title) on that server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IKEA = REPO.parent / "shared" / "data" / "ikea_products"


@dataclass(frozen=True)
class LabelStudio:
    """A running test server."""

    url: str
    port: int
    username: str
    password: str
    token: str
    owner: object  # the Workspace whose `labelstudio up` started it

    def guest(self) -> dict[str, str]:
        """Config lines for another workspace using this server: its photos go to the served folder this
        server serves (the owner's; names are content hashes, so workspaces can share it)."""
        from labeling.served import served_dir

        return {'served_dir = ""': f'served_dir = "{served_dir(self.owner)}"'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def template_dir() -> Path:
    env = os.environ.get("SORTLOOP_TEST_LS_TEMPLATE")
    if env and (Path(env) / "sortloop-template.json").exists():
        return Path(env)
    out = subprocess.run([sys.executable, str(REPO / "tests" / "prepare_labelstudio.py")],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"could not prepare the Label Studio template:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def configure(root: Path, *, port: int, title: str, replace: dict[str, str] | None = None) -> object:
    """Init a workspace at `root` whose embedded Label Studio is on `port`, with its own project title.

    `replace` maps default config lines (e.g. "webhook_port = 0") to the lines to use instead.
    """
    from loop.workspace import init_workspace, open_workspace

    ws = init_workspace(root)
    text = ws.config_file.read_text()
    lines = {"port = 8080": f"port = {port}", 'project_title = "sortloop review"': f'project_title = "{title}"'}
    for old, new in {**lines, **(replace or {})}.items():
        if old not in text:
            raise KeyError(f"{old!r} is not in the default config")
        text = text.replace(old, new)
    ws.config_file.write_text(text)
    return open_workspace(root)


@contextmanager
def running_labelstudio(root: Path, *, replace: dict[str, str] | None = None) -> Iterator[LabelStudio]:
    """A server started by `labeling.server.up` on a copy of the template, in workspace `root`."""
    sys.path.insert(0, str(REPO / "tests"))
    from prepare_labelstudio import read_marker

    from labeling import server

    template = template_dir()
    creds = read_marker(template)
    port = free_port()
    ws = configure(root, port=port, title="owner", replace=replace)
    shutil.copytree(template, server.data_dir(ws), symlinks=True)
    server.write_credentials(server.credentials_path(ws), creds)
    info = server.up(ws)
    try:
        yield LabelStudio(info.url, port, creds.username, creds.password, creds.token, ws)
    finally:
        server.down(ws)


@pytest.fixture(scope="module")
def labelstudio(tmp_path_factory: pytest.TempPathFactory):
    """A real Label Studio server for this module, started by `labeling.server.up`, stopped after."""
    with running_labelstudio(tmp_path_factory.mktemp("ls-owner") / "ws") as ls:
        yield ls


@pytest.fixture
def ls_ws(labelstudio: LabelStudio, tmp_path: Path, request: pytest.FixtureRequest):
    """A fresh workspace using the module's server, with its own project (titled after the test)."""
    from labeling import server

    title = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    ws = configure(tmp_path / "ws", port=labelstudio.port, title=title, replace=labelstudio.guest())
    server.write_credentials(server.credentials_path(ws), server.read_credentials(
        server.credentials_path(labelstudio.owner)))
    return ws


@pytest.fixture
def sdk(labelstudio: LabelStudio):
    """A second SDK client (legacy token), separate from sortloop's, playing the reviewer."""
    from label_studio_sdk import LabelStudio as SDK

    return SDK(base_url=labelstudio.url, api_key=labelstudio.token, timeout=120)


def photos(classes: dict[str, int]) -> list[tuple[str, Path]]:
    """The first `n` real photos (sorted by name) of each ikea_products class: [(class, path)]."""
    if not IKEA.exists():
        pytest.fail(f"shared photos not found at {IKEA}")
    out = []
    for cls, n in classes.items():
        out += [(cls, p) for p in sorted((IKEA / cls).glob("*.jpg"))[:n]]
    return out


def build_manifest(ws, *, labeled: dict[str, int], flagged: list[tuple[str, str, float, str]]) -> list[str]:
    """Register real photos: `labeled` class -> count (labels from folders), and flagged ones.

    `flagged` items are (true class, predicted label, confidence, flag); each takes the next unused photo
    of its true class, unlabeled, with the prediction and flag a sort would have written. Returns the
    flagged image ids in the given order.
    """
    from loop.data import manifest as mf
    from loop.data.images import file_sha256
    from loop.data.ingest import ImageInfo, register_images

    need: dict[str, int] = dict(labeled)
    for cls, *_ in flagged:
        need[cls] = need.get(cls, 0) + 1
    pool: dict[str, list[Path]] = {}
    for cls, path in photos(need):
        pool.setdefault(cls, []).append(path)
    infos, flagged_ids, preds = [], [], {}
    for cls, n in labeled.items():
        for path in pool[cls][:n]:
            infos.append(ImageInfo(file_sha256(path), str(path), label=cls))
        pool[cls] = pool[cls][n:]
    for cls, pred, conf, flag in flagged:
        path = pool[cls].pop(0)
        image_id = file_sha256(path)
        infos.append(ImageInfo(image_id, str(path)))
        flagged_ids.append(image_id)
        preds[image_id] = (pred, conf, flag)
    register_images(ws, infos)

    def add_predictions(df):
        for image_id, (pred, conf, flag) in preds.items():
            hit = df["image_id"] == image_id
            df.loc[hit, "pred_label"] = pred
            df.loc[hit, "pred_conf"] = conf
            df.loc[hit, "pred_model"] = "v0001"
            df.loc[hit, "flag"] = flag
        return df

    mf.update(ws, add_predictions)
    return flagged_ids
