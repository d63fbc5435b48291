"""`sortloop bundle OUT`: the standalone sorter, the deployed model and a README, for a PC with no Python.

The bundle is one folder (or a zip of it):

    sortloop-sort[.exe]  _internal/   the sorter frozen by PyInstaller (`sortloop/sortloop-sort.spec`)
    model/model.onnx  model/model.json   the deployed model (and its gated INT8 model.int8.onnx if any,
                                         and unfamiliar.npy: the unfamiliar score's reference set);
                                         model.json also carries the workspace's sort settings ("sorting")
                                         and the bundle's identity ("bundle")
    README.txt   bundle.json

The executable depends only on the code, not on the model, so it is built once per code version and
platform and cached in `<workspace>/cache/sorter/<key>/`; a new model only re-assembles the bundle.
A bundle written over an older one replaces it whole (new folder beside it, then swapped in).
Caveat: PyInstaller does not cross-compile: this machine builds a sorter for its own system, and the
bundle says which (`--platform windows` without `--sorter` on Linux is refused). For a Windows PC, take
the `sortloop-sort` folder that the Windows CI workflow builds from the same spec
(`.github/workflows/windows-bundle.yml`, artifact `sortloop-sort-windows`) and pass it with `--sorter`.
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
from loop.choices import check_choice
from loop.errors import ModelError, SortloopError
from loop.learning.registry import current_model_dir
from loop.model.artifact import (
    INT8_FILE,
    ONNX_FILE,
    SPEC_FILE,
    check_artifact,
    check_files,
    read_spec,
    spec_version,
)
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


PLATFORMS = ("windows", "linux", "macos")
PLATFORM_NAMES = {"windows": "Windows", "linux": "Linux", "macos": "macOS"}
WINDOWS_SORTER_HINT = (
    "a Windows sorter is built on Windows: take the `sortloop-sort-windows` artifact of the GitHub workflow "
    ".github/workflows/windows-bundle.yml (the repository's Actions tab -> windows-bundle -> the latest run -> "
    "Artifacts), unzip it, and pass its folder with --sorter")


class BundleError(SortloopError):
    """The bundle cannot be built or written (PyInstaller missing, OUT is something else, ...)."""


def this_platform() -> str:
    """"windows", "linux" or "macos": what PyInstaller builds for here."""
    return {"Windows": "windows", "Darwin": "macos"}.get(platform.system(), "linux")


def sorter_platform(folder: Path) -> str:
    """The platform a frozen sorter folder runs on: Windows if it holds `sortloop-sort.exe`, else this one's
    kind of system (a Linux or macOS build cannot be told apart by name; `bundle.json` keeps the builder's)."""
    return "windows" if (folder / f"{EXE_NAME}.exe").is_file() else (
        this_platform() if this_platform() != "windows" else "linux")


@dataclass
class BundleReport:
    """What `build_bundle` wrote."""

    out: Path
    model_version: str
    built_at: str
    size_bytes: int  # the zip file, or the folder
    sorter: Path  # the frozen sorter folder that was used
    sorter_built: bool  # False: taken from the cache or from --sorter
    replaced: str | None  # model version of the bundle this one replaced
    platform: str = "linux"  # what the sorter runs on: windows, linux, macos
    unpacked_bytes: int = 0  # the folder's size (the zip's contents when zipped)

    def summary(self) -> str:
        how = "built here" if self.sorter_built else "reused"
        size = (f"{self.size_bytes / 1e6:.0f} MB zipped, {self.unpacked_bytes / 1e6:.0f} MB unzipped"
                if self.out.suffix == ".zip" else f"{self.size_bytes / 1e6:.0f} MB")
        text = (f"wrote a {PLATFORM_NAMES[self.platform]} bundle: {self.out} ({size}); sorter {how} from "
                f"{self.sorter}, model {self.model_version}, bundle {self.built_at}")
        if self.replaced is not None:
            text += f"; replaced the bundle with model {self.replaced}"
        return text


def build_bundle(
    ws: Workspace, out: Path | str, *, as_zip: bool = False, sorter: Path | str | None = None,
    for_platform: str | None = None,
) -> BundleReport:
    """Write the standalone sorter with the deployed model to `out` (a folder, or a zip with `as_zip`).

    Args:
        ws: the workspace: its deployed model and its `[sort]` flag settings go into the bundle.
        out: the bundle folder (or zip file; `.zip` is added if missing). An older bundle there is replaced;
            anything else there is refused.
        as_zip: write one zip file instead of a folder.
        sorter: a frozen `sortloop-sort` folder built elsewhere from the same spec (e.g. the Windows CI
            artifact); default: build one here (cached per code version).
        for_platform: "windows", "linux" or "macos" (default: the sorter's, else this system's). A sorter
            for another system than this one must come as `sorter` (PyInstaller does not cross-compile).
    Raises:
        ModelError: nothing deployed. BundleError: PyInstaller missing or fails, OUT is not a bundle, a
        bundle for another system without its sorter (the message says where a Windows one comes from).

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
    if for_platform is not None:
        check_choice("--platform", for_platform, PLATFORMS)
    replaced = _existing_bundle(out)
    if sorter is not None:
        frozen, built = _check_sorter(Path(sorter).expanduser().absolute()), False
        target = sorter_platform(frozen)
        if for_platform is not None and for_platform != target:
            raise BundleError(f"{frozen} is a {PLATFORM_NAMES[target]} sorter, not a {PLATFORM_NAMES[for_platform]} "
                              "one" + (f"; {WINDOWS_SORTER_HINT}" if for_platform == "windows" else ""))
    else:
        target = for_platform or this_platform()
        if target != this_platform():
            raise BundleError(f"cannot build a {PLATFORM_NAMES[target]} sorter on {PLATFORM_NAMES[this_platform()]} "
                              "(PyInstaller builds for the system it runs on); "
                              + (WINDOWS_SORTER_HINT if target == "windows" else
                                 f"build the bundle on {PLATFORM_NAMES[target]}, or pass --sorter"))
        frozen, built = build_sorter(ws)

    built_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    stage = out.with_name(f".{out.stem}.sortloop-new")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        shutil.copytree(frozen, stage, symlinks=True)
        _write_model(ws, model_dir, spec, stage / MODEL_FOLDER, built_at)
        info = {"model_version": spec_version(spec, model_dir), "built_at": built_at,
                "sortloop": __version__, "system": f"{platform.system()} {platform.machine()}",
                "platform": target, "sorter": _executable(stage).name, "classes": list(spec["classes"]),
                "flags": describe(settings_point(spec, ws.settings.sort)),
                "other_folder": ws.settings.sort.other_folder}
        (stage / BUNDLE_JSON).write_text(json.dumps(info, indent=2), encoding="utf-8")
        (stage / README).write_text(readme_text(info), encoding="utf-8",
                                    newline="\r\n" if target == "windows" else "\n")
        unpacked = sum(p.lstat().st_size for p in stage.rglob("*") if p.is_file() and not p.is_symlink())
        if as_zip:
            _zip_folder(stage, out)
            with zipfile.ZipFile(out) as zf:  # what unzipping gives (a symlink is stored as the file it names)
                unpacked = sum(info.file_size for info in zf.infolist())
        else:
            _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = out.stat().st_size if as_zip else unpacked
    report = BundleReport(out, str(info["model_version"]), built_at, size, frozen, built, replaced, target, unpacked)
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
    """The one page for the person at the PC, in plain words, for the system the sorter runs on."""
    exe = info["sorter"]
    classes = ", ".join(info["classes"])
    windows = info.get("platform", "windows") == "windows"
    example = (f'{exe} "D:\\Photos\\new"' if windows else f'./{exe} ~/Photos/new')
    prompt = "a command prompt" if windows else "a terminal"
    first_run = ('  Windows may warn about an unknown program the first time: choose "More info", then\n'
                 '  "Run anyway".\n' if windows else
                 f'  If it will not start, make it runnable once: chmod +x "{exe}"\n')
    return f"""SORTLOOP PHOTO SORTER ({PLATFORM_NAMES.get(info.get("platform", "windows"), "")})
=====================
Model {info['model_version']}, built {info['built_at']}. Nothing to install: no Python needed.

WHAT IT DOES
  It COPIES every photo in a folder into one sub-folder per category:
    {classes}
  Your original photos are never moved, changed or deleted.

HOW TO USE IT
  1. Unzip this whole folder somewhere (keep "{exe}", "_internal" and "model" together).
  2. Drag a folder of photos onto "{exe}" (several folders at once is fine).
     Each one is copied, sorted, into a new folder beside it, named "<your folder> sorted".
     A window shows the progress, then a summary. Press Enter to close it.
  Or, in {prompt}:   {example}
  Running it again on the same folder only sorts the photos that are new.

PHOTOS IT IS UNSURE ABOUT
  They are still copied to the category it thinks most likely, and listed in "_review.csv"
  in the sorted folder, so someone can check them (it {info['flags']}).

PHOTOS THAT FIT NO CATEGORY
  Photos unlike every photo the model learned from (the workshop, a truck, a sketch) go to
  the "{info.get('other_folder', '_other')}" folder instead, and are listed in "_review.csv" as "unfamiliar".
  If one of them does belong to a category, move it there: that teaches the model too.

IF A PHOTO IS IN THE WRONG FOLDER
  Move it (drag it) into the right category folder. That is all: your move teaches the model
  once the sorted folder is back on the main computer (see below).
  Do not rename the category folders, and do not delete the hidden ".sortloop" folder:
  it records what was sorted.

BRINGING THE SORTED FOLDER BACK
  Copy the whole "<your folder> sorted" folder (with its hidden ".sortloop" folder) to the
  main computer, or share it on the network. There, run:   sortloop scan "<that folder>"
  It brings in what was sorted here and every photo you moved, so the next model learns it.

A NEWER SORTER
  When you receive a new bundle, delete this folder and use the new one. An old sorter
  refuses to sort into a folder that a newer one has sorted.

IF SOMETHING GOES WRONG
  The window says which photos were not sorted and why (damaged file, not a photo...).
{first_run}"""


# --- helpers -----------------------------------------------------------------------------------------


def _write_model(ws: Workspace, model_dir: Path, spec: dict, target: Path, built_at: str) -> None:
    """model.onnx as deployed; model.json = the spec + the sort settings + the bundle's identity."""
    target.mkdir(parents=True)
    shutil.copy2(model_dir / ONNX_FILE, target / ONNX_FILE)
    files = {k: v for k, v in spec.get("files", {}).items() if k != "weights"}  # no safetensors: ONNX only
    if (model_dir / INT8_FILE).is_file():  # sort.precision "auto" uses it when it passed its gate: so does the PC
        shutil.copy2(model_dir / INT8_FILE, target / INT8_FILE)
        files["int8"] = INT8_FILE
    reference = (spec.get("unfamiliar") or {}).get("file")
    if reference:  # the unfamiliar score's reference set (hash-checked when the sorter loads it)
        shutil.copy2(model_dir / reference, target / reference)
        files["unfamiliar"] = reference
    options = sort_options(ws)
    full = {**spec, "version": spec_version(spec, model_dir),
            "sorting": {"flag_strategy": options.flag_strategy, "flag_target": options.flag_target,
                        "flag_budget": options.flag_budget, "flag_threshold": options.flag_threshold,
                        "keep_tree": options.keep_tree, "batch_size": options.batch_size,
                        "workers": options.workers, "precision": options.precision,
                        "unfamiliar": options.unfamiliar, "other_folder": options.other_folder},
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
