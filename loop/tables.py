"""Parquet tables that several processes may update: atomic replace under a file lock.

Why: the scheduler, a `sort` started by hand and a `review pull` can all touch the manifest at once. Each
update holds an exclusive lock for read-modify-write, writes a temp file in the same folder, fsyncs it and
`os.replace`s it over the old one, so a kill -9 at any moment leaves the last complete table.
Caveat: the lock is advisory (filelock); only sortloop code honours it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from loop.atomic import atomic_write
from loop.errors import ManifestError

LOCK_TIMEOUT_S = 120.0


def empty_frame(columns: dict[str, str]) -> pd.DataFrame:
    """A frame with the given columns and dtypes and no rows."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def conform(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Add missing columns, order and type them as `columns` says (extra columns are kept at the end)."""
    df = df.copy()
    for name, dtype in columns.items():
        if name not in df.columns:
            df[name] = pd.Series(index=df.index, dtype=dtype)
        elif str(df[name].dtype) != dtype:
            if dtype.startswith("datetime64") and "UTC" in dtype:
                # pandas 3 infers a unit (s/ms/us) per column; pin the declared one (ns), or setting a
                # finer timestamp later raises "Invalid value ... for dtype datetime64[ms, UTC]"
                df[name] = pd.to_datetime(df[name], utc=True).astype(dtype)
            else:
                df[name] = df[name].astype(dtype)
    extra = [c for c in df.columns if c not in columns]
    return df[list(columns) + extra]


def assign_by_key(df: pd.DataFrame, key: str, changes: dict[str, dict]) -> pd.DataFrame:
    """Set `{key value: {column: value}}` on the rows whose `key` column matches (None becomes NA);
    keys not in `df` are ignored. Modifies and returns `df`."""
    position = {k: i for i, k in enumerate(df[key])}
    for k, values in changes.items():
        i = position.get(k)
        if i is None:
            continue
        for col, value in values.items():
            df.at[df.index[i], col] = pd.NA if value is None else value
    return df


def read_table(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """The table at `path`, or an empty one with `columns` if it does not exist yet."""
    if not path.exists():
        return empty_frame(columns)
    try:
        return conform(pd.read_parquet(path), columns)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ManifestError(f"cannot read {path}: {exc}; restore it from a backup or delete it") from exc


def write_table_atomic(df: pd.DataFrame, path: Path) -> None:
    """Replace `path` with `df` in one step: temp file, fsync, rename."""
    with atomic_write(path) as fh:
        df.to_parquet(fh, index=False)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock that guards `path` (a sibling `.lock` file)."""
    lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            yield
    except Timeout:
        raise ManifestError(f"{path} is locked by another sortloop process for over {LOCK_TIMEOUT_S:.0f} s") from None


@contextmanager
def held_or_refused(lock_file: Path, refusal: Exception) -> Iterator[None]:
    """Hold `lock_file` for the duration, or raise `refusal` at once if another process holds it.

    For work that must not wait behind a second copy of itself (one sort per DEST, one `serve` per
    workspace): the user gets a clear message now instead of a hang.
    """
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise refusal from None
    try:
        yield
    finally:
        lock.release()


def update_table(
    path: Path, columns: dict[str, str], change: Callable[[pd.DataFrame], pd.DataFrame]
) -> pd.DataFrame:
    """Read, apply `change`, and write back, all under the lock; returns the new table."""
    with locked(path):
        new = conform(change(read_table(path, columns)), columns)
        write_table_atomic(new, path)
        return new
