"""Label Studio pieces that need no server: payload shapes, decisions, candidate order, roots, secrets, retries."""

from __future__ import annotations

import os
import socket
import stat
import time

import pandas as pd
import pytest

from labeling import payloads
from loop.errors import LabelStudioError


def ann(aid: int, label: str | None, updated: str, *, cancelled: bool = False, who: object = 1) -> dict:
    return {"id": aid, "was_cancelled": cancelled, "updated_at": updated, "completed_by": who,
            "result": payloads.choice_result(label) if label else []}


def task(annotations: list[dict], image_id: str = "h1", tid: int = 7) -> dict:
    return {"id": tid, "data": {"image_id": image_id}, "annotations": annotations}


def test_label_config_round_trips_classes_with_hotkeys_and_escaping():
    classes = ["chair", "chest of drawers", 'odd "quoted" & <class>']
    xml = payloads.label_config(classes)
    assert payloads.config_classes(xml) == classes
    assert 'hotkey="1"' in xml and 'hotkey="3"' in xml
    many = payloads.label_config([f"c{i}" for i in range(40)])
    assert payloads.config_classes(many) == [f"c{i}" for i in range(40)]


def test_image_url_points_into_the_served_folder():
    assert payloads.image_url("ab12.jpg") == "/data/local-files/?d=photos/ab12.jpg"


def test_task_carries_hash_and_prediction():
    row = pd.Series({"image_id": "abc", "path": "/p/x.jpg", "flag": "low_confidence", "pred_label": "sofa",
                     "pred_conf": 0.42, "pred_model": "v0003"})
    t = payloads.task(row, "abc.jpg")
    assert t["data"]["image_id"] == t["meta"]["image_id"] == "abc"
    assert t["data"]["image"] == payloads.image_url("abc.jpg")
    assert t["predictions"] == [{"model_version": payloads.PREDICTION_VERSION, "score": 0.42,
                                 "result": payloads.choice_result("sofa")}]
    assert t["data"]["model"] == "v0003" and t["data"]["note"] == "The model v0003 guessed sofa (42% sure)."
    row2 = row.copy()
    row2["pred_label"] = pd.NA
    assert "predictions" not in payloads.task(row2, "abc.jpg")


def test_a_persons_move_is_pre_selected_before_the_models_guess_and_said_in_words():
    row = pd.Series({"image_id": "abc", "path": "/p/x.jpg", "flag": "user_moved", "label": "bench",
                     "label_source": "user_move", "label_at": pd.Timestamp("2026-11-30 16:05", tz="UTC"),
                     "pred_label": "stool", "pred_conf": 0.7503, "pred_model": "v0002"})
    t = payloads.task(row, "abc.jpg")
    # imported last = listed first by Label Studio, which pre-selects it (tests/integration/test_browser_review.py)
    assert [p["result"] for p in t["predictions"]] == [payloads.choice_result(c) for c in ("stool", "bench")]
    assert "score" not in t["predictions"][1] and t["predictions"][0]["score"] == 0.7503
    assert t["data"]["note"] == ("Moved by a person from stool to bench on 2026-11-30; "
                                 "the model v0002 guessed stool (75% sure).")
    # a reviewer's label on a moved photo (flag cleared) is no longer presented as a person's move
    reviewed = row.copy()
    reviewed["flag"], reviewed["label_source"] = pd.NA, "review"
    assert len(payloads.task(reviewed, "abc.jpg")["predictions"]) == 1


def test_decide_latest_non_cancelled_wins_over_earlier_and_later_skips():
    d = payloads.decide(task([
        ann(1, "chair", "2026-01-01T10:00:00Z"),
        ann(2, "sofa", "2026-01-01T11:00:00Z", who={"id": 3, "email": "r@x.org"}),
        ann(3, None, "2026-01-01T12:00:00Z", cancelled=True),
    ]))
    assert (d.kind, d.label, d.annotation_id, d.reviewer) == ("label", "sofa", 2, "r@x.org")
    assert d.updated_at == pd.Timestamp("2026-01-01T11:00:00Z")


def test_decide_skip_only_and_empty_results():
    skipped = payloads.decide(task([ann(4, None, "2026-01-01T10:00:00Z", cancelled=True)]))
    assert (skipped.kind, skipped.label) == ("skipped", None)
    assert payloads.decide(task([ann(5, None, "2026-01-01T10:00:00Z")])) is None  # empty result: no label
    assert payloads.decide(task([])) is None
    assert payloads.decide({"id": 1, "data": {}, "annotations": [ann(6, "x", "2026-01-01T10:00:00Z")]}) is None


def test_select_candidates_order_and_exclusions():
    from labeling.push import select_candidates
    from loop.data.manifest import COLUMNS
    from loop.tables import conform

    df = conform(pd.DataFrame({
        "image_id": list("abcdefg"),
        "flag": ["low_confidence", "user_moved", "low_confidence", None, "low_confidence", None, "low_confidence"],
        "pred_conf": [0.4, 0.9, 0.1, 0.05, None, 0.2, 0.3],
        "review_status": [None, None, None, None, None, "queued", "reviewed"],
        "review_task": pd.array([None] * 7, dtype="Int64"),
    }), COLUMNS)
    assert list(select_candidates(df)["image_id"]) == ["b", "c", "f", "a", "e"]
    df.loc[df.image_id == "c", ["review_status", "review_task"]] = ["pushed", 12]
    assert "c" not in list(select_candidates(df)["image_id"])
    assert "c" in list(select_candidates(df, trust_hints=False)["image_id"])


def test_credentials_are_owner_only_and_never_in_repr(tmp_path):
    from labeling.server import new_credentials, read_credentials, write_credentials

    creds = new_credentials("admin@x.org")
    assert len(creds.token) == 40 and creds.password
    path = tmp_path / "ls" / "credentials.json"
    write_credentials(path, creds)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_credentials(path) == creds
    assert creds.token not in repr(creds) and creds.password not in repr(creds)
    path.write_text("{not json")
    with pytest.raises(LabelStudioError, match="damaged"):
        read_credentials(path)


def test_connection_embedded_team_and_missing_token(ws, monkeypatch):
    from labeling import server
    from loop.workspace import open_workspace

    monkeypatch.delenv(server.TOKEN_ENV, raising=False)
    with pytest.raises(LabelStudioError, match="labelstudio up"):
        server.connection(ws)
    server.write_credentials(server.credentials_path(ws), server.new_credentials("a@b.c"))
    conn = server.connection(ws)
    assert conn.embedded and conn.url == "http://127.0.0.1:8080"
    assert conn.token not in repr(conn)
    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__URL", "https://ls.example.org/")
    team = open_workspace(ws.root)
    with pytest.raises(LabelStudioError, match=server.TOKEN_ENV):
        server.connection(team)
    monkeypatch.setenv(server.TOKEN_ENV, "team-token")
    conn = server.connection(team)
    assert (conn.url, conn.token, conn.embedded) == ("https://ls.example.org", "team-token", False)
    with pytest.raises(LabelStudioError, match="managed elsewhere"):
        server.up(team)


def test_unreachable_server_is_retried_then_reported(ws, monkeypatch):
    from labeling import server
    from labeling.client import connect
    from loop.workspace import open_workspace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__PORT", str(port))
    monkeypatch.setenv(server.TOKEN_ENV, "whatever")
    start = time.monotonic()
    with pytest.raises(LabelStudioError) as err:
        connect(open_workspace(ws.root), attempts=3, backoff_s=0.1)
    assert time.monotonic() - start >= 0.3  # waited 0.1 + 0.2 between the three attempts
    assert f"http://127.0.0.1:{port}" in str(err.value) and "3 attempts" in str(err.value)


def test_webhook_receiver_needs_a_port_and_the_secret(ws, monkeypatch):
    import httpx

    from labeling.webhook import HEADER, Receiver, receiver_url, secret_path
    from loop.workspace import open_workspace

    with pytest.raises(LabelStudioError, match="webhook_port"):
        Receiver(ws)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__WEBHOOK_PORT", str(port))
    ws = open_workspace(ws.root)
    events = []
    # debounce well above the time three local posts take on a busy 2-core machine
    with Receiver(ws, on_event=lambda: events.append(1), debounce_s=0.5) as receiver, httpx.Client() as http:
        secret = secret_path(ws).read_text()
        assert stat.S_IMODE(os.stat(secret_path(ws)).st_mode) == 0o600
        assert http.post(receiver_url(ws), headers={HEADER: "nope"}).status_code == 403
        wrong_path = receiver_url(ws).replace("/labelstudio/webhook", "/x")
        assert http.post(wrong_path, headers={HEADER: secret}).status_code == 404
        for _ in range(3):  # a burst of saves ...
            assert http.post(receiver_url(ws), json={"action": "ANNOTATION_CREATED"},
                             headers={HEADER: secret}).status_code == 204
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.8)
    assert receiver.calls == 3 and 1 <= len(events) <= 2  # ... coalesces into one or two pulls


def test_known_classes_are_the_deployed_models_then_the_manifests(ws):
    import json

    from labeling.project import known_classes
    from loop.data import manifest as mf
    from loop.learning.registry import new_version_dir, set_current
    from loop.tables import conform

    rows = pd.DataFrame({"image_id": ["a", "b", "c"], "path": ["/p/a", "/p/b", "/p/c"],
                         "label": ["sofa", "chair", None]})
    mf.update(ws, lambda _: conform(rows, mf.COLUMNS))
    assert known_classes(ws) == ["chair", "sofa"]  # no model yet: the manifest's labels, sorted
    version, folder = new_version_dir(ws)
    (folder / "model.json").write_text(json.dumps({"version": version, "classes": ["table", "chair"],
                                                   "architecture": "tf_efficientnet_lite0", "image_size": 224,
                                                   "mean": [0.5] * 3, "std": [0.5] * 3}))
    set_current(ws, version)
    assert known_classes(ws) == ["table", "chair", "sofa"]  # model order first, then manifest extras


class FakeLabelStudio:
    """A tiny real HTTP server answering canned responses per path; records (method, path, Authorization)
    in `seen` and (path with query, body) in `bodies`."""

    def __init__(self, answers: dict[str, list[tuple[int, object]]]):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answers = answers
        self.seen: list[tuple[str, str, str]] = []
        self.bodies: list[tuple[str, bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                fake.bodies.append((self.path, self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                path = self.path.split("?")[0]
                fake.seen.append((self.command, path, self.headers.get("Authorization", "")))
                queue = fake.answers.get(path) or [(404, {"detail": "Not found."})]
                status, body = queue.pop(0) if len(queue) > 1 else queue[0]
                if callable(body):
                    status, body = body(self.headers.get("Authorization", ""))
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeLabelStudio:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


WHOAMI = "/api/current-user/whoami"
ME = {"id": 1, "email": "admin@x.org", "username": "admin"}


def test_transient_answers_are_retried_for_reads_but_an_import_is_sent_once():
    from labeling.client import Client

    answers = {WHOAMI: [(503, {"detail": "starting"}), (502, "bad gateway"), (200, ME)],
               "/api/projects/1/import": [(503, {"detail": "busy"})]}
    with FakeLabelStudio(answers) as fake:
        client = Client(fake.url, "legacy-token", backoff_s=0.01, token_source="the token in X")
        assert client.whoami().email == "admin@x.org"
        assert [p for _, p, _ in fake.seen] == [WHOAMI] * 3
        assert {auth for *_, auth in fake.seen} == {"Token legacy-token"}
        with pytest.raises(LabelStudioError, match="503") as err:
            client.call("import 1 tasks", client.projects.import_tasks, idempotent=False, id=1,
                        request=[{"data": {"image": "x"}}], return_task_ids=True)
        assert fake.url in str(err.value)
        assert [p for _, p, _ in fake.seen].count("/api/projects/1/import") == 1  # neither we nor the SDK retried
        client.close()


def test_bulk_import_posts_the_tasks_once_as_json_and_returns_their_ids_in_order():
    import json

    from labeling.client import Client

    tasks = [{"data": {"image": "/data/local-files/?d=a%20b.jpg", "image_id": "h1", "flag": None},
              "meta": {"image_id": "h1"}, "predictions": [{"model_version": "v1", "score": 0.25, "result": []}]},
             {"data": {"image": "/data/local-files/?d=c.jpg", "image_id": "h2"}, "meta": {"image_id": "h2"}}]
    answers = {"/api/projects/7/import": [(201, {"task_count": 2, "task_ids": [12, 11]}), (503, {"detail": "busy"})]}
    with FakeLabelStudio(answers) as fake:
        client = Client(fake.url, "legacy-token", backoff_s=0.01)
        assert client.call("import 2 tasks", client.import_tasks, 7, tasks, idempotent=False) == [12, 11]
        (path, body), = fake.bodies
        assert path == "/api/projects/7/import?return_task_ids=true"
        assert json.loads(body) == tasks
        assert fake.seen == [("POST", "/api/projects/7/import", "Token legacy-token")]
        with pytest.raises(LabelStudioError, match="503"):
            client.call("import 2 tasks", client.import_tasks, 7, tasks, idempotent=False)
        assert len(fake.seen) == 2  # an error answer to an import is never retried
        client.close()


def test_refused_token_names_its_source_and_the_personal_access_token_fix():
    from labeling.client import Client

    detail = ("Authentication token no longer valid: legacy token authentication has been disabled for this "
              "organization")
    with FakeLabelStudio({WHOAMI: [(401, {"detail": detail})]}) as fake:
        client = Client(fake.url, "legacy-token", backoff_s=0.01, token_source="the token in SORTLOOP_X")
        with pytest.raises(LabelStudioError) as err:
            client.whoami()
        text = str(err.value)
        assert fake.url in text and "SORTLOOP_X" in text and "401" in text and "Personal Access Token" in text
        assert len(fake.seen) == 1  # a refusal is not retried


def test_personal_access_token_is_exchanged_for_a_bearer_access_token():
    import jwt

    from labeling.client import Client

    now = int(time.time())
    KEY = "k" * 32  # noqa: N806 (the fake server never checks signatures; long enough to keep pyjwt quiet)
    pat = jwt.encode({"exp": now + 3600, "token_type": "refresh"}, KEY, algorithm="HS256")
    access = jwt.encode({"exp": now + 300, "token_type": "access"}, KEY, algorithm="HS256")
    answers = {"/api/token/refresh/": [(200, {"access": access})],
               WHOAMI: [(200, lambda auth: (200, ME) if auth == f"Bearer {access}" else (401, {"detail": auth}))]}
    with FakeLabelStudio(answers) as fake:
        client = Client(fake.url, pat, token_source="the token in SORTLOOP_X")
        assert client.whoami().email == "admin@x.org"
        assert client.whoami().email == "admin@x.org"
        assert [p for _, p, _ in fake.seen] == ["/api/token/refresh/", WHOAMI, WHOAMI]  # refreshed once, reused
        expired = jwt.encode({"exp": now - 10, "token_type": "refresh"}, KEY, algorithm="HS256")
        with pytest.raises(LabelStudioError, match="SORTLOOP_X.*expired"):
            Client(fake.url, expired, token_source="the token in SORTLOOP_X")


@pytest.mark.parametrize("value", [{"choices": {"a": 1}}, "bed", None, {"choices": [1]}, ["bed"]])
def test_decide_skips_an_unreadable_annotation_and_lists_it(value) -> None:
    odd = {"id": 7, "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": value}],
           "updated_at": "2026-01-01T11:00:00Z"}
    t = task([ann(3, "chair", "2026-01-01T10:00:00Z"), odd])
    d = payloads.decide(t)  # raised KeyError / AttributeError before
    assert d is not None and d.label == "chair" and d.annotation_id == 3
    assert [i for i, _ in payloads.unreadable_annotations(t)] == [7]
    assert payloads.decide(task([odd])) is None
