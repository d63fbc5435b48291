"""Helpers for the sort tests: a small model artifact, deploying copies of it, real-photo sample folders."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path


def ikea_classes(shared_data: Path) -> list[str]:
    return sorted(p.name for p in (shared_data / "ikea_products").iterdir() if p.is_dir())


def build_sort_model(out: Path, shared_data: Path) -> Path:
    """An artifact with a pretrained Lite0 body (offline weights) and a random head: varied, unsure guesses."""
    import torch

    from loop.model.artifact import save_artifact
    from loop.model.backbones import create_network
    from loop.workspace import init_workspace

    torch.set_num_threads(2)
    classes = ikea_classes(shared_data)
    scratch = init_workspace(out / "ws")
    net = create_network(scratch, "tf_efficientnet_lite0", len(classes), seed=0)
    spec = {"version": "v0001", "architecture": "tf_efficientnet_lite0", "classes": classes, "image_size": 224,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return save_artifact(net, spec, out / "artifact")


def deploy_copy(ws, artifact: Path, version: str = "v0001") -> str:
    """Copy the artifact into `ws` as `version` (its model.json says so) and point `current` at it."""
    from loop.learning.registry import set_current

    target = ws.models_dir / version
    shutil.copytree(artifact, target)
    spec = json.loads((target / "model.json").read_text())
    spec["version"] = version
    (target / "model.json").write_text(json.dumps(spec))
    set_current(ws, version)
    return version


def sample_ikea(shared_data: Path, dest: Path, per_class: int = 3, classes: int = 4) -> list[Path]:
    """Copy a few real ikea photos (per class) into `dest/<class>/` (a temp folder, never the repo)."""
    ikea = shared_data / "ikea_products"
    with open(ikea / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen: dict[str, list[str]] = {}
    for row in rows:
        picks = chosen.setdefault(row["cls"], [])
        if len(picks) < per_class:
            picks.append(row["path"])
    out = []
    for cls in sorted(chosen)[:classes]:
        for rel in chosen[cls]:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ikea / rel, target)
            out.append(target)
    return out


def files_under(folder: Path) -> list[Path]:
    """Every regular file under `folder`, excluding the review CSV."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "_review.csv")


def sort_sample(ws, sort_model: Path, shared_data: Path, tmp_path: Path):
    """Deploy the session's sort model in `ws` and sort 6 ikea photos (3 classes) from `tmp_path/inbox` into
    `tmp_path/sorted`, with a fresh Workspace (so SORTLOOP_* settings set by the caller apply).

    Returns (workspace, src, dest).
    """
    from loop.sorting.folder import sort_folder
    from loop.workspace import Workspace

    deploy_copy(ws, sort_model)
    src, dest = tmp_path / "inbox", tmp_path / "sorted"
    sample_ikea(shared_data, src, per_class=2, classes=3)
    fresh = Workspace(ws.root)
    assert sort_folder(fresh, src, dest).ok
    return fresh, src, dest
