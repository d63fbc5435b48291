"""Sorting needs neither fastai nor torch: the `sortloop sort` command runs on ONNX Runtime alone.

This is the Windows user's install: `pip install sortloop` to sort, no training stack. The subprocess makes
`import fastai` and `import torch` fail, then runs the real CLI with its decode worker processes. (Pickling
is not banned here: the workers send their predictions back through multiprocessing; that the model itself
is loaded without unpickling is tested in test_artifact.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys

from loop.data import manifest
from tests.helpers.models import REPO
from tests.helpers.sorting import deploy_copy, sample_ikea

CLI_WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None  # any `import torch...` or `import fastai...` now raises ImportError
sys.modules["fastai"] = None
from typer.testing import CliRunner
from sortloop.cli import app
result = CliRunner().invoke(app, ["sort", sys.argv[1], sys.argv[2], "-w", sys.argv[3]])
heavy = sorted({m.split(".")[0] for m in sys.modules if sys.modules[m]} & {"torch", "fastai", "timm"})
print(json.dumps({"exit": result.exit_code, "output": result.output, "heavy": heavy}))
"""


def test_sort_runs_without_fastai_and_without_torch(ws, tmp_path, shared_data, sort_model):
    deploy_copy(ws, sort_model)
    photos = sample_ikea(shared_data, tmp_path / "inbox", per_class=2, classes=3)
    dest = tmp_path / "sorted"
    proc = subprocess.run([sys.executable, "-c", CLI_WITHOUT_TORCH, str(tmp_path / "inbox"), str(dest), str(ws.root)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["exit"] == 0, result["output"]
    assert result["heavy"] == []
    copies = sorted(p for p in dest.rglob("*.jpg"))
    assert len(copies) == len(photos)
    sorted_rows = manifest.load(ws).dropna(subset=["pred_label"])
    assert len(sorted_rows) == len(photos) and (sorted_rows["pred_model"] == "v0001").all()
