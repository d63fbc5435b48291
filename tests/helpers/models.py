"""Helpers for the model tests: ingest the shared ikea photos with their own item groups, copy a trained
workspace, and run code in a subprocess where fastai cannot be imported and nothing may be unpickled."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Prepended to code run by `run_without_fastai`: importing fastai fails, and so does any unpickling.
NO_FASTAI_NO_PICKLE = """
import sys, pickle
sys.modules["fastai"] = None  # any `import fastai...` now raises ImportError
def _refuse(*args, **kwargs):
    raise RuntimeError("unpickling attempted on the portable load path")
class _RefusingUnpickler(pickle.Unpickler):
    def load(self):
        _refuse()
pickle.load = pickle.loads = _refuse
pickle.Unpickler = _RefusingUnpickler
try:
    import fastai  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("fastai was importable; the blocking trick failed")
"""


def items_csv_from_manifest(dataset: Path, out: Path, *, column: str = "group", only: set[str] | None = None) -> Path:
    """Write `path,item_id` from a shared dataset's manifest.csv (its own item groups)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(dataset / "manifest.csv", newline="") as src, open(out, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["path", "item_id"])
        for row in csv.DictReader(src):
            if only is None or row["path"] in only:
                writer.writerow([row["path"], row[column]])
    return out


def ingest_ikea(ws, shared_data: Path, scratch: Path):
    """ikea_products as labeled user photos, item groups from the dataset's `group` column (read in place)."""
    from loop.data.ingest import ingest_folder

    ikea = shared_data / "ikea_products"
    return ingest_folder(ws, ikea, source="user", labeled=True,
                         items_csv=items_csv_from_manifest(ikea, scratch / "ikea_items.csv"))


def tiny_ikea_folder(shared_data: Path, dest: Path, classes=("bed", "chair", "sofa"), per_class: int = 12) -> Path:
    """A small labeled folder (copies of a few ikea photos) plus its items CSV, for fast fine-tuning tests."""
    ikea = shared_data / "ikea_products"
    chosen = set()
    with open(ikea / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for cls in classes:
        for row in [r for r in rows if r["cls"] == cls][:per_class]:
            target = dest / row["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ikea / row["path"], target)
            chosen.add(row["path"])
    items_csv_from_manifest(ikea, dest.parent / f"{dest.name}_items.csv", only=chosen)
    return dest


def copy_workspace(ws, dest: Path):
    """A private copy of a workspace (caches included, so nothing is recomputed)."""
    from loop.workspace import open_workspace

    shutil.copytree(ws.root, dest, ignore=shutil.ignore_patterns("*.lock"))
    return open_workspace(dest)


def run_without_fastai(code: str, *args: str, timeout: float = 300) -> dict:
    """Run `code` in a fresh interpreter where fastai is blocked; the code prints one JSON line last."""
    script = NO_FASTAI_NO_PICKLE + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Loads an artifact with both runtimes and predicts on the cached inputs of the given image ids.
PREDICT_CODE = """
import json, sys
import numpy as np
from loop.model.artifact import load_predictor
from loop.data.resized import load_resized
from loop.workspace import open_workspace
model_dir, ws_root, ids = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
ws = open_workspace(ws_root)
out = {}
for runtime in ("onnx", "torch"):
    p = load_predictor(model_dir, runtime)
    batch = np.stack([load_resized(ws, i, p.image_size) for i in ids])
    out[runtime] = p.predict(batch).tolist()
out["classes"] = p.classes
out["fastai_loaded"] = any(m == "fastai" or m.startswith("fastai.") for m in sys.modules if sys.modules[m])
print(json.dumps(out))
"""
