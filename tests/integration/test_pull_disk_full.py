"""`review pull` from a real Label Studio into a workspace whose disk is full: one error line, the manifest
and history unchanged, the watermark not moved; after freeing space the same pull brings the label."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.helpers.faults import fill_disk, hidden_temps, small_disk
from tests.integration.conftest import build_manifest

pytestmark = pytest.mark.integration


def test_pull_into_a_full_workspace_loses_nothing(ls_ws, sdk, tmp_path):
    from labeling.push import push
    from loop.data import manifest as mf
    from sortloop.cli import app

    ids = build_manifest(ls_ws, labeled={"chair": 1, "sofa": 1}, flagged=[("sofa", "chair", 0.3, "low_confidence")])
    report = push(ls_ws)
    (task,) = list(sdk.tasks.list(project=report.project_id, page_size=100))
    sdk.annotations.create(id=task.id, result=[{"from_name": "label", "to_name": "image", "type": "choices",
                                                "value": {"choices": ["sofa"]}}])
    state_file = ls_ws.labelstudio_dir / "pull.json"
    history_before = mf.history(ls_ws)

    saved = tmp_path / "manifest-saved"
    shutil.copytree(ls_ws.manifest_dir, saved)
    with small_disk(ls_ws.manifest_dir, "512k") as disk:  # the manifest's folder is now a small disk
        for item in saved.iterdir():
            shutil.copy2(item, disk / item.name)
        before = mf.load(ls_ws)
        filler = fill_disk(disk)
        result = CliRunner().invoke(app, ["review", "pull", "-w", str(ls_ws.root)])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and result.output.startswith("error: no space left"), result.output
        pd.testing.assert_frame_equal(mf.load(ls_ws), before)
        pd.testing.assert_frame_equal(mf.history(ls_ws), history_before)  # no phantom review line
        assert not state_file.exists()  # the watermark did not move past the lost label
        assert not hidden_temps(ls_ws.root) and not mf.pending_path(ls_ws).exists()

        filler.unlink()
        again = CliRunner().invoke(app, ["review", "pull", "-w", str(ls_ws.root)])
        assert again.exit_code == 0, again.output
        row = mf.load(ls_ws).set_index("image_id").loc[ids[0]]
        assert (row["label"], row["label_source"]) == ("sofa", "review")
        hist = mf.history(ls_ws)
        assert len(hist) == len(history_before) + 1 and hist.iloc[-1]["new_label"] == "sofa"
