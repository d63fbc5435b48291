"""The optional webhook receiver: a reviewer's save in Label Studio triggers a pull within seconds."""

from __future__ import annotations

import time

import httpx
import pandas as pd
import pytest

from tests.integration.conftest import build_manifest, configure, free_port, running_labelstudio

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def labelstudio(tmp_path_factory: pytest.TempPathFactory):
    """This module's server allows webhooks to 127.0.0.1 (started with webhook_port set)."""
    root = tmp_path_factory.mktemp("ls-hooks") / "ws"
    with running_labelstudio(root, replace={"webhook_port = 0": f"webhook_port = {free_port()}"}) as ls:
        yield ls


def test_a_save_in_label_studio_triggers_a_pull(labelstudio, sdk, tmp_path):
    from labeling import server
    from labeling.push import push
    from labeling.webhook import HEADER, listen, receiver_url
    from loop.data import manifest as mf

    ws = configure(tmp_path / "ws", port=labelstudio.port, title="hooks",
                   replace={"webhook_port = 0": f"webhook_port = {free_port()}", **labelstudio.guest()})
    server.write_credentials(server.credentials_path(ws), server.read_credentials(
        server.credentials_path(labelstudio.owner)))
    (image_id,) = build_manifest(ws, labeled={"chair": 1, "bed": 1}, flagged=[("bed", "chair", 0.2, "low_confidence")])
    report = push(ws)
    task_id = int(mf.load(ws).set_index("image_id").loc[image_id, "review_task"])

    with listen(ws, debounce_s=0.2) as receiver:
        # a caller without the secret is refused and triggers nothing
        assert httpx.post(receiver_url(ws), json={}, headers={HEADER: "wrong"}).status_code == 403
        assert httpx.post(receiver_url(ws), json={}).status_code == 403
        time.sleep(0.5)
        assert receiver.calls == 0 and receiver.runs == 0

        sdk.annotations.create(id=task_id, result=[{"from_name": "label", "to_name": "image", "type": "choices",
                                                    "value": {"choices": ["bed"]}}])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and receiver.runs == 0:
            time.sleep(0.2)
        assert receiver.calls >= 1 and receiver.runs >= 1
    row = mf.load(ws).set_index("image_id").loc[image_id]
    assert (row["label"], row["label_source"], row["review_status"]) == ("bed", "review", "reviewed")
    hooks = sdk.webhooks.list(project=report.project_id)
    assert [h.url for h in hooks] == [receiver_url(ws)]
    assert not pd.isna(row["label_at"])
