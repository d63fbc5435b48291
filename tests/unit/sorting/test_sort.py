"""Sorting real photos: copies land once with identical bytes, reruns copy nothing, flags, collisions."""

from __future__ import annotations

import csv
import gc
import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from loop.data import manifest
from loop.data.decode import decode_one, decode_stream
from loop.data.images import file_sha256, load_model_input, open_image, perceptual_hash
from loop.data.items import exif_taken_at
from loop.learning.registry import set_current
from loop.sorting import copies
from loop.sorting.folder import sort_folder
from loop.sorting.review_csv import REVIEW_CSV
from loop.workspace import Workspace
from sortloop.cli import app
from tests.helpers.sorting import deploy_copy, files_under, ikea_classes, sample_ikea


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (file_sha256(p), p.stat().st_mtime_ns) for p in files_under(folder)}


@pytest.fixture
def deployed(ws, sort_model):
    deploy_copy(ws, sort_model)
    return ws


def test_sorts_real_photos_once_with_identical_bytes(deployed, shared_data, tmp_path) -> None:
    src, dest = tmp_path / "inbox", tmp_path / "sorted"
    sample_ikea(shared_data, src)
    before = snapshot(src)
    classes = ikea_classes(shared_data)

    report = sort_folder(deployed, src, dest)

    assert report.ok and report.failed == []
    assert report.copied == len(before) and report.model_version == "v0001"
    assert snapshot(src) == before  # originals untouched (bytes and mtimes)
    copies_by_hash: dict[str, list[Path]] = {}
    for path in files_under(dest):
        assert path.parts[len(dest.parts)] in classes  # dest/<label>/...
        copies_by_hash.setdefault(file_sha256(path), []).append(path)
    assert sorted(copies_by_hash) == sorted(h for h, _ in before.values())
    assert all(len(paths) == 1 for paths in copies_by_hash.values())  # exactly one class folder each
    assert not [p for p in dest.rglob("*") if p.name.startswith(".")]  # no temp files left
    # the run's profile: every stage of the main process timed, the workers' hashing and decoding summed
    assert {"wait_decode", "predict", "place", "copy_wait", "record"} <= set(report.stages)
    assert report.stages["worker_hash"] > 0 and report.stages["worker_decode"] > report.stages["worker_hash"]
    assert 0 < report.stages["worker_describe"] < report.stages["worker_decode"]  # pHash + EXIF, timed apart
    assert sum(v for k, v in report.stages.items() if not k.startswith("worker")) <= report.seconds

    records = copies.load_records(deployed, dest)
    assert len(records) == len(before)
    for rec in records.itertuples():
        assert Path(rec.dest_path).exists() and file_sha256(Path(rec.dest_path)) == rec.image_id
        assert Path(rec.dest_path).relative_to(dest).parts[0] == rec.label
        assert rec.model_version == "v0001" and 0 < rec.confidence <= 1
    df = manifest.load(deployed).set_index("image_id")
    assert set(records.image_id) <= set(df.index)
    for rec in records.itertuples():
        row = df.loc[rec.image_id]
        assert row.pred_label == rec.label and row.pred_model == "v0001"
        assert row.pred_conf == pytest.approx(rec.confidence) and row.source == "user"
        assert pd.notna(row.item_id)

    touched = next(src.rglob("*.jpg"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    again = sort_folder(deployed, src, dest)
    assert again.copied == 0 and again.already_sorted == len(before) and again.ok
    assert len(files_under(dest)) == len(before)
    records = copies.load_records(deployed, dest)
    assert len(records) == len(before)
    row = records[records.source_path == str(touched)].iloc[0]
    assert row.source_mtime_ns == touched.stat().st_mtime_ns  # next time it is skipped without reading it


def test_keep_tree_and_flat_layouts(deployed, shared_data, tmp_path) -> None:
    src = tmp_path / "inbox"
    sample_ikea(shared_data, src, per_class=1, classes=2)
    (src / "projects" / "a").mkdir(parents=True)
    shutil.copy2(next(src.rglob("*.jpg")), src / "projects" / "a" / "deep.jpg")

    sort_folder(deployed, src, tmp_path / "tree", keep_tree=True)
    for rec in copies.load_records(deployed, tmp_path / "tree").itertuples():
        rel = Path(rec.source_path).relative_to(src)
        assert Path(rec.dest_path) == tmp_path / "tree" / rec.label / rel

    sort_folder(deployed, src, tmp_path / "flat", keep_tree=False)
    for rec in copies.load_records(deployed, tmp_path / "flat").itertuples():
        assert Path(rec.dest_path).parent == tmp_path / "flat" / rec.label


def test_copies_into_one_folder_keep_one_thread_and_the_order_of_the_source(deployed, shared_data, tmp_path,
                                                                             monkeypatch) -> None:
    """Copies run in several threads (`loop.sorting.copier.COPY_LANES`), but each destination folder keeps to
    one: same-named photos get `name`, `name (2)`, ... in the order the source lists them, on every run."""
    import threading

    photo = sorted((shared_data / "ikea_products" / "sofa").glob("*.jpg"))[0]
    src = tmp_path / "inbox"
    for i in range(5):  # five DIFFERENT files (trailing bytes differ, pixels do not), one name
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "IMG_0001.jpg").write_bytes(photo.read_bytes() + bytes([i]) * (i + 1))
    threads: dict[Path, set[int]] = {}
    safe_copy = copies.safe_copy

    def recording(src_path, folder, *args, **kwargs):
        threads.setdefault(Path(folder), set()).add(threading.get_ident())
        return safe_copy(src_path, folder, *args, **kwargs)

    monkeypatch.setattr(copies, "safe_copy", recording)
    dest = tmp_path / "sorted"
    assert sort_folder(deployed, src, dest, keep_tree=False).copied == 5
    records = copies.load_records(deployed, dest)
    names = {Path(r.source_path).parent.name: Path(r.dest_path).name for r in records.itertuples()}
    assert names == {"d0": "IMG_0001.jpg", **{f"d{i}": f"IMG_0001 ({i + 1}).jpg" for i in range(1, 5)}}
    assert all(len(ids) == 1 for ids in threads.values()) and len(threads) == 1


def test_name_collisions_never_overwrite(deployed, shared_data, tmp_path) -> None:
    photo = sorted((shared_data / "ikea_products" / "sofa").glob("*.jpg"))[0]
    src = tmp_path / "inbox"
    for i in range(2):  # two DIFFERENT files (trailing bytes differ, pixels do not), same name
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "IMG_0001.jpg").write_bytes(photo.read_bytes() + bytes([i]) * (i + 1))
    dest = tmp_path / "sorted"
    report = sort_folder(deployed, src, dest, keep_tree=False)
    records = copies.load_records(deployed, dest)
    assert records.label.nunique() == 1  # same pixels, same guess: both land in one folder
    assert sorted(Path(p).name for p in records.dest_path) == ["IMG_0001 (2).jpg", "IMG_0001.jpg"]
    assert report.renamed == 1 and report.copied == 2
    for rec in records.itertuples():
        assert file_sha256(Path(rec.dest_path)) == rec.image_id

    # an identical file already at the destination name is not copied again
    dest2 = tmp_path / "sorted2"
    first = sort_folder(deployed, src / "d0", tmp_path / "probe", keep_tree=False)
    label = next(iter(first.per_label))
    (dest2 / label).mkdir(parents=True)
    shutil.copy2(src / "d0" / "IMG_0001.jpg", dest2 / label / "IMG_0001.jpg")
    report = sort_folder(deployed, src / "d0", dest2, keep_tree=False)
    assert report.identical_existing == 1 and report.copied == 0
    assert files_under(dest2) == [dest2 / label / "IMG_0001.jpg"]


def test_flags_follow_threshold_and_review_csv(ws, sort_model, shared_data, tmp_path, monkeypatch) -> None:
    deploy_copy(ws, sort_model)
    src = tmp_path / "inbox"
    sample_ikea(shared_data, src, per_class=3, classes=4)
    probe = sort_folder(ws, src, tmp_path / "probe")
    scores = copies.load_records(ws, tmp_path / "probe").score.to_numpy()
    threshold = float(np.median(scores))  # about half above, half below: both sides exercised
    assert scores.min() < threshold <= scores.max() and probe.ok

    monkeypatch.setenv("SORTLOOP_SORT__FLAG_THRESHOLD", str(threshold))
    monkeypatch.setenv("SORTLOOP_SORT__FLAG_STRATEGY", "least_confidence")
    fresh = Workspace(ws.root)  # settings are read once per Workspace object
    dest = tmp_path / "sorted"
    report = sort_folder(fresh, src, dest)
    records = copies.load_records(fresh, dest)
    expected = set(records.dest_path[records.score >= threshold])
    assert records.flagged.tolist() == (records.score >= threshold).tolist()
    np.testing.assert_allclose(records.score, 1 - records.confidence, atol=1e-6)
    assert report.flagged == len(expected) > 0
    with open(dest / REVIEW_CSV, newline="") as fh:
        listed = {row["dest_path"] for row in csv.DictReader(fh)}
    assert listed == expected
    df = manifest.load(fresh).set_index("image_id")
    flagged_ids = set(records.image_id[records.flagged])
    assert set(df.index[df.flag == "low_confidence"]) == flagged_ids


def test_each_flush_writes_the_manifest_once_and_its_review_csv_is_the_one_read_from_disk(
        ws, sort_model, shared_data, tmp_path, monkeypatch) -> None:
    """A flush commits its new rows and their predictions in one manifest write, and lists the flagged copies
    from the tables it just wrote: the same `_review.csv` as a rebuild that reads both back."""
    from loop.sorting import pipeline
    from loop.sorting.copier import Copier
    from loop.sorting.folder import _WorkspaceSink
    from loop.sorting.review_csv import write_review_csv

    deploy_copy(ws, sort_model)
    src = tmp_path / "inbox"
    photos = sample_ikea(shared_data, src, per_class=3, classes=4)
    monkeypatch.setattr(pipeline, "FLUSH_SECONDS", 0.0)  # several flushes in one run: copies collected as each
    real_collect = Copier.collect  # batch is placed (not when their threads happen to finish), so a flush is due

    def collect_all(self, wait: bool = False) -> None:
        real_collect(self, wait=True)

    monkeypatch.setattr(Copier, "collect", collect_all)
    monkeypatch.setenv("SORTLOOP_SORT__BATCH_SIZE", "3")  # the batches of a sort without workers too
    monkeypatch.setenv("SORTLOOP_SORT__FLAG_BUDGET", "0.5")  # about half flagged: a list to compare
    fresh = Workspace(ws.root)
    writes: list[Path] = []
    real_write = manifest.write_table_atomic

    def counting_write(df, path):
        writes.append(Path(path))
        return real_write(df, path)

    monkeypatch.setattr(manifest, "write_table_atomic", counting_write)
    monkeypatch.setattr("loop.tables.write_table_atomic", counting_write)
    flushes = []
    real_flush = _WorkspaceSink.flush

    def counting_flush(self, placed, report):
        flushes.append(len(placed))
        return real_flush(self, placed, report)

    monkeypatch.setattr(_WorkspaceSink, "flush", counting_flush)
    dest = tmp_path / "sorted"
    report = sort_folder(fresh, src, dest)
    assert report.ok and report.copied == len(photos) and 0 < report.flagged < len(photos)
    manifest_writes = sum(p == manifest.manifest_path(fresh) for p in writes)
    assert len(flushes) > 1 and sum(flushes) == len(photos)
    assert manifest_writes == len(flushes)  # one per flush (its new rows and their predictions were two)
    df = manifest.load(fresh).set_index("image_id")
    records = copies.load_records(fresh, dest)
    assert df.loc[records.image_id, "pred_label"].tolist() == records.label.tolist()
    assert set(df.index[df.flag == "low_confidence"]) == set(records.image_id[records.flagged])
    written = (dest / REVIEW_CSV).read_bytes()
    (dest / REVIEW_CSV).unlink()
    write_review_csv(fresh, dest)  # from the tables on disk
    assert (dest / REVIEW_CSV).read_bytes() == written
    assert written.count(b"\n") == 1 + report.flagged


def test_flags_follow_the_target_through_the_models_catch_curve(ws, sort_model, shared_data, tmp_path,
                                                                monkeypatch) -> None:
    """The deployed model's stored catch curve turns `sort.flag_target` into the threshold sort uses."""
    import json

    from loop.scoring.flagging import catch_curve, settings_point

    deploy_copy(ws, sort_model)
    src = tmp_path / "inbox"
    sample_ikea(shared_data, src, per_class=3, classes=4)
    probe = sort_folder(ws, src, tmp_path / "probe")
    scores = np.sort(copies.load_records(ws, tmp_path / "probe").score.to_numpy())
    # a curve as `train` stores it: out-of-fold scores like these photos', mistakes among the less sure
    oof = np.concatenate([scores, scores])
    wrong = np.arange(len(oof)) % len(scores) >= len(scores) // 3
    spec_path = ws.models_dir / "v0001" / "model.json"
    spec = json.loads(spec_path.read_text())
    spec["flagging"] = {"curves": {"least_confidence": catch_curve(oof, wrong)}}
    spec_path.write_text(json.dumps(spec))
    assert probe.ok

    flagged = {}
    for target in ("0.5", "0.95"):
        monkeypatch.setenv("SORTLOOP_SORT__FLAG_TARGET", target)
        fresh = Workspace(ws.root)
        point = settings_point(spec, fresh.settings.sort)
        assert point["strategy"] == "least_confidence" and point["expected_catch"] >= float(target)
        dest = tmp_path / f"sorted-{target}"
        report = sort_folder(fresh, src, dest)
        records = copies.load_records(fresh, dest)
        assert records.flagged.tolist() == (records.score >= point["threshold"]).tolist()
        flagged[target] = report.flagged
    assert 0 < flagged["0.5"] < flagged["0.95"]  # a higher catch target flags more photos


def test_model_version_fixed_at_start(deployed, sort_model, shared_data, tmp_path) -> None:
    deploy_copy(deployed, sort_model, "v0002")
    set_current(deployed, "v0001")
    src = tmp_path / "inbox"
    sample_ikea(shared_data, src, per_class=2, classes=3)
    calls = []

    def deploy_during_run(done: int, total: int | None) -> None:
        if not calls:
            set_current(deployed, "v0002")  # a nightly deploy lands while we sort
        calls.append(done)

    report = sort_folder(deployed, src, tmp_path / "sorted", on_progress=deploy_during_run)
    assert report.model_version == "v0001" and calls[-1] == report.seen == 6
    assert set(copies.load_records(deployed, tmp_path / "sorted").model_version) == {"v0001"}
    assert sort_folder(deployed, src, tmp_path / "next").model_version == "v0002"


def test_interrupted_run_resumes_without_duplicates(deployed, shared_data, tmp_path, monkeypatch) -> None:
    src, dest = tmp_path / "inbox", tmp_path / "sorted"
    sample_ikea(shared_data, src, per_class=2, classes=3)
    real_link, count = os.link, itertools.count()

    def dying_link(a, b):
        if next(count) == 3:
            raise KeyboardInterrupt  # killed mid-copy
        return real_link(a, b)

    monkeypatch.setattr(copies.os, "link", dying_link)
    with pytest.raises(KeyboardInterrupt):
        sort_folder(deployed, src, dest)
    assert gc.get_freeze_count() == 0  # the run's frozen heap is back in the collector's care
    monkeypatch.setattr(copies.os, "link", real_link)
    assert not [p for p in dest.rglob("*") if p.name.startswith(".") and p.is_file()]  # no half files
    assert 3 <= len(files_under(dest)) < 6  # the 4th copy died; copies already in flight may have landed
    recorded = len(copies.load_records(deployed, dest))
    assert recorded >= 3  # finished copies were recorded on the way out

    report = sort_folder(deployed, src, dest)
    assert report.ok and report.already_sorted == recorded and report.copied >= 1
    assert report.copied + report.identical_existing + report.already_sorted == 6
    hashes = [file_sha256(p) for p in files_under(dest)]
    assert len(hashes) == 6 and len(set(hashes)) == 6


def test_the_heap_is_frozen_for_the_run_only(deployed, shared_data, tmp_path) -> None:
    """The objects from before the run skip the collector's full passes while it runs (loop.sorting.pipeline)."""
    sample_ikea(shared_data, tmp_path / "inbox", per_class=1, classes=3)
    during: list[int] = []
    report = sort_folder(deployed, tmp_path / "inbox", tmp_path / "sorted",
                         on_progress=lambda done, total: during.append(gc.get_freeze_count()))
    assert report.copied == 3
    assert max(during) > 1000 and gc.get_freeze_count() == 0


@pytest.mark.parametrize("read_whole", [True, False], ids=["read-once", "large-file-streamed"])
def test_decode_matches_the_one_preprocessing_path(shared_data, tmp_path, monkeypatch, read_whole) -> None:
    from PIL import Image

    from loop.data import images

    if not read_whole:  # a file above the cap is hashed in chunks and decoded from disk: the same results
        monkeypatch.setattr(images, "READ_WHOLE_MAX_BYTES", 0)
    photo = next((shared_data / "ikea_products" / "bed").glob("*.jpg"))
    rotated = tmp_path / "rotated.jpg"
    img = Image.open(photo)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    img.save(rotated, exif=exif)
    exif[0x8769] = {36867: "2024:05:01 13:45:10"}  # DateTimeOriginal, in the EXIF sub-IFD
    dated = tmp_path / "dated.jpg"
    img.save(dated, exif=exif)
    for path in (photo, rotated, dated):
        rec = decode_one(path, 224)
        assert rec.ok and rec.image_id == file_sha256(path) and rec.phash
        np.testing.assert_array_equal(rec.pixels, load_model_input(path, 224))
        # pHash and EXIF time exactly as ingest computes them (loop.data.items), from the same decode
        oriented = open_image(path, draft_size=224)
        assert rec.phash == perceptual_hash(oriented)
        assert rec.taken_at == (exif_taken_at(oriented) if oriented.getexif() else None)
    assert decode_one(dated, 224).taken_at == pd.Timestamp("2024-05-01 13:45:10", tz="UTC")


def test_safe_copy_refuses_a_changed_source(tmp_path) -> None:
    src = tmp_path / "a.jpg"
    src.write_bytes(b"first version")
    st = src.stat()
    image_id = file_sha256(src)
    with pytest.raises(copies.SourceChanged):
        copies.safe_copy(src, tmp_path / "out", "a.jpg", image_id=image_id, size=st.st_size,
                         mtime_ns=st.st_mtime_ns - 1)
    with pytest.raises(copies.SourceChanged):
        copies.safe_copy(src, tmp_path / "out", "a.jpg", image_id="0" * 64, size=st.st_size)
    assert list((tmp_path / "out").iterdir()) == []  # no temp file, no copy
    final, copied = copies.safe_copy(src, tmp_path / "out", "a.jpg", image_id=image_id, size=st.st_size,
                                     mtime_ns=st.st_mtime_ns)
    assert copied and final.read_bytes() == b"first version" and final.stat().st_mtime_ns == st.st_mtime_ns


def test_decode_stream_is_ordered_and_lazy(shared_data) -> None:
    photos = sorted((shared_data / "ikea_products").rglob("*.jpg"))[:6]
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield photos[i % len(photos)]

    stream = decode_stream(endless(), 64, workers=1, chunk=2, prefetch=2, describe=False)
    got = [next(stream).path for _ in range(8)]
    stream.close()
    assert got == [photos[i % 6] for i in range(8)]
    assert len(pulled) <= 8 + 2 * 2 + 2  # only what was asked for plus the bounded prefetch


def test_cli_sort(deployed, shared_data, tmp_path) -> None:
    src = tmp_path / "inbox"
    sample_ikea(shared_data, src, per_class=1, classes=2)
    result = CliRunner().invoke(app, ["sort", str(src), str(tmp_path / "out"), "--flat", "-w", str(deployed.root)])
    assert result.exit_code == 0, result.output
    assert "2 copied" in result.output
    records = copies.load_records(deployed, tmp_path / "out")
    assert all(Path(p).parent.parent == tmp_path / "out" for p in records.dest_path)


def test_refuses_dest_inside_src_and_missing_model(ws, tmp_path) -> None:
    from loop.errors import ModelError, SortloopError

    (tmp_path / "a").mkdir()
    with pytest.raises(SortloopError, match="same folder"):
        sort_folder(ws, tmp_path / "a", tmp_path / "a")
    with pytest.raises(ModelError, match="deploy"):
        sort_folder(ws, tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("name", ["", "..", "a/b", "_misc", ".hidden"])
def test_unusable_class_names_are_refused(name: str) -> None:
    from loop.errors import ModelError
    from loop.sorting.pipeline import check_classes as _check_classes

    _check_classes(["chair", "table"])
    with pytest.raises(ModelError, match="category folder"):
        _check_classes(["chair", name])
