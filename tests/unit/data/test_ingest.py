"""Ingest: idempotence, unreadable files, labels from folders, items from a CSV or inferred, on real photos."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict

import pandas as pd
from typer.testing import CliRunner

from loop.data import manifest
from loop.data.images import file_sha256
from loop.data.ingest import ingest_folder
from loop.data.splits import straddling_items
from loop.workspace import open_workspace
from sortloop.cli import app
from tests.conftest import make_image

runner = CliRunner()


def test_ingest_is_idempotent_and_reports_unreadable_files(ws, tmp_path):
    root = tmp_path / "photos"
    make_image(root / "table" / "a.jpg", (200, 10, 10))
    make_image(root / "table" / "sub" / "b.png", (10, 200, 10), fmt="PNG")
    make_image(root / "console" / "c.jpg", (10, 10, 200))
    (root / "console" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "console" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image name")

    first = ingest_folder(ws, root, source="user", labeled=True)
    assert (first.added, first.labeled, len(first.unreadable)) == (3, 3, 2)
    reasons = dict(first.unreadable)
    assert "empty" in reasons[str(root / "console" / "empty.jpg")]
    assert "corrupt" in reasons[str(root / "console" / "broken.jpg")]
    df = manifest.load(ws).set_index("path")
    assert df.loc[str((root / "table" / "sub" / "b.png").resolve()), "label"] == "table"  # first folder wins

    again = ingest_folder(ws, root, source="user", labeled=True)
    assert (again.added, again.already_present) == (0, 3)
    shutil.copytree(root, tmp_path / "renamed")  # same bytes elsewhere = same images
    assert ingest_folder(ws, tmp_path / "renamed", source="user", labeled=True).added == 0
    assert len(manifest.load(ws)) == 3
    assert len(manifest.history(ws)) == 3  # one history line per folder label, none repeated


def test_cli_ingest_eth80_with_items_csv_never_straddles(tmp_path, shared_data):
    eth = shared_data / "eth80"
    items = tmp_path / "items.csv"
    meta = pd.read_csv(eth / "manifest.csv")
    meta[["path", "group"]].rename(columns={"group": "item_id"}).to_csv(items, index=False)
    wsdir = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(wsdir)]).exit_code == 0
    result = runner.invoke(
        app, ["ingest", str(eth), "--source", "user", "--labeled", "--items", str(items), "-w", str(wsdir)]
    )
    assert result.exit_code == 0, result.output
    df = manifest.load(open_workspace(wsdir))
    assert len(df) == len(meta) and (df["item_rule"] == "csv").all()
    assert straddling_items(df) == []
    assert df["item_id"].nunique() == meta["group"].nunique()
    # user photos: about a fifth of each class's items in the gate set, every class on both sides
    per_class = df.groupby(["label", "split"])["item_id"].nunique().unstack()
    assert (per_class["train"] >= 1).all() and (per_class["valid"] >= 1).all()
    assert abs(df.drop_duplicates("item_id")["split"].eq("valid").mean() - 0.2) < 0.1


def test_ikea_inferred_items_keep_identical_and_near_duplicates_together(ws, shared_data):
    ikea = shared_data / "ikea_products"
    report = ingest_folder(ws, ikea, source="web", labeled=True)
    df = manifest.load(ws)
    assert straddling_items(df) == []
    # byte-identical files in the dataset: each set is one manifest row, hence one split
    by_hash = defaultdict(list)
    for path in sorted(ikea.rglob("*.jpg")):
        by_hash[file_sha256(path)].append(path)
    identical = {h: ps for h, ps in by_hash.items() if len(ps) > 1}
    assert identical, "the dataset is known to hold byte-identical copies"
    # into an empty manifest: copies within the run are duplicates, not "already in the manifest"
    assert (report.duplicates, report.already_present) == (sum(len(ps) - 1 for ps in identical.values()), 0)
    assert f"{report.duplicates} duplicate copies of photos in this folder" in report.summary()
    assert set(identical) <= set(df["image_id"])
    near = df[df["item_rule"] == "near_duplicate"]
    assert len(near) > 0 and (df.groupby("item_id")["label"].nunique() == 1).all()
    # web images: about 20% of items held out
    assert 0.1 < df.drop_duplicates("item_id")["split"].eq("valid").mean() < 0.3


def test_items_csv_with_bad_columns_is_a_clear_error(ws, tmp_path):
    make_image(tmp_path / "p" / "x" / "a.jpg", (1, 2, 3))
    bad = tmp_path / "items.csv"
    with open(bad, "w", newline="") as fh:
        csv.writer(fh).writerows([["file", "group"], ["x/a.jpg", "g1"]])
    result = runner.invoke(app, ["ingest", str(tmp_path / "p"), "--items", str(bad), "-w", str(ws.root)])
    assert result.exit_code == 1 and "needs columns 'path' and 'item_id'" in result.output


def test_symlinked_files_pointing_outside_the_folder_are_ingested_where_found(ws, tmp_path):
    outside = make_image(tmp_path / "elsewhere" / "real.jpg", (90, 30, 160))
    link = tmp_path / "photos" / "bed" / "link.jpg"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    report = ingest_folder(ws, tmp_path / "photos", labeled=True)
    assert (report.added, report.labeled) == (1, 1)
    row = manifest.load(ws).iloc[0]
    assert row["label"] == "bed" and row["path"] == str(link)


def _photo_taken_at(path, when: str, color) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 48), color)
    for i in range(48):  # a different stripe per photo, so pHash alone would not join them
        img.putpixel((i if sum(color) % 2 else 63 - i, i), (255, 255, 255))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = when  # DateTimeOriginal
    img.save(path, "JPEG", exif=exif)


def test_burst_rule_joins_photos_taken_seconds_apart_in_one_folder_when_enabled(ws, tmp_path):
    shots = tmp_path / "shots"
    _photo_taken_at(shots / "table" / "a.jpg", "2026:05:01 10:00:00", (200, 30, 30))
    _photo_taken_at(shots / "table" / "b.jpg", "2026:05:01 10:00:04", (30, 200, 30))
    _photo_taken_at(shots / "table" / "c.jpg", "2026:05:01 11:30:00", (30, 30, 201))
    ws.config_file.write_text("[items]\nburst_seconds = 10\n")
    ws = open_workspace(ws.root)
    ingest_folder(ws, shots, labeled=True)
    df = manifest.load(ws).assign(name=lambda d: d["path"].str.rsplit("/", n=1).str[-1]).set_index("name")
    assert df.at["a.jpg", "item_id"] == df.at["b.jpg", "item_id"] and df.at["b.jpg", "item_rule"] == "burst"
    assert df.at["c.jpg", "item_id"] != df.at["a.jpg", "item_id"]  # 90 minutes later: another item
    assert df.at["a.jpg", "taken_at"] == pd.Timestamp("2026-05-01 10:00:00", tz="UTC")


def test_burst_rule_is_off_by_default(ws, tmp_path):
    _photo_taken_at(tmp_path / "s" / "x" / "a.jpg", "2026:05:01 10:00:00", (200, 30, 30))
    _photo_taken_at(tmp_path / "s" / "x" / "b.jpg", "2026:05:01 10:00:01", (30, 200, 30))
    ingest_folder(ws, tmp_path / "s", labeled=True)
    assert manifest.load(ws)["item_id"].nunique() == 2
