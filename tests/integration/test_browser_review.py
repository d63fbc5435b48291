"""End to end in a real headless Chromium: a reviewer corrects a pushed photo, then `pull` records it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, build_manifest

pytestmark = pytest.mark.integration

BROWSER_DIR = REPO / "tests" / "browser"
ARTIFACTS = REPO / "test-artifacts"


def test_reviewer_corrects_a_guess_in_the_browser_and_pull_records_it(ls_ws, labelstudio):
    from labeling.pull import pull
    from labeling.push import push
    from loop import manifest as mf

    if not (BROWSER_DIR / "node_modules" / "playwright-core").exists():
        pytest.fail("run `PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install` in tests/browser first")
    if not Path("/usr/bin/chromium").exists() or shutil.which("node") is None:
        pytest.fail("needs Debian's chromium (/usr/bin/chromium) and node")

    (image_id,) = build_manifest(ls_ws, labeled={"chair": 1, "sofa": 1, "table": 1},
                                 flagged=[("sofa", "chair", 0.31, "low_confidence")])
    report = push(ls_ws)
    task_id = int(mf.load(ls_ws).set_index("image_id").loc[image_id, "review_task"])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "review_submit.png"
    shot.unlink(missing_ok=True)
    args = {"url": labelstudio.url, "email": labelstudio.username, "password": labelstudio.password,
            "project": report.project_id, "task": task_id, "pick": "sofa", "classes": ["chair", "sofa", "table"],
            "screenshot": str(shot), "timeout_ms": 30000}
    run = subprocess.run(["node", str(BROWSER_DIR / "review.js"), json.dumps(args)], cwd=BROWSER_DIR,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])

    assert seen["naturalWidth"] > 0 and "local-files" in seen["imageSrc"]
    assert len(seen["choices"]) == 3  # one radio per class
    assert seen["prefilled"].startswith("chair")  # the model's guess, pre-filled
    assert seen["status"] == 201
    assert seen["annotation"]["result"][0]["value"]["choices"] == ["sofa"]
    assert shot.exists() and shot.stat().st_size > 10_000

    pulled = pull(ls_ws)
    assert pulled.ok and pulled.labeled == 1
    row = mf.load(ls_ws).set_index("image_id").loc[image_id]
    assert (row["label"], row["label_source"], row["label_by"]) == ("sofa", "review", labelstudio.username)
    last = mf.history(ls_ws).iloc[-1]
    assert (last["image_id"], last["new_label"], last["source"]) == (image_id, "sofa", "review")
