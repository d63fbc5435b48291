"""The bad-input zoo: every broken file is reported with a reason, the rest are sorted, the exit code says so."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from loop.data import manifest
from loop.data.decode import decode_chunk, decode_one, decode_stream
from loop.data.images import file_sha256, load_model_input
from loop.data.ingest import ingest_folder
from loop.errors import ConfigError
from loop.sorting import copies
from loop.sorting.folder import sort_folder
from sortloop.cli import app
from tests.helpers.faults import REPO
from tests.helpers.sorting import deploy_copy, files_under

# file name -> words its failure reason must contain
BROKEN = {
    "truncated.jpg": "truncated",
    "empty.jpg": "empty",
    "notes.jpg": "not an image",
    "bomb.png": "too large",
    "loop.jpg": "symbolic links",
    "pipe.jpg": "not a regular file",
}
READABLE = ["cmyk.jpg", "sixteen.png", "alpha.png", "café photos/été 1 ☀ (copy).jpg", "plain.jpg", "anim.gif"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_zoo(folder: Path, photo: Path) -> None:
    folder.mkdir(parents=True)
    data = photo.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    # a PNG header claiming 100,000 x 100,000 pixels: must be refused before any pixel is allocated
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                                      + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b""))
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")  # a symlink loop with an image name
    os.mkfifo(folder / "pipe.jpg")  # reading it would block forever
    (folder / "sub").mkdir()
    (folder / "sub" / "back").symlink_to(folder)  # a directory loop: must not be walked forever
    img = Image.open(photo)
    img.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.linspace(0, 65535, 96 * 64).reshape(64, 96).astype(np.uint16)).save(folder / "sixteen.png")
    rgba = img.convert("RGBA")
    rgba.putalpha(120)
    rgba.save(folder / "alpha.png")
    (folder / "café photos").mkdir()
    shutil.copy2(photo, folder / "café photos" / "été 1 ☀ (copy).jpg")
    shutil.copy2(photo, folder / "plain.jpg")
    make_animated_gif(folder / "anim.gif", img)


def make_animated_gif(path: Path, img: Image.Image) -> Path:
    """Two frames: the photo, then a flat grey one; sortloop must see the first."""
    first = img.convert("RGB").resize((96, 64))
    first.save(path, save_all=True, append_images=[Image.new("RGB", (96, 64), (128, 128, 128))], duration=100,
               loop=0)
    return path


@pytest.fixture
def zoo(ws, sort_model, shared_data, tmp_path):
    deploy_copy(ws, sort_model)
    photo = sorted((shared_data / "ikea_products" / "chair").glob("*.jpg"))[0]
    make_zoo(tmp_path / "zoo", photo)
    return ws, tmp_path / "zoo"


def test_zoo_reported_rest_sorted(zoo, tmp_path) -> None:
    ws, src = zoo
    before = {p: file_sha256(p) for p in src.rglob("*") if p.is_file() and not p.is_symlink()}
    dest = tmp_path / "sorted"

    report = sort_folder(ws, src, dest)

    assert not report.ok
    reasons = {Path(path).name: reason for path, reason in report.failed}
    assert set(reasons) == set(BROKEN)
    for name, words in BROKEN.items():
        assert words in reasons[name], (name, reasons[name])
    sorted_sources = set(copies.load_records(ws, dest).source_path)
    assert sorted_sources == {str(src / name) for name in READABLE}
    assert len(files_under(dest)) == len(READABLE)  # same bytes in two source folders: two copies (keep_tree)
    for rec in copies.load_records(ws, dest).itertuples():
        assert file_sha256(Path(rec.dest_path)) == file_sha256(Path(rec.source_path))
    after = {p: file_sha256(p) for p in src.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == before  # nothing written into, or changed in, the source
    assert "failures:" in report.summary()


def test_cli_exit_code_and_reasons(zoo, tmp_path) -> None:
    ws, src = zoo
    result = CliRunner().invoke(app, ["sort", str(src), str(tmp_path / "out"), "--flat", "-w", str(ws.root)])
    assert result.exit_code == 1
    for name in BROKEN:
        assert name in result.output
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy2(src / "plain.jpg", clean / "plain.jpg")
    result = CliRunner().invoke(app, ["sort", str(clean), str(tmp_path / "out2"), "-w", str(ws.root)])
    assert result.exit_code == 0, result.output


def crash_on_poison(paths: list[Path], size: int, describe: bool = True):
    """A decoder that dies (like a segfaulting codec) on files named poison*."""
    for p in paths:
        if Path(p).name.startswith("poison"):
            os._exit(3)
    return decode_chunk(paths, size, describe)


def test_a_crashing_decoder_fails_only_its_file(shared_data, tmp_path) -> None:
    photos = sorted((shared_data / "ikea_products" / "desk").glob("*.jpg"))[:5]
    poison = tmp_path / "poison.jpg"
    shutil.copy2(photos[0], poison)
    paths = [*photos[:2], poison, *photos[2:]]
    results = list(decode_stream(paths, 64, workers=2, chunk=2, describe=False, decode_fn=crash_on_poison))
    assert [r.path for r in results] == paths
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert "crashed" in (results[2].error or "")


def test_ingest_reports_the_zoo_exits_1_and_never_hangs(zoo) -> None:
    """Ingest meets the same zoo as sort: a FIFO named pipe.jpg must not block it (a real CLI process)."""
    ws, src = zoo
    done = subprocess.run([sys.executable, "-c", "from sortloop.cli import app; app()", "ingest", str(src),
                           "-w", str(ws.root)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # unreadable files: exit 1, like sort
    assert "Traceback" not in done.stderr
    for name, words in BROKEN.items():
        assert name in done.stderr and words in done.stderr.split(name, 1)[1].splitlines()[0], (name, done.stderr)
    paths = set(manifest.load(ws)["path"])
    # byte-identical files are one image: plain.jpg and the café copy share a row
    assert len(paths) == len(READABLE) - 1 and str(src / "anim.gif") in paths


def test_a_gif_is_its_first_frame(tmp_path, shared_data) -> None:
    photo = sorted((shared_data / "ikea_products" / "sofa").glob("*.jpg"))[0]
    gif = make_animated_gif(tmp_path / "anim.gif", Image.open(photo))
    with Image.open(gif) as frames:
        assert frames.n_frames == 2
        frames.convert("RGB").save(tmp_path / "first.png")
    rec = decode_one(gif, 64)
    assert rec.ok and np.array_equal(rec.pixels, load_model_input(tmp_path / "first.png", 64))


def test_a_binary_items_csv_is_a_clear_error(ws, tmp_path, shared_data) -> None:
    photos = tmp_path / "p"
    photos.mkdir()
    shutil.copy2(sorted((shared_data / "ikea_products" / "bed").glob("*.jpg"))[0], photos / "a.jpg")
    binary = tmp_path / "items.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" + bytes(range(256)))
    with pytest.raises(ConfigError, match="not a UTF-8 text CSV"):
        ingest_folder(ws, photos, items_csv=binary)
    result = CliRunner().invoke(app, ["ingest", str(photos), "--items", str(binary), "-w", str(ws.root)])
    assert result.exit_code == 1 and "not a UTF-8 text CSV" in result.output
    assert not isinstance(result.exception, UnicodeDecodeError)


def slow_or_crash(paths: list[Path], size: int, describe: bool = True):
    """Dies at once on poison*; takes its time on every other file, so those are in flight when it dies."""
    for p in paths:
        if Path(p).name.startswith("poison"):
            os._exit(3)
    time.sleep(0.3)
    return decode_chunk(paths, size, describe)


def test_files_in_flight_when_a_decoder_dies_are_not_blamed(shared_data, tmp_path) -> None:
    """A crash takes every task in flight with it: before, an innocent file in flight during the culprit's
    first crash and its retry used up its own retry and was reported as crashing."""
    photos = sorted((shared_data / "ikea_products" / "desk").glob("*.jpg"))[:4]
    poison = tmp_path / "poison.jpg"
    shutil.copy2(photos[0], poison)
    paths = [photos[0], poison, *photos[1:]]
    for prefetch in (1, 4):  # 1: the culprit is the only task in flight and fails last; the files after it still come
        results = list(decode_stream(paths, 64, workers=2, chunk=1, prefetch=prefetch, describe=False,
                                     decode_fn=slow_or_crash))
        assert [r.path for r in results] == paths
        assert [r.ok for r in results] == [True, False, True, True, True], [r.error for r in results]
        assert "crashed" in (results[1].error or "")
