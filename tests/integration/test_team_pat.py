"""Team mode with a Personal Access Token on a server whose legacy tokens are off (Label Studio 1.23's default).

The module has its own server: the test switches legacy token auth off for its organisation, which would
break every other test sharing it. The admin's PAT is obtained with the legacy token (`POST /api/token/`
through the SDK's `tokens.create`) *before* legacy auth is switched off, as a team admin would in the UI.
"""

from __future__ import annotations

import pandas as pd
import pytest

from tests.integration.conftest import build_manifest, configure, free_port, running_labelstudio

pytestmark = pytest.mark.integration

FLAGGED = [("sofa", "chair", 0.30, "low_confidence"), ("table", "table", 0.40, "low_confidence"),
           ("bed", "sofa", 0.35, "user_moved")]


@pytest.fixture(scope="module")
def labelstudio(tmp_path_factory: pytest.TempPathFactory):
    """This module's own server (its organisation loses legacy tokens below)."""
    with running_labelstudio(tmp_path_factory.mktemp("ls-pat") / "ws") as ls:
        yield ls


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def test_push_and_pull_with_a_personal_access_token(labelstudio, tmp_path, monkeypatch):
    from label_studio_sdk import LabelStudio as SDK

    from labeling.client import connect
    from labeling.pull import pull
    from labeling.push import push
    from labeling.server import TOKEN_ENV, credentials_path
    from loop.data import manifest as mf
    from loop.errors import LabelStudioError

    admin = SDK(base_url=labelstudio.url, api_key=labelstudio.token, timeout=120)
    pat = admin.tokens.create().token
    admin.jwt_settings.update(api_tokens_enabled=True, legacy_api_tokens_enabled=False, api_token_ttl_days=30)

    # a team workspace: another URL's server, no embedded credentials, the token from the environment
    ws = configure(tmp_path / "ws", port=free_port(), title="team review",
                   replace={'url = ""': f'url = "{labelstudio.url}/"', **labelstudio.guest()})
    assert not credentials_path(ws).exists()

    monkeypatch.setenv(TOKEN_ENV, labelstudio.token)  # the legacy token is now refused, with the fix named
    with pytest.raises(LabelStudioError, match="Personal Access Token") as err:
        connect(ws)
    assert TOKEN_ENV in str(err.value) and labelstudio.url in str(err.value) and "401" in str(err.value)

    monkeypatch.setenv(TOKEN_ENV, pat)
    with connect(ws) as client:  # the SDK exchanged the PAT for an access token and sends it as Bearer
        assert client.whoami().email == labelstudio.username
        assert client._client_wrapper.get_headers()["Authorization"].startswith("Bearer ")

    ids = build_manifest(ws, labeled={"chair": 1, "sofa": 1, "table": 1, "bed": 1}, flagged=FLAGGED)
    report = push(ws)
    assert (report.imported, report.url) == (len(FLAGGED), labelstudio.url)
    reviewer = SDK(base_url=labelstudio.url, api_key=pat, timeout=120)
    tasks = list(reviewer.tasks.list(project=report.project_id, page_size=100))
    assert sorted(t.data["image_id"] for t in tasks) == sorted(ids)
    assert all(len(t.predictions) == 1 for t in tasks)
    task_of = {t.data["image_id"]: t.id for t in tasks}
    sofa, table, bed = ids
    reviewer.annotations.create(id=task_of[sofa], result=choice("sofa"))  # corrects the guess
    reviewer.annotations.create(id=task_of[table], result=[], was_cancelled=True)  # skipped
    reviewer.annotations.create(id=task_of[bed], result=choice("bed"))

    pulled = pull(ws)
    assert pulled.ok and (pulled.labeled, pulled.skipped) == (2, 1)
    df = mf.load(ws).set_index("image_id")
    assert (df.loc[sofa, "label"], df.loc[bed, "label"]) == ("sofa", "bed")
    assert (df.loc[[sofa, bed], "label_by"] == labelstudio.username).all()
    assert pd.isna(df.loc[table, "label"]) and df.loc[table, "review_status"] == "skipped"
    again = push(ws), pull(ws)
    assert (again[0].imported, again[1].labeled, again[1].skipped) == (0, 0, 0)
