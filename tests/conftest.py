"""Shared fixtures: a fresh workspace, the shared real-photo datasets, small generated images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SORTLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def ws(tmp_path: Path):
    """A freshly initialised workspace in a temp folder."""
    from loop.workspace import init_workspace

    return init_workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ikea_products").exists():
        pytest.fail(f"shared datasets not found at {SHARED_DATA}; set SORTLOOP_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_ikea(tmp_path_factory, shared_data):
    """ikea_products ingested as user photos with its own item groups, trained (head mode) and deployed,
    once per session. Read-only: copy it with `tests.helpers.models.copy_workspace` to change it.

    Yields (workspace, TrainResult, Decision).
    """
    from loop.learning.deployment import deploy
    from loop.learning.train import train
    from loop.workspace import init_workspace
    from tests.helpers.models import ingest_ikea

    root = tmp_path_factory.mktemp("trained_ikea")
    ws = init_workspace(root / "ws")
    ingest_ikea(ws, shared_data, root)
    result = train(ws, mode="head")
    decision = deploy(ws, result.version)
    return ws, result, decision


@pytest.fixture(scope="session")
def sort_model(tmp_path_factory, shared_data) -> Path:
    """An untrained model artifact (pretrained Lite0 body, random head, the 11 ikea classes), built once per
    session, for sort mechanics. Deploy a copy with `tests.helpers.sorting.deploy_copy(ws, sort_model)`."""
    from tests.helpers.sorting import build_sort_model

    return build_sort_model(tmp_path_factory.mktemp("sort_model"), shared_data)


def make_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> Path:
    """Write a small solid-colour image (with a diagonal stripe so near-duplicates differ by colour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    for i in range(min(size)):
        img.putpixel((i, i), (255 - color[0], 255 - color[1], 255 - color[2]))
    img.save(path, fmt)
    return path
