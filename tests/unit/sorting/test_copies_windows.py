"""Windows file-system rules in every copy: reserved names, trailing dots/spaces, forbidden characters,
case-insensitive collisions, 260-character paths (checked on Linux, where all of these would succeed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from loop.data import filenames
from loop.data.filenames import portable_name, windows_name_problem
from loop.sorting import copies
from loop.sorting.copies import fit_name, portable_folder, safe_copy


def _source(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _copy(src: Path, image_id: str, folder: Path, name: str | None = None) -> tuple[Path, bool]:
    return safe_copy(src, folder, name or src.name, image_id=image_id, size=src.stat().st_size)


@pytest.mark.parametrize(("name", "expected"), [
    ("CON.jpg", "CON_.jpg"), ("nul", "nul_"), ("com1.tar.jpg", "com1_.tar.jpg"), ("LPT9.png", "LPT9_.png"),
    ("aux .jpg", "aux_ .jpg"), ("photo.jpg. .", "photo.jpg"), ("a:b*c?.jpg", "a_b_c_.jpg"),
    ('x<y>"z|w.jpg', "x_y__z_w.jpg"), ("tab\there.jpg", "tab_here.jpg"), ("...", "_"),
    ("console.jpg", "console.jpg"), ("COM10.jpg", "COM10.jpg"), ("chair.jpg", "chair.jpg"),
])
def test_portable_name(name: str, expected: str) -> None:
    assert portable_name(name) == expected
    assert windows_name_problem(portable_name(name)) is None
    assert (windows_name_problem(name) is None) == (name == expected)


@pytest.mark.parametrize("name", ["CON.jpg", "nul.png", "photo. ", "what?.jpg", "COM3"])
def test_copy_of_a_reserved_or_invalid_name_gets_a_portable_name(tmp_path: Path, name: str) -> None:
    src, image_id = _source(tmp_path, "x.jpg", b"bytes of " + name.encode())
    final, copied = _copy(src, image_id, tmp_path / "dest", name)
    assert copied and final.name == portable_name(name) and final.read_bytes() == src.read_bytes()
    assert windows_name_problem(final.name) is None


def test_names_differing_only_in_case_do_not_collide(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    a, ida = _source(tmp_path, "Chair.jpg", b"first")
    b, idb = _source(tmp_path, "other/chair.jpg", b"second")
    first, _ = _copy(a, ida, dest)
    second, copied = _copy(b, idb, dest)
    assert first.name == "Chair.jpg" and copied and second.name == "chair (2).jpg"
    # identical bytes under a case variant are "already there", not a second copy
    c, idc = _source(tmp_path, "again/CHAIR.JPG", b"first")
    again, copied = _copy(c, idc, dest)
    assert again == first and not copied
    assert sorted(p.name for p in dest.iterdir()) == ["Chair.jpg", "chair (2).jpg"]


def test_case_twin_sees_a_file_another_process_added(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    a, ida = _source(tmp_path, "a.jpg", b"a")
    _copy(a, ida, dest)
    (dest / "Table.jpg").write_bytes(b"someone else")  # not through safe_copy: the cached listing is stale
    t, idt = _source(tmp_path, "table.jpg", b"mine")
    final, copied = _copy(t, idt, dest)
    assert copied and final.name == "table (2).jpg"


def test_long_names_are_shortened_to_fit_260_characters(tmp_path: Path) -> None:
    folder = tmp_path / ("d" * max(1, 200 - len(str(tmp_path))))
    name = "x" * 120 + ".jpg"
    fitted = fit_name(folder, name)
    assert len(str(folder / fitted)) <= filenames.WINDOWS_MAX_PATH and fitted.endswith(".jpg")
    assert fit_name(folder, "y" * 120 + ".jpg") != fitted  # the hash tag keeps long names distinct
    assert fit_name(folder, "short.jpg") == "short.jpg"
    src, image_id = _source(tmp_path, "s.jpg", b"long")
    final, copied = _copy(src, image_id, folder, name)
    assert copied and final.name == fitted and len(str(final)) <= filenames.WINDOWS_MAX_PATH
    src2, id2 = _source(tmp_path, "t.jpg", b"long, other bytes")
    second, _ = _copy(src2, id2, folder, name)  # same long name, different bytes: unique AND short
    assert second != final and len(str(second)) <= filenames.WINDOWS_MAX_PATH


def test_a_name_over_255_bytes_is_shortened(tmp_path: Path) -> None:
    fitted = fit_name(tmp_path, "é" * 200 + ".jpg")
    assert len(fitted.encode()) <= filenames.MAX_NAME_BYTES and fitted.endswith(".jpg")


def test_a_folder_too_deep_for_any_name_is_a_clear_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="too deep"):
        fit_name(tmp_path / ("d" * 300), "a.jpg")


def test_kept_sub_folders_are_portable_and_merge_case_variants(tmp_path: Path) -> None:
    base = tmp_path / "dest" / "chair"
    (base / "Trip").mkdir(parents=True)
    assert portable_folder(base, ("trip", "CON", "a:b.")) == base / "Trip" / "CON_" / "a_b"
    deep = tuple(["x" * 50] * 6)
    assert portable_folder(base, deep) == base  # too deep for Windows: the copy goes to the category itself


@pytest.mark.parametrize("classes", [["chair", "CON"], ["chair", "desk."], ["chair", "a:b"], ["chair", "Chair"],
                                     ["chair", "nul.x"]])
def test_class_names_that_cannot_be_windows_folders_are_refused(classes: list[str]) -> None:
    from loop.errors import ModelError
    from loop.sorting.pipeline import check_classes

    check_classes(["chair", "table", "Sofa"])
    with pytest.raises(ModelError, match="Windows"):
        check_classes(classes)


def test_moves_follow_the_same_rules(tmp_path: Path) -> None:
    from loop.folders.moves import move_copy

    dest = tmp_path / "dest"
    (dest / "desk").mkdir(parents=True)
    (dest / "desk" / "Chair.jpg").write_bytes(b"another photo")
    copy = dest / "chair" / "chair.jpg"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"moved photo")
    final = move_copy(copy, dest / "desk", copy.name, image_id=hashlib.sha256(b"moved photo").hexdigest(),
                      size=len(b"moved photo"))
    assert final == dest / "desk" / "chair (2).jpg" and final.read_bytes() == b"moved photo"
    assert (dest / "desk" / "Chair.jpg").read_bytes() == b"another photo" and not copy.exists()


def test_orphan_temps_of_the_one_temp_scheme_are_removed_and_nothing_else(tmp_path: Path, monkeypatch) -> None:
    """A copier killed between writing its temp file and linking it leaves `.sortloop-<hex>.tmp`: the same
    name `safe_copy` writes (short, so a 255-byte final name still fits); nothing else is touched."""
    folder = tmp_path / "chair"
    made: list[Path] = []
    real_write = copies._write_temp

    def crash_after_write(*args, **kwargs):
        made.append(real_write(*args, **kwargs))
        raise KeyboardInterrupt  # killed mid-copy: the finally of safe_copy would normally clean up

    monkeypatch.setattr(copies, "_write_temp", crash_after_write)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # ...but the process died first
    src = tmp_path / "src.jpg"
    src.write_bytes(b"photo")
    with pytest.raises(KeyboardInterrupt):
        safe_copy(src, folder, "a" * 200 + ".jpg", image_id=hashlib.sha256(b"photo").hexdigest(), size=5)
    monkeypatch.undo()
    assert made and made[0].exists() and copies.TEMP_NAME.fullmatch(made[0].name)
    keep = [folder / "photo.jpg", folder / ".sortloop-notes.tmp", folder / ".photo.jpg.tmp"]
    for path in keep:
        path.write_bytes(b"user's")
    assert copies.remove_orphan_temps(folder) == 1
    assert not made[0].exists() and all(p.exists() for p in keep)
    assert copies.remove_orphan_temps(tmp_path / "missing") == 0
