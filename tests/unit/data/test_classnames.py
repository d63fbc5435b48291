"""Class names are checked where they enter (ingest, review labels, scan, training), by one function."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from loop.data import manifest
from loop.data.classnames import check_class_name
from loop.data.images import file_sha256
from loop.data.ingest import ImageInfo, ingest_folder, register_images
from loop.errors import ClassNameError, ModelError
from sortloop.cli import app
from tests.conftest import make_image

BAD = ["", ".", "..", "../../etc", "a/b", "a\\b", "_misc", ".hidden", "tab\tle", "line\nbreak", " chair",
       "chair ", "x" * 256, "x" * 65, "CONIN$", "conout$", "CONIN$.txt", "chair.", "COM1", "cafe\u0301"]


@pytest.mark.parametrize("name", ["chair", "Table lamp", "café", "2024", "a.b", "x" * 64])
def test_plain_names_pass_unchanged(name: str) -> None:
    assert check_class_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_unusable_names_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ClassNameError, match="cannot be a class name: (it |Windows)"):
        check_class_name(name)


def test_ingest_refuses_a_bad_class_folder_before_reading_anything(ws, tmp_path) -> None:
    root = tmp_path / "photos"
    make_image(root / "chair" / "a.jpg", (200, 10, 10))
    make_image(root / "_misc" / "b.jpg", (10, 200, 10))
    with pytest.raises(ClassNameError, match="_misc.*rename the folder"):
        ingest_folder(ws, root, labeled=True)
    assert manifest.load(ws).empty and manifest.history(ws).empty
    # unlabeled, the folder name is no class: fine
    assert ingest_folder(ws, root, labeled=False).added == 2

    result = CliRunner().invoke(app, ["ingest", str(root), "--labeled", "-w", str(ws.root)])
    assert result.exit_code != 0 and "_misc" in result.output and "Traceback" not in result.output


def test_register_and_set_labels_refuse_a_path_as_label(ws, tmp_path) -> None:
    photo = make_image(tmp_path / "p" / "a.jpg", (200, 10, 10))
    image_id = file_sha256(photo)
    with pytest.raises(ClassNameError):
        register_images(ws, [ImageInfo(image_id, str(photo), label="../../etc")])
    assert manifest.load(ws).empty
    register_images(ws, [ImageInfo(image_id, str(photo), label="chair")])
    with pytest.raises(ClassNameError, match="etc"):
        manifest.set_labels(ws, [manifest.LabelChange(image_id, "../../etc", "review", "r@x")])
    assert manifest.load(ws).set_index("image_id").at[image_id, "label"] == "chair"
    assert list(manifest.history(ws)["new_label"]) == ["chair"]


def _four_labeled_photos(ws, tmp_path) -> None:
    """Two chairs and two tables registered with their labels: the manifest an old version then rewrote."""
    infos = []
    for i, label in enumerate(["chair", "chair", "table", "table"]):
        photo = make_image(tmp_path / "p" / f"{i}.jpg", (60 * i, 10, 10))
        infos.append(ImageInfo(file_sha256(photo), str(photo), label=label))
    register_images(ws, infos)


def test_training_refuses_a_bad_label_already_in_an_old_manifest(ws, tmp_path) -> None:
    from loop.learning.train import train

    _four_labeled_photos(ws, tmp_path)
    # a manifest written before names were checked: bypass set_labels as an old version did
    manifest.update(ws, lambda df: df.assign(label=df["label"].where(df["label"] != "table", "../../etc"),
                                             split=pd.array(["train"] * len(df), dtype="string")))
    with pytest.raises(ModelError, match=r"'\.\./\.\./etc' cannot be a class"):
        train(ws)


def test_scan_does_not_take_an_unusable_folder_for_a_category(tmp_path) -> None:
    from loop.folders.corrections import category_of

    dest = tmp_path / "sorted"
    assert category_of(dest / "chair" / "a.jpg", dest) == "chair"
    for name in ("_misc", ".trash", " chair", "a\nb"):
        assert category_of(dest / name / "a.jpg", dest) is None


@pytest.mark.parametrize(("name", "existing"), [("Chair", ["chair"]), ("CHAIR", ["chair"]),
                                                ("\u0441hair", ["chair"]),  # Cyrillic с
                                                ("ｃｈａｉｒ", ["chair"]),  # full-width
                                                ("sofa", ["ѕofa"])])
def test_a_case_only_or_look_alike_twin_of_a_class_is_refused(name, existing) -> None:
    from loop.data.classnames import twin_problem

    assert "only in case or in look-alike letters" in twin_problem(name, existing)
    assert twin_problem(name, [name]) is None and twin_problem("table", existing) is None


def test_ingest_refuses_twin_class_folders_and_stores_nfc(ws, tmp_path) -> None:
    root = tmp_path / "photos"
    make_image(root / "chair" / "a.jpg", (200, 10, 10))
    make_image(root / "Chair" / "b.jpg", (10, 200, 10))
    with pytest.raises(ClassNameError, match="Chair.*only in case"):
        ingest_folder(ws, root, labeled=True)
    assert manifest.load(ws).empty
    nfd = tmp_path / "nfd"
    make_image(nfd / "cafe\u0301" / "c.jpg", (10, 10, 200))  # the folder name as macOS writes it
    make_image(nfd / "chair" / "a.jpg", (200, 10, 10))
    ingest_folder(ws, nfd, labeled=True)
    assert set(manifest.load(ws)["label"]) == {"café", "chair"}  # NFC, one class
    later = tmp_path / "later"
    make_image(later / "Chair" / "d.jpg", (90, 90, 10))
    with pytest.raises(ClassNameError, match="only in case"):  # a twin of a class the manifest has
        ingest_folder(ws, later, labeled=True)


def test_a_pulled_twin_is_rejected_even_when_new_classes_are_allowed() -> None:
    from labeling.payloads import Decision
    from labeling.pull import _label_problem

    d = Decision("h", 1, "label", "Chair", 2, "r", pd.Timestamp("2026-01-01", tz="UTC"))
    assert "only in case" in _label_problem(d, {"chair", "table"}, True)
    assert _label_problem(Decision("h", 1, "label", "CONIN$", 2, "r", d.updated_at), {"chair"}, True)


def test_scan_refuses_a_case_twin_folder_as_a_label_and_keeps_the_photo_flagged(ws, sort_model, shared_data,
                                                                               tmp_path) -> None:
    """A person makes DEST/Chair/ beside DEST/chair/ and moves a copy in: no label (sorting would stop on
    the twin class), the photo is flagged for review, and the next sort still runs."""
    import shutil

    from loop.folders.corrections import scan
    from loop.sorting.folder import sort_folder
    from tests.helpers.sorting import sort_sample

    ws, src, dest = sort_sample(ws, sort_model, shared_data, tmp_path)
    register = manifest.load(ws)
    first = sorted(p for p in dest.rglob("*.jpg"))[0]
    cat = first.relative_to(dest).parts[0]
    manifest.set_labels(ws, [manifest.LabelChange(register["image_id"].iloc[0], cat, "review", "t")])
    twin = dest / cat.upper() / first.name
    twin.parent.mkdir()
    shutil.move(first, twin)
    image_id = file_sha256(twin)
    report = scan(ws, dest)
    assert report.corrections == [] and len(report.refused) == 1 and "NOT a label" in report.summary()
    row = manifest.load(ws).set_index("image_id").loc[image_id]
    assert row["flag"] == "user_moved" and str(row["label"]) != cat.upper()
    assert cat.upper() not in set(manifest.history(ws)["new_label"].dropna())
    make_image(src / "new.jpg", (30, 60, 90))
    assert sort_folder(ws, src, dest).copied == 1  # sorting goes on


def test_training_refuses_a_case_twin_already_in_an_old_manifest(ws, tmp_path) -> None:
    from loop.learning.train import train

    _four_labeled_photos(ws, tmp_path)
    manifest.update(ws, lambda df: df.assign(label=pd.array(["Chair", "chair", "table", "table"], dtype="string"),
                                             split=pd.array(["train"] * len(df), dtype="string")))
    with pytest.raises(ModelError, match="'chair' cannot be a class.*only in case"):
        train(ws)  # trained a model every sort then refused, before
