"""Sorting and feature extraction on a real local Ray instance (loopback, 2 worker CPUs) against the local
engine: same labels, confidences, flags, copy tree and feature cache; a worker killed mid-run loses and
duplicates nothing. Skipped when Ray is not installed (`pip install '.[ray]'`; CI installs `.[all]`)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from loop.data import manifest  # noqa: E402
from loop.sorting import copies  # noqa: E402
from loop.sorting.folder import sort_folder  # noqa: E402
from loop.sorting.review_csv import REVIEW_CSV  # noqa: E402
from loop.workspace import init_workspace  # noqa: E402
from tests.helpers.sorting import deploy_copy, sample_ikea  # noqa: E402

pytestmark = pytest.mark.slow
SORT_ACTOR = "ray::MapWorker(MapBatches(_SortActor))"


@pytest.fixture(scope="module")
def ray_local():
    """A fresh Ray instance with 2 worker CPUs on loopback, for this module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shared_data) -> Path:
    """110 real ikea photos (10 per class, class folders kept), two broken files and four non-photos (flat
    colours, noise: unfamiliar to the model, so they go to _other)."""
    from tests.unit.sorting.test_unfamiliar_sort import _non_photos

    src = tmp_path_factory.mktemp("ray_src") / "inbox"
    sample_ikea(shared_data, src, per_class=10, classes=11)
    _non_photos(src / "misc", n=2)
    (src / "broken").mkdir()
    (src / "broken" / "empty.jpg").write_bytes(b"")
    jpg = next(src.rglob("*.jpg")).read_bytes()
    (src / "broken" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    return src


@pytest.fixture(scope="module")
def local_sort(trained_ikea, photos, tmp_path_factory):
    """The reference: the same photos sorted by the local engine."""
    return _sort(trained_ikea, photos, tmp_path_factory.mktemp("local"), "local")


def _sort(trained_ikea, photos: Path, root: Path, engine: str):
    ws = init_workspace(root / "ws")
    deploy_copy(ws, trained_ikea[1].model_dir)
    dest = root / "sorted"
    report = sort_folder(ws, photos, dest, engine=engine)
    return ws, dest, report


def _tree(dest: Path) -> dict[str, str]:
    """Every file under dest (hidden ones too, but not the review CSV) -> sha256 of its bytes."""
    return {str(p.relative_to(dest)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dest.rglob("*")) if p.is_file() and p.name != REVIEW_CSV}


def _results(ws, dest: Path) -> pd.DataFrame:
    """Per source file: where its copy is, label, confidence, flag; plus the manifest's prediction and flag."""
    rec = copies.load_records(ws, dest)
    rec["dest_rel"] = [str(Path(p).relative_to(dest)) for p in rec["dest_path"]]
    rows = manifest.load(ws)[["image_id", "pred_label", "pred_conf", "flag"]]
    out = rec.merge(rows, on="image_id", how="left")
    cols = ["source_path", "image_id", "dest_rel", "label", "confidence", "score", "flagged", "pred_label",
            "pred_conf", "flag"]
    return out[cols].sort_values("source_path").reset_index(drop=True)


def _same_results(ws, dest, ref_ws, ref_dest) -> None:
    got, want = _results(ws, dest), _results(ref_ws, ref_dest)
    assert len(want) >= 100
    pd.testing.assert_frame_equal(got.drop(columns=["confidence", "score", "pred_conf"]),
                                  want.drop(columns=["confidence", "score", "pred_conf"]))
    for col in ("confidence", "score", "pred_conf"):
        np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), atol=1e-5)
    assert _tree(dest) == _tree(ref_dest)


def test_ray_sort_matches_local_sort(ray_local, trained_ikea, photos, local_sort, tmp_path) -> None:
    ref_ws, ref_dest, ref = local_sort
    ws, dest, report = _sort(trained_ikea, photos, tmp_path, "ray")

    _same_results(ws, dest, ref_ws, ref_dest)
    assert report.copied == ref.copied >= 110 and report.flagged == ref.flagged > 0
    assert report.unfamiliar == ref.unfamiliar >= 4  # the same photos to _other (the trees are equal)
    assert {p.name for p in (dest / "_other").rglob("*.png")} == {p.name for p in (photos / "misc").iterdir()}
    assert sorted(report.failed) == sorted(ref.failed) and len(report.failed) == 2  # per file, same reasons
    review = pd.read_csv(dest / REVIEW_CSV).sort_values("source_path")
    ref_review = pd.read_csv(ref_dest / REVIEW_CSV).sort_values("source_path")
    assert review["source_path"].tolist() == ref_review["source_path"].tolist()
    assert [Path(p).relative_to(dest) for p in review["dest_path"]] == \
           [Path(p).relative_to(ref_dest) for p in ref_review["dest_path"]]

    # resume works as for a local sort: nothing copied again, touched files are recognised by their hash
    touched = next(photos.rglob("*.jpg"))
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    again = sort_folder(ws, photos, dest, engine="ray")
    assert again.copied == 0 and again.already_sorted == report.copied and len(copies.load_records(ws, dest)) \
        == report.copied


def _actor_pids() -> list[int]:
    """Pids of this test's Ray sort actors (processes descending from this one)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith(SORT_ACTOR) and _descends_from(int(name), os.getpid()):
            found.append(int(name))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(ray_local, trained_ikea, photos, local_sort,
                                                               tmp_path) -> None:
    ref_ws, ref_dest, ref = local_sort
    dest = tmp_path / "sorted"
    killed: list[tuple[int, int]] = []  # (pid, copies in the tree when it was killed)
    stop = threading.Event()

    def kill_one_worker() -> None:
        while not stop.is_set():
            made = sum(1 for p in dest.rglob("*.jpg")) if dest.exists() else 0
            pids = _actor_pids()
            if made >= 5 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], made))
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_one_worker, daemon=True)
    watcher.start()
    try:
        ws, dest, report = _sort(trained_ikea, photos, tmp_path, "ray")
    finally:
        stop.set()
        watcher.join()

    assert killed and killed[0][1] < ref.copied, "the worker was not killed mid-run"
    _same_results(ws, dest, ref_ws, ref_dest)  # complete, one record per photo, identical tree (no temp files)
    assert report.copied + report.identical_existing == ref.copied
    assert sorted(report.failed) == sorted(ref.failed)


def test_ray_feature_extraction_fills_the_cache_like_local(ray_local, trained_ikea, tmp_path, monkeypatch) -> None:
    """With model.feature_engine = "ray" (what `train --ray` sets), features missing from the cache are
    computed by Ray actors, identical to the local ones, and written into the same cache."""
    import loop.model.features
    from loop.model.backbones import create_network, get_backbone
    from loop.model.head import _features
    from tests.helpers.models import copy_workspace

    ws = copy_workspace(trained_ikea[0], tmp_path / "ws")
    folders = list((ws.cache_dir / "features").iterdir())
    assert len(folders) == 1
    local = {p.stem: np.load(p) for p in folders[0].glob("*.npy")}
    dropped = sorted(local)[::8]  # ~50 photos "new" to the cache
    for image_id in dropped:
        (folders[0] / f"{image_id}.npy").unlink()

    def no_local(*args, **kwargs):
        raise AssertionError("features computed locally despite feature_engine = 'ray'")

    monkeypatch.setattr(loop.model.features, "body_features", no_local)  # the driver's; Ray actors import their own
    ws.settings.model.feature_engine = "ray"
    backbone = get_backbone(ws.settings.model.backbone)
    net = create_network(ws, backbone.name, 3)  # the same pretrained body; the classifier plays no part
    feats = _features(ws, net, backbone, dropped + sorted(local)[1:3], pretrained=True, on_progress=lambda *a: None)

    assert feats.shape == (len(dropped) + 2, 2, local[dropped[0]].shape[-1])
    for image_id in dropped:
        np.testing.assert_allclose(np.load(folders[0] / f"{image_id}.npy"), local[image_id], atol=1e-5)


def test_cli_ray_options_select_the_ray_engine(ws, monkeypatch) -> None:
    """`train --ray` and `sort --ray --ray-address` hand the engine and the cluster address to the library."""
    from typer.testing import CliRunner

    import loop.learning.train
    import loop.sorting.folder
    from loop.errors import SortloopError
    from sortloop.cli import app

    seen = {}

    def fake_train(ws, **kwargs):
        seen["train"] = (ws.settings.model.feature_engine, ws.settings.ray.address)
        raise SortloopError("stop here")

    def fake_sort(ws, src, dest, **kwargs):
        seen["sort"] = (kwargs["engine"], ws.settings.ray.address)
        raise SortloopError("stop here")

    monkeypatch.setattr(loop.learning.train, "train", fake_train)
    monkeypatch.setattr(loop.sorting.folder, "sort_folder", fake_sort)
    runner = CliRunner()
    runner.invoke(app, ["train", "--ray", "--ray-address", "head:6379", "-w", str(ws.root)])
    runner.invoke(app, ["sort", "a", "b", "--ray", "--ray-address", "local", "-w", str(ws.root)])
    assert seen == {"train": ("ray", "head:6379"), "sort": ("ray", "local")}
