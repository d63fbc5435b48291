"""One training at a time per workspace: a hand-run train racing serve's retrain makes one version, not two."""

from __future__ import annotations

import threading

from loop.data.ingest import ingest_folder
from loop.learning import registry
from loop.learning.train import train
from tests.conftest import make_image


def test_two_trainings_started_together_make_one_version(ws, tmp_path, monkeypatch) -> None:
    from loop.workspace import Workspace

    monkeypatch.setenv("SORTLOOP_MODEL__INT8", "false")  # the race is what is tested, not the INT8 copy
    ws = Workspace(ws.root)
    photos = tmp_path / "photos"
    for i in range(18):
        cls = ("bed", "chair", "table")[i % 3]
        make_image(photos / cls / f"{i}.jpg", (80 * (i % 3), 40 + 10 * i, 200 - 60 * (i % 3)), size=(96, 96))
    ingest_folder(ws, photos, labeled=True)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(train(ws, mode="head"))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert registry.list_versions(ws) == ["v0001"]  # two identical versions before
    assert sorted(r.unchanged for r in results) == [False, True]
