"""`sortloop bundle OUT`: the standalone sorter, the deployed model and a README, for a PC with no Python.

The bundle is one folder (or a zip of it):

    sortloop-sort[.exe]  _internal/   the sorter frozen by PyInstaller (`sortloop/sortloop-sort.spec`)
    model/model.onnx  model/model.json   the deployed model (and its gated INT8 model.int8.onnx if any);
                                         model.json also carries the workspace's sort settings ("sorting")
                                         and the bundle's identity ("bundle")
    README.txt   bundle.json

The executable depends only on the code, not on the model, so it is built once per code version and
platform and cached in `<workspace>/cache/sorter/<key>/`; a new model only re-assembles the bundle.
A bundle written over an older one replaces it whole (new folder beside it, then swapped in).
Caveat: PyInstaller does not cross-compile: this machine builds a sorter for its own system. For a
Windows PC, take the `sortloop-sort` folder that the Windows CI workflow builds from the same spec
(`.github/workflows/windows-bundle.yml`) and pass it with `--sorter`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from loop import __version__
from loop.errors import ModelError, SortloopError
from loop.learning.registry import current_model_dir
from loop.model.artifact import INT8_FILE, ONNX_FILE, SPEC_FILE, check_artifact, check_files, read_spec
from loop.scoring.flagging import describe, settings_point
from loop.sorting.folder import sort_options
from loop.sorting.pipeline import check_classes
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

SPEC = Path(__file__).with_name("sortloop-sort.spec")
EXE_NAME = "sortloop-sort"
BUNDLE_JSON = "bundle.json"
MODEL_FOLDER = "model"
README = "README.txt"
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "loop", ROOT / "sortloop")  # the code the sorter is frozen from


class BundleError(SortloopError):
    """The bundle cannot be built or written (PyInstaller missing, OUT is something else, ...)."""


@dataclass
class BundleReport:
    """What `build_bundle` wrote."""

    out: Path
    model_version: str
    built_at: str
    size_bytes: int
    sorter: Path  # the frozen sorter folder that was used
    sorter_built: bool  # False: taken from the cache or from --sorter
    replaced: str | None  # model version of the bundle this one replaced

    def summary(self) -> str:
        how = "built" if self.sorter_built else "reused"
        text = (f"wrote {self.out} ({self.size_bytes / 1e6:.1f} MB): sorter {how} from {self.sorter}, "
                f"model {self.model_version}, bundle {self.built_at}")
        if self.replaced is not None:
            text += f"; replaced the bundle with model {self.replaced}"
        return text


def build_bundle(
    ws: Workspace, out: Path | str, *, as_zip: bool = False, sorter: Path | str | None = None,
) -> BundleReport:
    """Write the standalone sorter with the deployed model to `out` (a folder, or a zip with `as_zip`).

    Args:
        ws: the workspace: its deployed model and its `[sort]` flag settings go into the bundle.
        out: the bundle folder (or zip file; `.zip` is added if missing). An older bundle there is replaced;
            anything else there is refused.
        as_zip: write one zip file instead of a folder.
        sorter: a frozen `sortloop-sort` folder built elsewhere from the same spec (e.g. the Windows CI
            artifact); default: build one here (cached per code version).
    Raises:
        ModelError: nothing deployed. BundleError: PyInstaller missing or fails, OUT is not a bundle.

    Example:
        >>> print(build_bundle(open_workspace("data"), "sorter-bundle", as_zip=True).summary())  # doctest: +SKIP
    """
    out = Path(out).expanduser().absolute()
    if as_zip and out.suffix.lower() != ".zip":
        out = out.with_name(out.name + ".zip")
    model_dir = current_model_dir(ws)
    spec = read_spec(model_dir)
    check_classes(list(spec["classes"]))
    if not (model_dir / ONNX_FILE).is_file():
        raise ModelError(f"{model_dir / ONNX_FILE} is missing: the sorter needs the ONNX export; retrain, or "
                         "deploy a version that has one")
    check_files(model_dir, (ONNX_FILE,))  # before minutes of freezing: a damaged export is refused now
    replaced = _existing_bundle(out)
    if sorter is not None:
        frozen, built = _check_sorter(Path(sorter).expanduser().absolute()), False
    else:
        frozen, built = build_sorter(ws)

    built_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    stage = out.with_name(f".{out.stem}.sortloop-new")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        shutil.copytree(frozen, stage, symlinks=True)
        _write_model(ws, model_dir, spec, stage / MODEL_FOLDER, built_at)
        info = {"model_version": spec.get("version", model_dir.name), "built_at": built_at,
                "sortloop": __version__, "system": f"{platform.system()} {platform.machine()}",
                "sorter": _executable(stage).name, "classes": list(spec["classes"]),
                "flags": describe(settings_point(spec, ws.settings.sort))}
        (stage / BUNDLE_JSON).write_text(json.dumps(info, indent=2), encoding="utf-8")
        (stage / README).write_text(readme_text(info), encoding="utf-8", newline="\r\n")
        if as_zip:
            _zip_folder(stage, out)
        else:
            _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = out.stat().st_size if as_zip else sum(p.lstat().st_size for p in out.rglob("*")
                                                 if p.is_file() and not p.is_symlink())
    report = BundleReport(out, str(info["model_version"]), built_at, size, frozen, built, replaced)
    logger.info(report.summary())
    return report


def build_sorter(ws: Workspace) -> tuple[Path, bool]:
    """The frozen sorter folder for this code and platform: from the cache, else built with PyInstaller.

    Returns (folder, built now?).
    """
    cached = ws.cache_dir / "sorter" / sorter_key() / EXE_NAME
    if _executable_or_none(cached) is not None:
        return cached, False
    try:
        version("pyinstaller")
    except PackageNotFoundError:
        raise BundleError("building the sorter needs PyInstaller: `pip install 'sortloop[bundle]'`, or pass "
                          "--sorter with a sortloop-sort folder built elsewhere") from None
    work = cached.parent.with_name(cached.parent.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logger.info("building the standalone sorter with PyInstaller (a minute or two)")
    cmd = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
           "--distpath", str(work / "dist"), "--workpath", str(work / "build"), str(SPEC)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise BundleError(f"PyInstaller failed (exit {done.returncode}): {done.stderr.strip()[-600:]}")
    shutil.rmtree(cached.parent, ignore_errors=True)
    cached.parent.mkdir(parents=True)
    os.replace(work / "dist" / EXE_NAME, cached)
    shutil.rmtree(work, ignore_errors=True)
    return cached, True


def sorter_key() -> str:
    """What the frozen sorter depends on: the code it is frozen from, the spec, PyInstaller, this system."""
    digest = hashlib.sha256()
    for path in sorted(p for package in PACKAGES for p in package.rglob("*.py")) + [SPEC]:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    for name in ("pyinstaller", "onnxruntime", "numpy", "pillow", "pillow-heif"):
        try:
            digest.update(f"{name}={version(name)}".encode())
        except PackageNotFoundError:
            digest.update(name.encode())
    digest.update(f"{sys.version}|{platform.system()}|{platform.machine()}".encode())
    return digest.hexdigest()[:16]


def readme_text(info: dict) -> str:
    """The one page for the person at the PC."""
    exe = info["sorter"]
    classes = ", ".join(info["classes"])
    return f"""SORTLOOP PHOTO SORTER
=====================
Model {info['model_version']}, built {info['built_at']}. Nothing to install: no Python needed.

WHAT IT DOES
  It COPIES every photo in a folder into one sub-folder per category:
    {classes}
  Your original photos are never moved, changed or deleted.

HOW TO USE IT
  1. Unzip this whole folder somewhere (keep "{exe}", "_internal" and "model" together).
  2. Drag the folder of photos onto "{exe}".
     The sorted copies go to a new folder beside it, named "<your folder> sorted".
     A window shows the progress, then a summary. Press Enter to close it.
  Or, in a command prompt:   {exe} "D:\\Photos\\new" "D:\\Photos\\sorted"
  Running it again on the same folder only sorts the new photos.

UNSURE PHOTOS
  Photos the model is not sure about are still copied to its best guess, and listed in
  "_review.csv" in the sorted folder (the model's flags: {info['flags']}).

IF A PHOTO IS IN THE WRONG FOLDER
  Move it (drag it) into the right category folder. That is all: when the sorted folder
  is next checked on the main computer ("sortloop scan"), your move teaches the model.
  Do not rename category folders, and do not delete the hidden ".sortloop" folder:
  it records what was sorted.

A NEWER SORTER
  When you receive a new bundle, delete this folder and use the new one. An old sorter
  refuses to sort into a folder that a newer one has sorted.

IF SOMETHING GOES WRONG
  The window says which photos were not sorted and why (damaged file, not a photo...).
  Windows may warn about an unknown program the first time: choose "More info" then "Run anyway".
"""


# --- helpers -----------------------------------------------------------------------------------------


def _write_model(ws: Workspace, model_dir: Path, spec: dict, target: Path, built_at: str) -> None:
    """model.onnx as deployed; model.json = the spec + the sort settings + the bundle's identity."""
    target.mkdir(parents=True)
    shutil.copy2(model_dir / ONNX_FILE, target / ONNX_FILE)
    files = {k: v for k, v in spec.get("files", {}).items() if k != "weights"}  # no safetensors: ONNX only
    if (model_dir / INT8_FILE).is_file():  # sort.precision "auto" uses it when it passed its gate: so does the PC
        shutil.copy2(model_dir / INT8_FILE, target / INT8_FILE)
        files["int8"] = INT8_FILE
    options = sort_options(ws)
    full = {**spec, "version": spec.get("version", model_dir.name),
            "sorting": {"flag_strategy": options.flag_strategy, "flag_target": options.flag_target,
                        "flag_budget": options.flag_budget, "flag_threshold": options.flag_threshold,
                        "keep_tree": options.keep_tree, "batch_size": options.batch_size,
                        "workers": options.workers, "precision": options.precision},
            "bundle": {"built_at": built_at, "sortloop": __version__}}
    full["files"] = files
    full["checksums"] = {name: digest for name, digest in (spec.get("checksums") or {}).items()
                         if (target / name).is_file()}  # what the PC gets, checked there when it loads
    (target / SPEC_FILE).write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
    try:
        check_artifact(target)  # the copies as they landed: a truncated model never ships
    except ModelError as exc:
        raise BundleError(f"the bundled model is not usable: {exc}") from None


def _executable_or_none(folder: Path) -> Path | None:
    for name in (EXE_NAME + ".exe", EXE_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def _executable(folder: Path) -> Path:
    exe = _executable_or_none(folder)
    if exe is None:
        raise BundleError(f"no {EXE_NAME} or {EXE_NAME}.exe in {folder}; give the folder PyInstaller made "
                          "from sortloop/sortloop-sort.spec")
    return exe


def _check_sorter(folder: Path) -> Path:
    if folder.is_file():
        folder = folder.parent
    _executable(folder)
    return folder


def _existing_bundle(out: Path) -> str | None:
    """The model version of the bundle at `out` (None if nothing is there); BundleError if `out` holds
    something that is not a bundle (never overwrite what sortloop did not write)."""
    if not out.exists():
        return None
    if out.is_dir():
        if not any(out.iterdir()):
            return None
        info_path = out / BUNDLE_JSON
        text = info_path.read_text(encoding="utf-8") if info_path.is_file() else None
    else:
        try:
            with zipfile.ZipFile(out) as zf:
                names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/" + BUNDLE_JSON)]
                text = zf.read(names[0]).decode("utf-8")
        except (zipfile.BadZipFile, IndexError, OSError):
            text = None
    if text is None:
        raise BundleError(f"{out} exists and is not a sortloop bundle; choose a new folder name")
    return str(json.loads(text).get("model_version"))


def _swap_in(stage: Path, out: Path) -> None:
    """Put the new bundle folder at `out`; the old one goes only once the new one is in place."""
    old = out.with_name(f".{out.name}.sortloop-old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _zip_folder(stage: Path, out: Path) -> None:
    """Zip the bundle (deflated; the executable bit is kept for Linux/macOS) and rename it over `out`."""
    tmp = out.with_name(f".{out.name}.sortloop-tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in sorted(stage.rglob("*")):
            if path.is_file() or path.is_symlink():
                zf.write(path, Path(out.stem) / path.relative_to(stage))
    os.replace(tmp, out)
