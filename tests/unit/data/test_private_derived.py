"""Files derived from the user's photos (resized copies, features, report thumbnails) keep their privacy."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from loop.data.images import file_sha256
from loop.data.resized import ensure_resized, resized_path
from loop.workspace import open_workspace
from tests.conftest import make_image


def readable_by_nobody(path) -> bool:
    """Whether the unprivileged user `nobody` can read `path` (only checkable as root)."""
    out = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"cat '{path}' > /dev/null"], capture_output=True)
    return out.returncode == 0


def test_a_private_photos_resized_copy_is_not_readable_by_others(ws, tmp_path) -> None:
    photo = make_image(tmp_path / "p" / "a.jpg", (200, 10, 10), size=(400, 300))
    photo.chmod(0o600)
    image_id = file_sha256(photo)
    ensure_resized(ws, [image_id], [str(photo)], 64)
    resized = resized_path(ws, image_id, 64)
    assert resized.exists()
    assert stat.S_IMODE(ws.cache_dir.stat().st_mode) == 0o700  # was 0755: nobody could read it
    if os.geteuid() == 0:
        assert not readable_by_nobody(resized)


@pytest.mark.parametrize("folder", ["cache", "report"])
def test_a_readable_derived_folder_of_an_older_version_is_made_owner_only_on_open(ws, folder) -> None:
    path = ws.root / folder
    path.mkdir(exist_ok=True)
    path.chmod(0o755)
    open_workspace(ws.root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
