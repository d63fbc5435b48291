"""The standalone sorter: `sortloop-sort SRC [DEST]`, frozen by PyInstaller for PCs with no Python.

It runs the same pipeline as `sortloop sort` (`loop.sorting.pipeline`: same decode, same ONNX model, same flags,
same safe copies), with the model and the flag settings its bundle carries (`model/` beside the
executable), and keeps its record inside DEST (`loop.sorting.dest_record`) instead of a workspace. A folder dropped
onto the executable is sorted into a sibling folder `<folder> sorted`, and the window waits for Enter at
the end so the person can read the summary. Progress is one console line.
Caveat: this module is the PyInstaller entry script too, so it must import nothing heavy (no pandas,
torch, typer, rich): the spec excludes them, and a frozen sorter that reached one would fail.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from loop.errors import SortloopError
from loop.model.artifact import SPEC_FILE, read_spec
from loop.sorting import dest_record
from loop.sorting.pipeline import SortOptions, SortReport, check_folders, check_writable, sort_into

MODEL_FOLDER = "model"
SORTED_SUFFIX = " sorted"


def bundle_dir() -> Path:
    """The folder of the bundle: beside the frozen executable (or this checkout's root when not frozen)."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent
    return Path(__file__).resolve().parents[2]


def default_dest(src: Path) -> Path:
    """`<src> sorted` beside `src` (a dropped folder has no second argument)."""
    src = src.expanduser().absolute()
    return src.with_name(src.name + SORTED_SUFFIX)


def options_from(spec: dict, *, keep_tree: bool | None = None, workers: int | None = None) -> SortOptions:
    """The sort settings a bundle carries in its `model.json` ("sorting"), else the defaults."""
    known = SortOptions.__dataclass_fields__
    options = SortOptions(**{k: v for k, v in spec.get("sorting", {}).items() if k in known})
    if keep_tree is not None:
        options.keep_tree = keep_tree
    if workers is not None:
        options.workers = workers
    return options


def sort_standalone(src: Path, dest: Path, model_dir: Path, *, keep_tree: bool | None = None,
                    workers: int | None = None, on_progress=None) -> SortReport:
    """Sort `src` into `dest` with the bundle's model, recording the copies in `dest/.sortloop/`.

    Raises:
        SortloopError: bad folders, a missing model, or `dest` already sorted by a newer bundle.
    """
    if not (model_dir / SPEC_FILE).exists():
        raise SortloopError(f"no model in {model_dir}; keep the 'model' folder beside the sorter (unzip the "
                            "whole bundle), or pass --model")
    src, dest = check_folders(src, dest)
    spec = read_spec(model_dir)
    options = options_from(spec, keep_tree=keep_tree, workers=workers)
    version, built_at = str(spec.get("version", "")), spec.get("bundle", {}).get("built_at")
    check_writable(dest)
    with dest_record.sorter_lock(dest):  # one sorter per DEST (two would record every copy twice)
        dest_record.check_bundle(dest, built_at, version)
        started = time.perf_counter()
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        report = SortReport(src=str(src), dest=str(dest), run_id=run_id)
        try:
            sort_into(src, dest, model_dir, dest_record.DestRecordSink(dest), report, options=options,
                      on_progress=on_progress)
        finally:
            report.seconds = time.perf_counter() - started
        dest_record.note_bundle(dest, built_at, report.model_version)
    return report


class _ConsoleProgress:
    """`sorting: 120/500 photos (24%)` on one line of stderr, at most a few times a second."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < 0.25 and done != total:
            return
        self.last = now
        share = f" ({100 * done // total}%)" if total else ""
        sys.stderr.write(f"\rsorting: {done}/{total if total is not None else '?'} photos{share}  ")
        sys.stderr.flush()


HELP = """sortloop-sort copies your photos into one folder per category; the originals are never changed.
To use it, drag a folder of photos (or several) onto this program: each one is sorted into a new folder
beside it, named "<your folder> sorted". Or type: sortloop-sort FOLDER [SORTED-FOLDER]. README.txt, next
to the program, says more (including how to bring the sorted folder back to the main computer)."""


def plan(paths: list[Path], dest: Path | None) -> list[tuple[Path, Path]]:
    """(source, destination) pairs for the folders given: what a typed command or a drop means.

    `SRC DEST` (typed) sorts SRC into DEST when DEST does not exist yet or was sorted before (it holds
    `.sortloop`); otherwise every path is a dropped folder, each sorted into its own `<folder> sorted`.
    `--dest` always means one destination for the one source.
    """
    if dest is not None:
        if len(paths) != 1:
            raise SortloopError("--dest takes one folder to sort; drop or give the others one at a time")
        return [(paths[0], dest)]
    if len(paths) == 2 and (not paths[1].exists() or (paths[1] / dest_record.RECORD_DIR).is_dir()):
        return [(paths[0], paths[1])]
    return [(src, default_dest(src)) for src in paths]


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 sorted, 1 some files failed, 2 could not sort)."""
    multiprocessing.freeze_support()  # decode workers re-launch the frozen executable
    parser = argparse.ArgumentParser(
        prog="sortloop-sort",
        description="Copy every photo under SRC into DEST/<category>/ (originals are never changed). "
                    "Photos the model is unsure about are listed in DEST/_review.csv.",
        epilog='Example: sortloop-sort "D:\\Photos\\new" "D:\\Photos\\sorted"   (or drop folders onto the program)',
    )
    parser.add_argument("paths", type=Path, nargs="*", metavar="SRC [DEST]",
                        help="folder of photos to sort, and where to (default: '<SRC> sorted' beside SRC); "
                             "several folders: each to its own '<folder> sorted'")
    parser.add_argument("--dest", type=Path, help="sort the one SRC into this folder")
    parser.add_argument("--model", type=Path, help="model folder (default: 'model' beside the program)")
    parser.add_argument("--flat", action="store_true", help="do not keep SRC's sub-folders under each category")
    parser.add_argument("--workers", type=int, help="decoder processes (default: the bundle's setting)")
    parser.add_argument("--no-pause", action="store_true", help="do not wait for Enter at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # a double-click or a drop (no DEST typed): keep the window open at the end so the summary can be read
    dropped = args.dest is None and all(dest == default_dest(src) for src, dest in plan(args.paths, None))
    if not args.paths:  # a double-click: no folder at all
        print(HELP)
        code = 2
    else:
        code = 0
        try:
            jobs = plan(args.paths, args.dest)
        except SortloopError as exc:
            print(f"error: {exc}", file=sys.stderr)
            jobs, code = [], 2
        for src, dest in jobs:
            code = max(code, _sort_one(src, dest, args))
            if code == 130:
                break
    if dropped and not args.no_pause and sys.stdin is not None and sys.stdin.isatty():
        input("Press Enter to close this window.")
    return code


def _sort_one(src: Path, dest: Path, args: argparse.Namespace) -> int:
    """Sort one folder and print its summary; the exit code for it."""
    model_dir = args.model or bundle_dir() / MODEL_FOLDER
    try:
        report = sort_standalone(src, dest, model_dir, keep_tree=False if args.flat else None,
                                 workers=args.workers, on_progress=_ConsoleProgress())
        sys.stderr.write("\n")
        print(report.summary())
        for path, reason in report.failed:
            print(f"not sorted: {path}: {reason}")
        print(f"sorted photos are in: {report.dest}")
        return 0 if report.ok else 1
    except SortloopError as exc:
        sys.stderr.write("\n")
        print(f"error: {src}: {exc}", file=sys.stderr)
        if getattr(exc, "summary", ""):  # a full disk: what was done before it stopped
            print(exc.summary)
        return 2
    except KeyboardInterrupt:
        print("\nstopped; run it again to finish (photos already sorted are skipped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
