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
       "chair ", "x" * 256]


@pytest.mark.parametrize("name", ["chair", "Table lamp", "café", "2024", "a.b", "x" * 255])
def test_plain_names_pass_unchanged(name: str) -> None:
    assert check_class_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_unusable_names_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ClassNameError, match="cannot be a class name: it "):
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


def test_training_refuses_a_bad_label_already_in_an_old_manifest(ws, tmp_path) -> None:
    from loop.learning.train import train

    infos = []
    for i, label in enumerate(["chair", "chair", "table", "table"]):
        photo = make_image(tmp_path / "p" / f"{i}.jpg", (60 * i, 10, 10))
        infos.append(ImageInfo(file_sha256(photo), str(photo), label=label))
    register_images(ws, infos)
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
