"""Ingest: add folders of images to the manifest, with labels from class folders, items and splits.

Idempotent by construction: the manifest key is the sha256 of the bytes, so re-ingesting a tree (or a
renamed copy of it) adds nothing. Unreadable files (including FIFOs and devices named like images, which
are never opened) are reported with a reason and skipped; a GIF is its first frame.
Caveat: with `--labeled` the label is the FIRST folder under the ingested root (`root/<label>/.../x.jpg`);
files directly in the root are added unlabeled.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from loop.data import manifest
from loop.data.classnames import check_class_name, normal_name, twin_problem
from loop.errors import ClassNameError, ConfigError, DiskFullError, ImageError, SortloopError
from loop.data.images import check_regular_file, file_sha256, iter_image_files, open_image, perceptual_hash
from loop.data.items import assign_items, exif_taken_at
from loop.progress import ProgressCallback, no_progress
from loop.data.splits import assign_splits
from loop.tables import conform, locked, read_table
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

SOURCES = ("user", "web")
HASH_DECODE_SIZE = 128  # pHash works on 32x32, so a small JPEG draft is plenty and fast


@dataclass
class ImageInfo:
    """What the manifest needs to know about a newly seen image."""

    image_id: str
    path: str
    phash: str | None = None
    taken_at: pd.Timestamp | None = None
    label: str | None = None
    item_id: str | None = None


@dataclass
class IngestReport:
    """Outcome of one ingest: counts, and every file that could not be read with the reason."""

    seen: int = 0
    added: int = 0
    already_present: int = 0
    labeled: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.seen} files: {self.added} added ({self.labeled} labeled), "
            f"{self.already_present} already in the manifest, {len(self.unreadable)} unreadable"
        )


def describe_image(path: Path, image_id: str | None = None) -> ImageInfo:
    """Hash (unless given), perceptual hash and EXIF time of one file; raises ImageError if it cannot be decoded."""
    image_id = image_id or file_sha256(path)
    img = open_image(path, draft_size=HASH_DECODE_SIZE)
    taken = exif_taken_at(img)
    return ImageInfo(image_id=image_id, path=str(Path(path).absolute()), phash=perceptual_hash(img), taken_at=taken)


def read_items_csv(csv_path: Path, root: Path) -> dict[str, str]:
    """Map absolute path -> item_id from a CSV with columns `path,item_id` (paths may be relative to root)."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "item_id"} <= set(reader.fieldnames):
                raise ConfigError(f"{csv_path}: needs columns 'path' and 'item_id' (found {reader.fieldnames})")
            mapping = {}
            for row in reader:
                p = Path(row["path"])
                p = p if p.is_absolute() else root / p
                mapping[os.path.normpath(p)] = row["item_id"]
            return mapping
    except OSError as exc:
        raise ConfigError(f"cannot read items CSV {csv_path}: {exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:  # a binary file, an image, a spreadsheet saved as .xlsx
        raise ConfigError(f"{csv_path} is not a UTF-8 text CSV with columns path,item_id ({exc}); save it as "
                          "CSV UTF-8 and try again") from None


def ingest_folder(
    ws: Workspace,
    folder: Path | str,
    *,
    source: str = "user",
    labeled: bool = False,
    items_csv: Path | str | None = None,
    on_progress: ProgressCallback = no_progress,
    threads: int = 4,
) -> IngestReport:
    """Add every image under `folder` to the manifest.

    Args:
        source: "user" for real photos (validation metrics are reported on these) or "web".
        labeled: take the label from the first class folder under `folder`.
        items_csv: optional CSV `path,item_id` giving explicit item groups (wins over inference).
    Raises:
        ConfigError: a bad source or items CSV. DiskFullError: the workspace's disk is full (nothing was
        added; `.summary` says what was found).
    Example:
        >>> report = ingest_folder(ws, "photos/labeled", source="user", labeled=True)   # doctest: +SKIP
        >>> print(report.summary())
    """
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {', '.join(SOURCES)} (got {source!r})")
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise SortloopError(f"{root} is not a folder")
    explicit = read_items_csv(Path(items_csv), root) if items_csv else {}
    current = manifest.load(ws)
    known = set(current["image_id"].dropna())
    unlisted: list[tuple[str, str]] = []
    files = list(iter_image_files(root, on_error=lambda f, why: unlisted.append((str(f), why))))
    if labeled:
        _check_class_folders(root, files, set(current["label"].dropna().astype(str)))
    report = IngestReport(seen=len(files), unreadable=unlisted)
    infos: list[ImageInfo] = []

    def one(path: Path) -> ImageInfo | tuple[str, str]:
        try:
            check_regular_file(path)  # a FIFO named x.jpg would block the read forever
            image_id = file_sha256(path)
            if image_id in known:
                return ImageInfo(image_id=image_id, path=str(path))
            return describe_image(path, image_id)
        except ImageError as exc:
            return (str(path), exc.reason)
        except OSError as exc:
            return (str(path), f"unreadable ({exc.strerror or exc})")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for done, (path, result) in enumerate(zip(files, pool.map(one, files), strict=True), start=1):
            on_progress(done, len(files))
            if isinstance(result, tuple):
                report.unreadable.append(result)
                logger.warning("skipped %s: %s", *result)
                continue
            if result.image_id in known:
                report.already_present += 1
                continue
            known.add(result.image_id)  # a byte-identical copy later in the same tree is the same image
            rel = Path(path).relative_to(root)  # as walked: a symlinked file may point elsewhere
            if labeled and len(rel.parts) > 1:
                result.label = normal_name(rel.parts[0])
            result.item_id = explicit.get(os.path.normpath(path))
            infos.append(result)
    try:
        report.added = register_images(ws, infos, source=source, label_source="folder")
    except DiskFullError as exc:  # nothing was added (the manifest write is atomic): say what was found
        exc.summary = report.summary()
        raise
    report.labeled = sum(1 for i in infos if i.label)
    return report


def _check_class_folders(root: Path, files: list[Path], classes: set[str]) -> None:
    """Refuse, before reading any photo, a class folder whose name cannot be a class, or that is a case-only
    or look-alike twin of another folder or of a class the manifest has (`loop.data.classnames.twin_problem`)."""
    folders = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    accepted = set(classes)
    for name in folders:
        try:
            label = check_class_name(normal_name(name))
            problem = twin_problem(label, accepted)
            if problem is not None:
                raise ClassNameError(f"{label!r} cannot be a class name: {problem}")
        except ClassNameError as exc:
            raise ClassNameError(f"class folder {root / name}: {exc}; rename the folder and ingest again") from None
        accepted.add(label)


def register_images(
    ws: Workspace, infos: list[ImageInfo], *, source: str = "user", label_source: str = "folder"
) -> int:
    """Add images not yet in the manifest (by image_id): items inferred, labels kept in the history, splits
    assigned. Returns how many rows were added. Safe to call concurrently (manifest lock).

    Raises:
        ClassNameError: a label cannot be a class (nothing is written then).
    """
    if not infos:
        return 0
    for label in {i.label for i in infos if i.label is not None}:
        check_class_name(label)
    settings = ws.settings
    path = manifest.manifest_path(ws)
    with locked(path):
        df = read_table(path, manifest.COLUMNS)
        present = set(df["image_id"].dropna())
        fresh, seen = [], set()
        for info in infos:
            if info.image_id in present or info.image_id in seen:
                continue
            seen.add(info.image_id)
            fresh.append(info)
        if not fresh:
            return 0
        stamp = manifest.now_utc()
        new = conform(
            pd.DataFrame(
                {
                    "image_id": [i.image_id for i in fresh],
                    "path": [i.path for i in fresh],
                    "source": source,
                    "item_id": [i.item_id for i in fresh],
                    "item_rule": ["csv" if i.item_id else None for i in fresh],
                    "label": [i.label for i in fresh],
                    "label_source": [label_source if i.label else None for i in fresh],
                    "label_by": ["ingest" if i.label else None for i in fresh],
                    "label_at": [stamp if i.label else pd.NaT for i in fresh],
                    "phash": [i.phash for i in fresh],
                    "taken_at": [i.taken_at if i.taken_at is not None else pd.NaT for i in fresh],
                    "added_at": stamp,
                }
            ),
            manifest.COLUMNS,
        )
        new = assign_items(
            new,
            df,
            near_duplicate_distance=settings.items.near_duplicate_distance,
            burst_seconds=settings.items.burst_seconds,
        )
        combined = assign_splits(pd.concat([df, new], ignore_index=True) if len(df) else new, settings.split)
        history = [
            {
                "image_id": i.image_id, "old_label": None, "new_label": i.label, "old_source": None,
                "source": label_source, "by": "ingest", "at": stamp.isoformat(), "note": i.path,
            }
            for i in fresh
            if i.label
        ]
        manifest.commit_with_history(ws, combined, history)
        return len(fresh)
