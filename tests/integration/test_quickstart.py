"""The README's main job (`make demo` → `sortloop demo`) end to end on real photos and a real Label Studio.

ingest a labeled folder → train → deploy → sort a new folder → `labelstudio up` → push the flagged photos.
"""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from loop import manifest, registry
from loop.app.cli import app
from tests.integration.conftest import configure, free_port, photos, template_dir

pytestmark = pytest.mark.integration

CLASSES = {"chair": 16, "sofa": 16, "bed": 16}


def test_demo_runs_the_whole_loop_once(tmp_path):
    from label_studio_sdk import LabelStudio

    from labeling import server
    from tests.prepare_labelstudio import read_marker

    # labeled: the first 10 photos of each class; new: the next 6 (never seen in training)
    labeled, new = tmp_path / "labeled", tmp_path / "inbox" / "2026" / "week48"
    for cls, path in photos(CLASSES):
        target = labeled / cls if len(list((labeled / cls).glob("*"))) < 10 else new
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    dest = tmp_path / "sorted"

    # a low threshold so that some of the 18 new photos are surely flagged
    ws = configure(tmp_path / "ws", port=free_port(), title="demo",
                   replace={"# flag_threshold = 0.5": "flag_threshold = 0.2"})
    template = template_dir()
    shutil.copytree(template, server.data_dir(ws), symlinks=True)
    server.write_credentials(server.credentials_path(ws), read_marker(template))
    try:
        result = CliRunner().invoke(
            app, ["demo", "--labeled", str(labeled), "--new", str(tmp_path / "inbox"), "--dest", str(dest),
                  "-w", str(ws.root)],
        )
        assert result.exit_code == 0, result.output
        for step in ("ingest:", "train:", "deploy: promoted", "sort:", "labelstudio:", "push:"):
            assert step in result.output
        assert f"Review flagged photos at {server.embedded_url(ws)}" in result.output
        assert "sortloop serve" in result.output

        assert registry.current_version(ws) == "v0001"
        copies = list(dest.rglob("*.jpg"))
        assert len(copies) == 18 and all(p.parent.name == "week48" for p in copies)  # keep-tree default
        assert {p.parents[2].name for p in copies} <= set(CLASSES)

        df = manifest.load(ws)
        flagged = df[df["flag"].notna()]
        assert len(flagged) > 0 and (flagged["review_task"].notna()).all()
        creds = server.read_credentials(server.credentials_path(ws))
        client = LabelStudio(base_url=server.embedded_url(ws), api_key=creds.token)
        project = next(p for p in client.projects.list() if p.title == "demo")
        tasks = list(client.tasks.list(project=project.id, fields="all"))
        assert {t.data["image_id"] for t in tasks} == set(flagged["image_id"])
        assert all(t.predictions and t.predictions[0].model_version == "v0001" for t in tasks)
    finally:
        server.down(ws)
