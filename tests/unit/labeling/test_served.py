"""The served folder: what may be published for Label Studio, and where that folder may be."""

from __future__ import annotations

import os
import stat

import pytest

from labeling import served
from loop.data.images import file_sha256
from loop.errors import ConfigError
from loop.workspace import open_workspace
from tests.conftest import make_image


def with_served_dir(ws, value: str):
    text = ws.config_file.read_text().replace('served_dir = ""', f'served_dir = "{value}"')
    ws.config_file.write_text(text)
    return open_workspace(ws.root)


def test_publish_copies_exactly_the_photo_owner_only_and_is_idempotent(ws, tmp_path) -> None:
    photo = make_image(tmp_path / "photos" / "a.JPG", (200, 10, 10))
    image_id = file_sha256(photo)
    names, refused = served.publish(ws, {image_id: str(photo)})
    assert names == {image_id: f"{image_id}.jpg"} and not refused
    entry = served.storage_dir(ws) / names[image_id]
    assert not os.path.samefile(entry, photo) and entry.read_bytes() == photo.read_bytes()  # a copy
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    for folder in (ws.labelstudio_dir, served.served_dir(ws), served.storage_dir(ws)):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert served.publish(ws, {image_id: str(photo)}) == (names, {})
    assert sorted(p.name for p in served.storage_dir(ws).iterdir()) == [names[image_id]]  # no staging left


def test_refused_sources_symlink_out_fifo_missing_changed(ws, tmp_path) -> None:
    folder = tmp_path / "photos"
    inside = make_image(folder / "a.jpg", (200, 10, 10))
    outside = make_image(tmp_path / "private" / "secret.jpg", (10, 200, 10))
    (folder / "link-in.jpg").symlink_to("a.jpg")
    (folder / "link-out.jpg").symlink_to(outside)
    os.mkfifo(folder / "fifo.jpg")
    assert served.source_problem(folder / "link-in.jpg") is None  # stays in its folder
    photos = {
        file_sha256(outside): str(folder / "link-out.jpg"),
        "f" * 64: str(folder / "fifo.jpg"),
        "e" * 64: str(folder / "gone.jpg"),
        "d" * 64: str(inside),  # bytes that do not hash to the id pushed
    }
    names, refused = served.publish(ws, photos)
    assert not names
    assert "outside its folder" in refused[file_sha256(outside)]
    assert "not a regular file" in refused["f" * 64]
    assert "missing" in refused["e" * 64]
    assert "changed since it was added" in refused["d" * 64]
    assert list(served.storage_dir(ws).iterdir()) == []


@pytest.mark.parametrize("where", ["root", "parent", "inside", "relative", "symlink"])
def test_a_served_folder_that_could_expose_the_workspace_is_refused(ws, tmp_path, where) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    value = {"root": str(ws.root), "parent": str(ws.root.parent), "inside": str(ws.root / "manifest"),
             "relative": "served", "symlink": str(tmp_path / "link")}[where]
    with pytest.raises(ConfigError, match="served_dir"):
        served.served_dir(with_served_dir(ws, value))


def test_a_team_served_folder_is_readable_by_the_server(ws, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SORTLOOP_LABELSTUDIO__URL", "http://ls.example:8080")
    ws = with_served_dir(ws, str(tmp_path / "served"))
    assert served.served_dir(ws) == tmp_path / "served"
    assert served.prepare(ws) == tmp_path / "served" / "photos"
    assert stat.S_IMODE((tmp_path / "served" / "photos").stat().st_mode) == 0o755


def test_an_existing_folder_with_other_files_is_never_served_nor_its_modes_changed(ws, tmp_path) -> None:
    """served_dir on someone's folder: refused (its photos/ tree would be served, its modes set to 0700)."""
    folder = tmp_path / "shared-folder"
    make_image(folder / "photos" / "family.jpg", (10, 10, 200))
    (folder / "photos" / "notes.txt").write_text("private")
    folder.chmod(0o755)
    ws = with_served_dir(ws, str(folder))
    photo = make_image(tmp_path / "p" / "a.jpg", (200, 10, 10))
    with pytest.raises(ConfigError, match="existing folder with other files"):
        served.publish(ws, {file_sha256(photo): str(photo)})
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    # an empty folder becomes sortloop's own (marker), and stays usable
    empty = tmp_path / "empty"
    empty.mkdir()
    ws.config_file.write_text(ws.config_file.read_text().replace(str(folder), str(empty)))
    ws = open_workspace(ws.root)
    names, _ = served.publish(ws, {file_sha256(photo): str(photo)})
    assert (empty / served.MARKER).exists() and served.publish(ws, {file_sha256(photo): str(photo)})[0] == names


def test_a_photo_rewritten_in_place_after_push_is_not_served_with_its_new_bytes(ws, tmp_path) -> None:
    photo = make_image(tmp_path / "p" / "a.jpg", (200, 10, 10))
    original = photo.read_bytes()
    image_id = file_sha256(photo)
    names, _ = served.publish(ws, {image_id: str(photo)})
    with open(photo, "r+b") as fh:  # rewritten in place (same inode): a hard link would follow
        fh.write(b"not a photo any more")
    entry = served.storage_dir(ws) / names[image_id]
    assert entry.read_bytes() == original
    names2, refused = served.publish(ws, {image_id: str(photo)})  # the entry is still the pushed bytes
    assert names2 == names and entry.read_bytes() == original


def test_an_entry_that_is_a_hard_link_or_changed_is_made_again_as_a_copy(ws, tmp_path) -> None:
    photo = make_image(tmp_path / "p" / "a.jpg", (200, 10, 10))
    image_id = file_sha256(photo)
    storage = served.prepare(ws)
    entry = storage / served.served_name(image_id, str(photo))
    os.link(photo, entry)  # as an earlier version published it
    served.publish(ws, {image_id: str(photo)})
    assert entry.stat().st_nlink == 1 and entry.read_bytes() == photo.read_bytes()
