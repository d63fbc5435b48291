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
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from loop.data import manifest
from loop.data.classnames import check_class_name, normal_name, twin_problem
from loop.data.images import check_regular_file, file_sha256, iter_image_files, open_image, perceptual_hash, read_hashed
from loop.data.items import assign_items, exif_taken_at
from loop.data.label_sources import FOLDER
from loop.data.splits import assign_splits
from loop.errors import ClassNameError, ConfigError, DiskFullError, ImageError, IngestRefused, SortloopError
from loop.progress import ProgressCallback, no_progress
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
    duplicates: int = 0  # byte-identical copies of a photo seen earlier in this same ingest
    labeled: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)  # labeled photos added, per class

    def summary(self) -> str:
        text = f"{self.seen} files: {self.added} added ({self.labeled} labeled), "
        if self.duplicates:
            text += f"{self.duplicates} duplicate copies of photos in this folder, "
        text += f"{self.already_present} already in the manifest, {len(self.unreadable)} unreadable"
        if self.class_counts:
            counts = ", ".join(f"{name} {n}" for name, n in sorted(self.class_counts.items()))
            n = len(self.class_counts)
            text += f"\n{n} {'category' if n == 1 else 'categories'} (photos added): {counts}"
        return text


def describe_image(path: Path, image_id: str | None = None, data: bytes | None = None) -> ImageInfo:
    """Hash (unless given), perceptual hash and EXIF time of one file (decoded from `data`, its bytes, when the
    caller read them: `read_hashed`); raises ImageError if it cannot be decoded."""
    image_id = image_id or file_sha256(path)
    img = open_image(path, draft_size=HASH_DECODE_SIZE, data=data)
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
    classes: list[str] | None = None,
    check_folders: bool = False,
    on_progress: ProgressCallback = no_progress,
    threads: int = 4,
) -> IngestReport:
    """Add every image under `folder` to the manifest.

    Args:
        source: "user" for real photos (validation metrics are reported on these) or "web".
        labeled: take the label from the first class folder under `folder`.
        items_csv: optional CSV `path,item_id` giving explicit item groups (wins over inference).
        classes: with `labeled`, the categories: a photo takes the first folder on its path named like one
            (others are added unlabeled); without it every first-level folder is a category.
        check_folders: with `labeled`, refuse folders that do not look like categories (what the CLI does
            unless `--yes`): project- or date-like names, or most holding fewer than 3 photos.
    Raises:
        IngestRefused: (labeled, check_folders) the folders look like projects or dates, or most hold fewer than
            3 photos; nothing was read.
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
    wanted = list(classes) if classes else None
    if labeled:
        _check_class_folders(root, files, wanted, set(current["label"].dropna().astype(str)),
                             check_folders=check_folders)
    report = IngestReport(seen=len(files), unreadable=unlisted)
    infos: list[ImageInfo] = []
    added_now: set[str] = set()

    def one(path: Path) -> ImageInfo | tuple[str, str]:
        try:
            st = check_regular_file(path)  # a FIFO named x.jpg would block the read forever
            image_id, data = read_hashed(path, st.st_size)  # read once: hashed, and decoded if new
            if image_id in known:
                return ImageInfo(image_id=image_id, path=str(path))
            return describe_image(path, image_id, data)
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
                if result.image_id in added_now:
                    report.duplicates += 1
                else:
                    report.already_present += 1
                continue
            known.add(result.image_id)  # a byte-identical copy later in the same tree is the same image
            added_now.add(result.image_id)
            if labeled:
                label = folder_label(Path(path).relative_to(root), wanted)  # as walked, not resolved
                result.label = None if label is None else normal_name(label)  # macOS folder names are NFD
            result.item_id = explicit.get(os.path.normpath(path))
            infos.append(result)
    try:
        report.added = register_images(ws, infos, source=source, label_source=FOLDER)
    except DiskFullError as exc:  # nothing was added (the manifest write is atomic): say what was found
        exc.summary = report.summary()
        raise
    report.labeled = sum(1 for i in infos if i.label)
    report.class_counts = dict(Counter(i.label for i in infos if i.label))
    return report


def folder_label(rel: Path, classes: list[str] | None) -> str | None:
    """The label a photo's place gives it: its first folder, or with `classes` the first folder on its path
    that is one of them (so `2024-03 Smith order/table/IMG_1.jpg` is a table); None if none."""
    folders = rel.parts[:-1]
    if classes is None:
        return folders[0] if folders else None
    return next((part for part in folders if part in classes), None)


# A folder name that looks like a project or a date, not a category: a year or a date in it, or a long phrase.
_PROJECT_LIKE = re.compile(r"(?:^|\D)(?:19|20)\d{2}(?:\D|$)|\d{1,2}[-._/]\d{1,2}[-._/]\d{2,4}|(?:\S+\s+){3,}\S")
MIN_PHOTOS_PER_CLASS = 3  # fewer for most classes: not a sorted set to learn from yet


def _check_class_folders(root: Path, files: list[Path], classes: list[str] | None, known: set[str], *,
                         check_folders: bool) -> None:
    """Before reading any photo: refuse a folder name that cannot be a class, or that is a case-only or
    look-alike twin of another folder or of a class the manifest has (`known`;
    `loop.data.classnames.twin_problem`), and (with `check_folders`) folders that look like projects or
    dates, or too few photos per class, naming `--classes` and `--yes`."""
    counts = Counter(folder_label(f.relative_to(root), classes) for f in files)
    counts.pop(None, None)
    accepted = set(known)
    for name in sorted(counts):
        try:
            label = check_class_name(normal_name(name))
            problem = twin_problem(label, accepted)
            if problem is not None:
                raise ClassNameError(f"{label!r} cannot be a class name: {problem}")
        except ClassNameError as exc:
            raise ClassNameError(f"class folder {root / name}: {exc}; rename the folder and ingest again") from None
        accepted.add(label)
    if not check_folders or classes is not None or not counts:
        return
    fix = ("name your categories: `--classes table,chair,...` (a photo then takes the first folder on its path "
           "that is one of them), or ingest it anyway with `--yes`")
    looks_like_projects = sorted(n for n in counts if _PROJECT_LIKE.search(n))
    if len(looks_like_projects) * 2 > len(counts):
        shown = ", ".join(repr(n) for n in looks_like_projects[:3]) + (", ..." if len(looks_like_projects) > 3 else "")
        raise IngestRefused(f"{len(looks_like_projects)} of the {len(counts)} folders under {root} look like "
                            f"projects or dates, not categories ({shown}); {fix}")
    few = sorted(n for n, c in counts.items() if c < MIN_PHOTOS_PER_CLASS)
    if len(few) * 2 > len(counts):
        raise IngestRefused(f"{len(few)} of the {len(counts)} folders under {root} hold fewer than "
                            f"{MIN_PHOTOS_PER_CLASS} photos ({', '.join(few[:3])}{', ...' if len(few) > 3 else ''}): "
                            "too few to learn a "
                            f"category from; {fix}")


def register_images(
    ws: Workspace, infos: list[ImageInfo], *, source: str = "user", label_source: str = FOLDER,
    also: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
) -> int:
    """Add images not yet in the manifest (by image_id): items inferred, labels kept in the history, splits
    assigned. Returns how many rows were added. Safe to call concurrently (manifest lock).

    `also`: a further change (no labels: those go through `manifest.set_labels`) committed in the same
    write, e.g. a sort's predictions, so each flush of a sort reads and writes the manifest once.

    Raises:
        ClassNameError: a label cannot be a class (nothing is written then).
    """
    if not infos and also is None:
        return 0
    for label in {i.label for i in infos if i.label is not None}:
        check_class_name(label)
    settings = ws.settings
    path = manifest.manifest_path(ws)
    with locked(path):
        df = read_table(path, manifest.COLUMNS)
        ids = [i.image_id for i in infos]
        present = set(df.loc[df["image_id"].isin(ids), "image_id"])  # not a set of the whole manifest per flush
        fresh, seen = [], set()
        for info in infos:
            if info.image_id in present or info.image_id in seen:
                continue
            seen.add(info.image_id)
            fresh.append(info)
        if not fresh:
            if also is not None:
                manifest.commit_with_history(ws, also(df), [])
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
        manifest.commit_with_history(ws, combined if also is None else also(combined), history)
        return len(fresh)
