"""The README's main job (`make demo` → `sortloop demo`) end to end on real photos and a real Label Studio.

ingest a labeled folder → hold out whole items as new photos → train on the rest → deploy → sort the new
photos → register the sorted tree for scan → `labelstudio up` → push the flagged photos → (simulated) review
in Label Studio → pull → retrain → the gate promotes a more accurate model. A rerun trains nothing.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from loop.data import manifest
from loop.learning import registry
from loop.workspace import Workspace
from sortloop.cli import app
from tests.integration.conftest import configure, free_port, photos, template_dir

pytestmark = pytest.mark.integration

CLASSES = {"chair": 16, "sofa": 16, "bed": 16, "table": 16}


def test_demo_learns_from_a_simulated_review_and_a_rerun_trains_nothing(tmp_path):
    from label_studio_sdk import LabelStudio

    from labeling import server
    from tests.prepare_labelstudio import read_marker

    labeled = tmp_path / "labeled"
    for cls, path in photos(CLASSES):
        (labeled / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, labeled / cls / path.name)
    dest = tmp_path / "sorted"
    # a weak first model (a quarter of the items) and a low flag threshold, so the review has work to do
    ws = configure(tmp_path / "ws", port=free_port(), title="demo",
                   replace={"# flag_threshold = 0.5": "flag_threshold = 0.2"})
    template = template_dir()
    shutil.copytree(template, server.data_dir(ws), symlinks=True)
    server.write_credentials(server.credentials_path(ws), read_marker(template))
    args = ["-w", str(ws.root), "demo", "--labeled", str(labeled), "--new", str(labeled), "--dest", str(dest),
            "--holdout", "0.75"]
    runner = CliRunner()
    try:
        result = runner.invoke(app, [*args, "--simulate-review", "40"])
        assert result.exit_code == 0, result.output
        text = result.output
        for step in ("ingest:", "train: candidate v0001", "deploy: promoted v0001", "sort:", "scan: registered",
                     "labelstudio: starting", "labelstudio: running", "push:"):
            assert step in text, step
        assert f"Review the flagged photos in your browser: {server.embedded_url(ws)}".lower() in text.lower()
        for command in ("review pull", "train", "deploy", "serve", "demo --labeled .* --simulate-review 40"):
            assert re.search(rf"sortloop -w \S+ {command}", text), command

        # held out: whole items, never trained on by v0001, sorted as the new photos
        held = json.loads((ws.runs_dir / "demo.json").read_text())["answers"]
        df = manifest.load(ws)
        learned = df[df["label_source"] == "folder"]
        assert len(held) > 0 and not set(held) & set(learned["image_id"])
        assert not set(df[df["image_id"].isin(held)]["item_id"]) & set(learned["item_id"])
        assert len(list(dest.rglob("*.jpg"))) == len(held)
        assert Workspace(ws.root).settings.schedule.sorted_trees == [dest]

        # the simulated reviewer went through Label Studio, and the labels came back by pull
        assert "via Label Studio (then `review pull`)" in text
        reviewed = df[df["label_source"] == "review"]
        assert len(reviewed) > 0 and (reviewed["label"] == reviewed["image_id"].map(held)).all()
        creds = server.read_credentials(server.credentials_path(ws))
        client = LabelStudio(base_url=server.embedded_url(ws), api_key=creds.token)
        project = next(p for p in client.projects.list() if p.title == "demo")
        annotated = [t for t in client.tasks.list(project=project.id, fields="all") if t.annotations]
        assert {t.data["image_id"] for t in annotated} == set(reviewed["image_id"])

        # fewer flagged photos than asked for: the simulated user moved misfiled copies, and scan recorded them
        moved = df[df["label_source"] == "user_move"]
        if len(reviewed) < 40:
            assert "simulated user: moved" in text and len(moved) > 0
        assert (moved["label"] == moved["image_id"].map(held)).all()

        # the new model: promoted by the gate; more sorted copies in the right folder than before the review
        before = re.search(r"right folder before the review \(v0001\): ([0-9.]+) \((\d+) of (\d+)\)", text)
        now = re.search(r"right folder now \(v0002, reviewed copies moved, unchecked ones re-sorted\): ([0-9.]+)", text)
        assert before and now, text
        assert float(now.group(1)) > float(before.group(1))
        assert "gate promoted v0002" in text and registry.current_version(ws) == "v0002"
        assert "your photos labeled since the last model" in text

        # a rerun with nothing new: no new version, nothing copied
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
        assert "nothing new to train: no new labels since v0002" in again.output
        assert registry.list_versions(ws) == ["v0001", "v0002"]
        assert ": 0 copied" in again.output
    finally:
        server.down(ws)
