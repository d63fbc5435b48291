"""The standalone sorter and its bundle: same results as `sortloop sort`, its record in DEST comes back
through `scan`, an older bundle gives way to a newer one, and the Windows CI recipe builds what we test."""

from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from loop.data import manifest
from loop.errors import ModelError, SortloopError
from loop.folders.corrections import scan
from loop.sorting import copies, dest_copies, dest_record
from loop.sorting.folder import sort_folder
from sortloop.bundle import (
    BUNDLE_JSON,
    EXE_NAME,
    PLATFORM_NAMES,
    BundleError,
    build_bundle,
    this_platform,
)
from tests.helpers.models import copy_workspace
from tests.helpers.sorting import deploy_copy, sample_ikea

REPO = Path(__file__).resolve().parents[3]
WORKFLOW = REPO / ".github" / "workflows" / "windows-bundle.yml"
HEAVY = ("pandas", "pyarrow", "torch", "timm", "fastai", "typer", "rich", "pydantic", "matplotlib")


def _run_sorter_from_source(*args: str, timeout: float = 600) -> dict:
    """`sortloop.sorter.main(args)` in a fresh interpreter; returns its exit code, output and heavy imports."""
    code = ("import json, sys\nfrom sortloop.sorter import main\nrc = main(sys.argv[1:])\n"
            f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "out": proc.stdout, "err": proc.stderr}


def _by_source(rows: list[dict], src: Path, dest: Path) -> dict[str, dict]:
    """{source path relative to src: {dest (relative), label, conf, flagged}} for comparing two sorts."""
    return {str(Path(r["source_path"]).relative_to(src)): {
        "dest": str(Path(r["dest_path"]).relative_to(dest)) if Path(r["dest_path"]).is_absolute() else r["dest_path"],
        "label": r["label"], "conf": float(r["confidence"]), "flagged": str(r["flagged"]) in ("1", "True", "true")}
        for r in rows}


def _assert_same(frozen: dict[str, dict], main: dict[str, dict]) -> None:
    assert frozen.keys() == main.keys()
    for key in main:
        f, m = frozen[key], main[key]
        assert (f["label"], f["flagged"], Path(f["dest"])) == (m["label"], m["flagged"], Path(m["dest"])), key
        assert abs(f["conf"] - m["conf"]) <= 1e-5, (key, f["conf"], m["conf"])


def _move_one(dest: Path, classes: list[str]) -> tuple[Path, str]:
    """A simulated user move: the first copy goes to another category folder. Returns (new path, category)."""
    first = sorted(p for p in dest.rglob("*.jpg") if ".sortloop" not in p.parts)[0]
    old = first.relative_to(dest).parts[0]
    new = next(c for c in classes if c != old)
    target = dest / new / first.name
    target.parent.mkdir(parents=True, exist_ok=True)
    first.rename(target)
    return target, new


# --- the sorter run from source (fast: no freezing) ------------------------------------------------------


@pytest.fixture
def sorter_setup(tmp_path: Path, ws, sort_model: Path, shared_data: Path):
    """A deployed untrained model (unsure guesses: many flags), its folder, and 12 real photos."""
    deploy_copy(ws, sort_model)
    photos = tmp_path / "inbox"
    sample_ikea(shared_data, photos, per_class=3, classes=4)
    return ws, ws.models_dir / "v0001", photos


def test_sorter_matches_sort_without_heavy_imports_and_scan_brings_moves_back(sorter_setup, tmp_path: Path) -> None:
    ws, model_dir, photos = sorter_setup
    # a dropped folder (no DEST): sorted into "<folder> sorted" beside it
    run = _run_sorter_from_source(str(photos), "--model", str(model_dir), "--workers", "1")
    dest = photos.with_name("inbox sorted")
    assert run["rc"] == 0, run["err"]
    assert run["heavy"] == []  # the sort path runs with numpy, Pillow and ONNX Runtime only
    rows = dest_copies.read_rows(dest)
    assert len(rows) == 12 and (dest / "_review.csv").exists()
    main_dest = tmp_path / "main"
    assert sort_folder(ws, photos, main_dest).ok
    _assert_same(_by_source(rows, photos, dest), _by_source(copies.load_records(ws, main_dest).to_dict("records"),
                                                            photos, main_dest))
    flagged = {r["image_id"] for r in rows if r["flagged"] == "1"}
    assert flagged, "an untrained head should be unsure about some photos"

    # a rerun copies nothing; the record does not grow
    again = _run_sorter_from_source(str(photos), str(dest), "--model", str(model_dir), "--workers", "0")
    assert again["rc"] == 0 and "12 sorted before" in again["out"]
    assert len(dest_copies.read_rows(dest)) == 12

    # back on the main machine: scan imports the record, sees the move as a correction, flags reach review
    classes = json.loads((model_dir / "model.json").read_text())["classes"]
    moved, new_cat = _move_one(dest, classes)
    report = scan(ws, dest)
    assert [(Path(m.new_path), m.new_category) for m in report.corrections] == [(moved, new_cat)]
    assert report.imported == 12 and report.summary().startswith("imported 12 copies")
    df = manifest.load(ws).set_index("image_id")
    moved_id = next(r["image_id"] for r in rows if Path(r["dest_path"]).name == moved.name)
    assert df.at[moved_id, "label"] == new_cat and df.at[moved_id, "label_source"] == "user_move"
    assert df.loc[sorted(flagged - {moved_id}), "flag"].eq("low_confidence").all()
    again = scan(ws, dest)
    assert len(copies.load_records(ws, dest)) == 12 and again.imported == 0 and again.corrections == []  # once

    # a crash mid-append leaves a torn last line: it is skipped, the rest still reads
    with open(dest_copies.copies_csv(dest), "a", encoding="utf-8") as fh:
        fh.write("deadbeef,abc,/x.jpg,12")
    assert len(dest_copies.read_rows(dest)) == 12


def test_the_sorter_forgives_a_double_click_and_several_dropped_folders(sorter_setup, tmp_path: Path) -> None:
    from sortloop.sorter import HELP, plan

    ws, model_dir, photos = sorter_setup
    # a double-click: no folder at all -> a paragraph of help (and, in a console window, the pause), exit 2
    run = _run_sorter_from_source("--model", str(model_dir))
    assert run["rc"] == 2 and HELP.splitlines()[0] in run["out"] and "required" not in run["err"]

    # two folders dropped at once: each sorted into its own "<folder> sorted", neither into the other
    second = tmp_path / "second inbox"
    shutil.copytree(photos, second)
    run = _run_sorter_from_source(str(photos), str(second), "--model", str(model_dir), "--workers", "0")
    assert run["rc"] == 0, run["err"]
    for src in (photos, second):
        assert len(dest_record.read_rows(src.with_name(src.name + " sorted"))) == 12
    assert not (second / ".sortloop").exists() and not list(second.glob("*/*/*.jpg"))  # second is untouched

    # typed SRC DEST still means "into DEST" when DEST is new or was sorted before; --dest always does
    new_dest, sorted_before = tmp_path / "new", photos.with_name("inbox sorted")
    assert plan([photos, new_dest], None) == [(photos, new_dest)]
    assert plan([second, sorted_before], None) == [(second, sorted_before)]
    assert plan([photos], tmp_path / "d") == [(photos, tmp_path / "d")]
    with pytest.raises(SortloopError, match="--dest takes one folder"):
        plan([photos, second], tmp_path / "d")


def test_the_bundle_flags_at_the_models_operating_point_like_sort(sorter_setup, sort_model: Path,
                                                                    tmp_path: Path) -> None:
    """Flags come from the catch curves in model.json (here: only `margin`, so "auto" must pick it and its
    threshold for an 80% catch), not from a fixed 0.5: the bundle ships them and flags exactly like sort."""
    import numpy as np

    from loop.scoring.flagging import catch_curve, describe, settings_point
    from sortloop.sorter import sort_standalone

    ws, model_dir, photos = sorter_setup
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.5, 1.0, 200)
    curve = catch_curve(scores, rng.uniform(0.5, 1.0, 200) < scores)  # less sure = more often wrong
    spec = json.loads((model_dir / "model.json").read_text())
    spec["flagging"] = {"n": 200, "mistakes": 100, "curves": {"margin": curve}}
    (model_dir / "model.json").write_text(json.dumps(spec))
    point = settings_point(spec, ws.settings.sort)
    assert point["strategy"] == "margin" and point["threshold"] not in (None, 0.5)

    bundle = build_bundle(ws, tmp_path / "bundle", sorter=_fake_sorter(tmp_path))
    shipped = json.loads((bundle.out / "model" / "model.json").read_text())
    assert shipped["flagging"] == spec["flagging"]
    assert describe(point) in (bundle.out / "README.txt").read_text()  # in plain words
    standalone = sort_standalone(photos, tmp_path / "pc", bundle.out / "model", workers=1)
    main = sort_folder(ws, photos, tmp_path / "main")
    assert standalone.ok and main.ok and standalone.flag_strategy == main.flag_strategy == "margin"
    rows = dest_copies.read_rows(tmp_path / "pc")
    records = copies.load_records(ws, tmp_path / "main").to_dict("records")
    for row in rows:
        assert (row["flagged"] == "1") == (float(row["score"]) >= point["threshold"]), row
    _assert_same(_by_source(rows, photos, tmp_path / "pc"), _by_source(records, photos, tmp_path / "main"))
    assert any(row["flagged"] == "1" for row in rows), "the threshold should flag some of these photos"
    for dest in (tmp_path / "pc", tmp_path / "main"):
        with open(dest / "_review.csv", newline="", encoding="utf-8") as fh:
            assert {r["strategy"] for r in csv.DictReader(fh)} <= {"margin"}


def test_an_older_bundle_refuses_a_folder_a_newer_one_sorted(sorter_setup, tmp_path: Path) -> None:
    _, model_dir, photos = sorter_setup
    dest = tmp_path / "sorted"
    dest_record.note_bundle(dest, "2030-01-01T00:00:00.000000Z", "v0009")
    spec = json.loads((model_dir / "model.json").read_text())
    spec["bundle"] = {"built_at": "2026-01-01T00:00:00.000000Z"}
    (model_dir / "model.json").write_text(json.dumps(spec))
    with pytest.raises(SortloopError, match="newer sorter"):
        dest_record.check_bundle(dest, "2026-01-01T00:00:00.000000Z", "v0001")
    run = _run_sorter_from_source(str(photos), str(dest), "--model", str(model_dir), "--workers", "0")
    assert run["rc"] == 2 and "newer sorter" in run["err"] and not (dest / "_review.csv").exists()
    dest_record.check_bundle(dest, "2031-01-01T00:00:00.000000Z", "v0002")  # a newer one may
    dest_record.note_bundle(dest, "2029-01-01T00:00:00.000000Z", "v0003")  # an older note never wins
    assert json.loads((dest / ".sortloop" / "sorter.json").read_text())["model_version"] == "v0009"


# --- the bundle's assembly (with a stand-in executable: freezing is the slow test below) ------------------


def _fake_sorter(tmp_path: Path) -> Path:
    folder = tmp_path / "frozen" / EXE_NAME
    (folder / "_internal").mkdir(parents=True)
    (folder / EXE_NAME).write_text("#!/bin/sh\n")
    (folder / "_internal" / "lib.so").write_bytes(b"x" * 100)
    return folder


def test_bundle_layout_replacement_and_zip(ws, sort_model: Path, tmp_path: Path) -> None:
    deploy_copy(ws, sort_model)
    fake = _fake_sorter(tmp_path)
    out = tmp_path / "bundle"
    first = build_bundle(ws, out, sorter=fake)
    assert not first.sorter_built and first.replaced is None
    assert {p.name for p in out.iterdir()} == {EXE_NAME, "_internal", "model", "README.txt", BUNDLE_JSON}
    spec = json.loads((out / "model" / "model.json").read_text())
    assert spec["version"] == "v0001" and spec["bundle"]["built_at"] == first.built_at
    assert spec["sorting"]["flag_threshold"] == ws.settings.sort.flag_threshold
    assert (out / "model" / "model.onnx").read_bytes() == (ws.models_dir / "v0001" / "model.onnx").read_bytes()
    readme = (out / "README.txt").read_text()
    assert "v0001" in readme and "Drag a folder of photos" in readme and "sortloop scan" in readme
    assert first.platform == this_platform() and f"{PLATFORM_NAMES[first.platform]} bundle" in first.summary()
    assert ">=" not in readme and "entropy" not in readme  # plain words: the numbers stay in model.json

    # a newer model: the bundle is replaced whole
    deploy_copy(ws, sort_model, "v0002")
    (out / "stale.txt").write_text("from the old bundle")
    second = build_bundle(ws, out, sorter=fake)
    assert second.replaced == "v0001" and second.built_at > first.built_at
    assert json.loads((out / BUNDLE_JSON).read_text())["model_version"] == "v0002"
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob(".bundle*"))

    zipped = build_bundle(ws, tmp_path / "ship", as_zip=True, sorter=fake)
    assert zipped.out == tmp_path / "ship.zip"
    with zipfile.ZipFile(zipped.out) as zf:
        assert {"ship/bundle.json", "ship/model/model.onnx", f"ship/{EXE_NAME}"} <= set(zf.namelist())
    assert build_bundle(ws, zipped.out, as_zip=True, sorter=fake).replaced == "v0002"

    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"mine")
    with pytest.raises(BundleError, match="not a sortloop bundle"):
        build_bundle(ws, other, sorter=fake)
    assert (other / "keep.jpg").read_bytes() == b"mine"
    with pytest.raises(BundleError, match="no sortloop-sort"):
        build_bundle(ws, tmp_path / "x", sorter=tmp_path)
    (ws.models_dir / "v0002" / "model.onnx").unlink()
    with pytest.raises(ModelError, match="ONNX"):
        build_bundle(ws, out, sorter=fake)
    assert json.loads((out / BUNDLE_JSON).read_text())["model_version"] == "v0002"  # the old bundle is kept


def test_bundle_command(ws, sort_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sortloop.cli import app

    deploy_copy(ws, sort_model)
    result = CliRunner().invoke(app, ["bundle", str(tmp_path / "b"), "--zip", "--sorter", str(_fake_sorter(tmp_path)),
                                      "-w", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert "model v0001" in result.output and (tmp_path / "b.zip").is_file()
    result = CliRunner().invoke(app, ["bundle", str(tmp_path / "c"), "--sorter", str(tmp_path), "-w", str(ws.root)])
    assert result.exit_code == 1 and "no sortloop-sort" in result.output


def test_a_bundle_names_its_platform_and_a_windows_one_needs_the_windows_sorter(ws, sort_model: Path,
                                                                                 tmp_path: Path) -> None:
    deploy_copy(ws, sort_model)
    if this_platform() != "windows":  # PyInstaller cannot build for Windows here: refused, saying where one comes from
        with pytest.raises(BundleError, match="sortloop-sort-windows.*windows-bundle.yml.*--sorter"):
            build_bundle(ws, tmp_path / "win", as_zip=True, for_platform="windows")
        assert not (tmp_path / "win.zip").exists()
    with pytest.raises(SortloopError, match="did you mean 'windows'"):
        build_bundle(ws, tmp_path / "x", for_platform="widnows")
    # the CI artifact: a folder holding sortloop-sort.exe is a Windows sorter, and its README.txt says Windows
    win = tmp_path / "artifact" / EXE_NAME
    (win / "_internal").mkdir(parents=True)
    (win / f"{EXE_NAME}.exe").write_bytes(b"MZ")
    report = build_bundle(ws, tmp_path / "shop-pc", as_zip=True, sorter=win)
    assert report.platform == "windows" and "wrote a Windows bundle" in report.summary()
    assert f"{report.size_bytes / 1e6:.0f} MB zipped, {report.unpacked_bytes / 1e6:.0f} MB unzipped" in report.summary()
    with zipfile.ZipFile(report.out) as zf:
        readme = zf.read("shop-pc/README.txt").decode()
        assert json.loads(zf.read("shop-pc/bundle.json"))["platform"] == "windows"
        assert report.unpacked_bytes == sum(i.file_size for i in zf.infolist())
    assert "(Windows)" in readme and "D:\\Photos" in readme and "Run anyway" in readme and "\r\n" in readme
    with pytest.raises(BundleError, match="is a Windows sorter, not a Linux one"):
        build_bundle(ws, tmp_path / "y", sorter=win, for_platform="linux")
    if this_platform() == "linux":
        linux = build_bundle(ws, tmp_path / "linux", sorter=_fake_sorter(tmp_path))
        text = (linux.out / "README.txt").read_text()
        assert "(Linux)" in text and "D:\\" not in text and "Run anyway" not in text and "chmod +x" in text


# --- the Windows CI recipe ---------------------------------------------------------------------------------


def test_windows_workflow_builds_with_the_spec_and_runs_the_smoke_test() -> None:
    yaml = pytest.importorskip("yaml")
    flow = yaml.safe_load(WORKFLOW.read_text())
    job = flow["jobs"]["build"]
    assert job["runs-on"] == "windows-latest"
    runs = " ".join(step.get("run", "") for step in job["steps"])
    spec = "sortloop/sortloop-sort.spec"
    assert f"pyinstaller --noconfirm --distpath dist --workpath build {spec}" in runs and (REPO / spec).exists()
    assert "tests/unit/sortloop/test_bundle.py" in runs and '-k "frozen_sorter_smoke"' in runs
    tests = {n.name for n in ast.parse(Path(__file__).read_text()).body if isinstance(n, ast.FunctionDef)}
    assert "test_frozen_sorter_smoke" in tests
    smoke = next(s for s in job["steps"] if "frozen_sorter_smoke" in s.get("run", ""))
    assert smoke["env"]["SORTLOOP_PREBUILT_SORTER"].endswith("dist/sortloop-sort")  # the exe built above


# --- the acceptance test: the frozen sorter, in a clean environment, on real photos ------------------------


def _clean_command(exe: Path, *args: str) -> tuple[list[str], dict[str, str] | None]:
    """The command and environment of a run with no venv and no Python on PATH (`env -i` on POSIX)."""
    if os.name == "posix":
        return ["env", "-i", str(exe), *args], None
    return [str(exe), *args], {"SYSTEMROOT": os.environ.get("SYSTEMROOT", r"C:\Windows")}


@pytest.fixture(scope="session")
def frozen_bundle(tmp_path_factory, trained_ikea, shared_data: Path):
    """The trained ikea workspace (a private copy), 66 real photos, and its bundle, frozen once per session
    (or the folder $SORTLOOP_PREBUILT_SORTER built by the Windows workflow)."""
    root = tmp_path_factory.mktemp("bundle")
    ws = copy_workspace(trained_ikea[0], root / "ws")
    photos = root / "photos"
    sample_ikea(shared_data, photos, per_class=6, classes=11)
    report = build_bundle(ws, root / "bundle", sorter=os.environ.get("SORTLOOP_PREBUILT_SORTER"))
    return ws, photos, report


@pytest.mark.slow
def test_frozen_sorter_smoke(frozen_bundle, tmp_path: Path) -> None:
    ws, photos, bundle = frozen_bundle
    exe = next(p for p in (bundle.out / f"{EXE_NAME}.exe", bundle.out / EXE_NAME) if p.exists())
    deployed = ws.models_dir / json.loads((bundle.out / BUNDLE_JSON).read_text())["model_version"]
    assert (bundle.out / "model" / "model.int8.onnx").exists() == (deployed / "model.int8.onnx").exists()
    dest = tmp_path / "frozen sorted"
    cmd, env = _clean_command(exe, str(photos), str(dest))
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "sorted photos are in" in proc.stdout

    main_dest = tmp_path / "main sorted"
    assert sort_folder(ws, photos, main_dest).ok  # what `sortloop sort` runs
    rows = dest_copies.read_rows(dest)
    frozen = _by_source(rows, photos, dest)
    main = _by_source(copies.load_records(ws, main_dest).to_dict("records"), photos, main_dest)
    assert len(main) >= 50
    _assert_same(frozen, main)
    flags = {v["flagged"] for v in main.values()}
    assert flags == {True, False}, "the comparison should cover flagged and unflagged photos"
    for rel in main:
        assert (dest / frozen[rel]["dest"]).read_bytes() == (photos / rel).read_bytes()

    # a person at the PC moves a copy; the main machine's scan sees it as a correction
    moved, new_cat = _move_one(dest, json.loads((bundle.out / "model" / "model.json").read_text())["classes"])
    report = scan(ws, dest)
    assert [(Path(m.new_path), m.new_category) for m in report.corrections] == [(moved, new_cat)]
    moved_id = next(r["image_id"] for r in rows if Path(r["dest_path"]).name == moved.name)
    assert manifest.load(ws).set_index("image_id").at[moved_id, "label_source"] == "user_move"

