"""Unfamiliar photos in the sort: they go to DEST/_other/ (sub-folders kept), flagged `unfamiliar`, counted
apart; the standalone sorter decides exactly as `sortloop sort`; a model without the score sorts as before;
a copy a person moves into `_other/` is the "none of these" correction; apply and resort treat `_other`
as a folder."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from loop.data import manifest
from loop.data.classnames import OTHER_LABEL
from loop.data.images import load_model_input
from loop.folders.apply import apply_labels
from loop.folders.corrections import scan
from loop.scoring.unfamiliar import fit_familiarity, save_familiarity
from loop.sorting import copies
from loop.sorting.folder import sort_folder
from loop.sorting.report import MANY_UNFAMILIAR
from sortloop.bundle import build_bundle
from tests.helpers.sorting import deploy_copy, sample_ikea
from tests.unit.sortloop.test_bundle import _fake_sorter, _run_sorter_from_source


def _with_familiarity(artifact: Path, photos: list[Path], out: Path) -> Path:
    """A copy of `artifact` whose model.json carries an unfamiliar score fitted on `photos` (one item each)."""
    from loop.model.artifact import load_predictor

    shutil.copytree(artifact, out)
    predictor = load_predictor(out)
    feats = predictor.body_features(np.stack([load_model_input(p, predictor.image_size) for p in photos]))
    labels = np.array([p.parent.name for p in photos])
    familiarity, summary, _ = fit_familiarity(feats, labels, np.array([p.name for p in photos]), max_share=0.05)
    spec = json.loads((out / "model.json").read_text())
    spec["unfamiliar"] = save_familiarity(familiarity, summary, out)
    (out / "model.json").write_text(json.dumps(spec))
    return out


def _non_photos(folder: Path, n: int = 4) -> list[Path]:
    """Flat colours and noise in a sub-folder (out of scope for any furniture model)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        out.append(folder / f"flat{i}.png")
        Image.new("RGB", (200, 150), tuple(int(v) for v in rng.integers(0, 256, 3))).save(out[-1])
        out.append(folder / f"noise{i}.png")
        Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(out[-1])
    return out


@pytest.fixture(scope="module")
def familiar_model(tmp_path_factory, sort_model: Path, shared_data: Path) -> Path:
    scratch = tmp_path_factory.mktemp("familiar")
    photos = sample_ikea(shared_data, scratch / "reference", per_class=4, classes=4)
    return _with_familiarity(sort_model, photos, scratch / "artifact")


@pytest.fixture
def inbox(tmp_path: Path, shared_data: Path) -> Path:
    src = tmp_path / "inbox"
    sample_ikea(shared_data, src / "site", per_class=2, classes=4)  # photos like the labeled ones
    _non_photos(src / "site" / "misc")
    return src


def _expected(model_dir: Path, paths: list[Path]) -> dict[Path, bool]:
    from loop.model.artifact import load_predictor

    predictor = load_predictor(model_dir)
    out = predictor.predict_with_familiarity(np.stack([load_model_input(p, predictor.image_size) for p in paths]))
    return dict(zip(paths, out.unfamiliar.tolist(), strict=True))


def test_unfamiliar_photos_go_to_other_flagged_and_counted_apart(ws, familiar_model: Path, inbox: Path,
                                                                 tmp_path: Path) -> None:
    deploy_copy(ws, familiar_model)
    paths = sorted(p for p in inbox.rglob("*") if p.is_file())
    expected = _expected(familiar_model, paths)
    odd = {p for p in paths if p.parent.name == "misc"}
    assert all(expected[p] for p in odd), "flat colours and noise must be unfamiliar to a furniture model"
    assert not any(expected[p] for p in paths if p not in odd), "photos like the labeled ones must be kept"

    dest = tmp_path / "sorted"
    report = sort_folder(ws, inbox, dest)
    assert report.ok and report.unfamiliar == len(odd) and report.per_label["_other"] == len(odd)
    assert f"({report.flagged - len(odd)} unsure, {len(odd)} unfamiliar)" in report.summary()
    share = len(odd) / report.copied  # a large share gets the hint that the labeled set is of another kind
    assert ("looked unlike every labeled photo" in report.summary()) == (share > MANY_UNFAMILIAR)
    assert f"{len(odd)} of {len(odd)} photos (100%)" in dataclasses.replace(report, copied=len(odd)).summary()
    assert "looked unlike" not in dataclasses.replace(report, copied=len(odd) * 10).summary()
    for p in odd:  # SRC's sub-folders kept under _other, as under a category
        assert (dest / "_other" / "site" / "misc" / p.name).is_file()
    records = copies.load_records(ws, dest)
    assert set(records.loc[records["category"] == "_other", "source_path"]) == {str(p) for p in odd}
    df = manifest.load(ws).set_index("image_id")
    odd_ids = set(records.loc[records["category"] == "_other", "image_id"])
    assert (df.loc[sorted(odd_ids), "flag"] == "unfamiliar").all()
    assert not (df.drop(index=sorted(odd_ids))["flag"] == "unfamiliar").any()
    with open(dest / "_review.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["image_id"] for r in rows if r["flag"] == "unfamiliar"} == odd_ids
    assert all(r["flag"] == "low_confidence" for r in rows if r["image_id"] not in odd_ids)


def test_the_standalone_sorter_sends_the_same_photos_to_other(ws, familiar_model: Path, inbox: Path,
                                                              tmp_path: Path) -> None:
    deploy_copy(ws, familiar_model)
    bundle = build_bundle(ws, tmp_path / "bundle", sorter=_fake_sorter(tmp_path))
    shipped = bundle.out / "model"
    assert (shipped / "unfamiliar.npy").read_bytes() == (familiar_model / "unfamiliar.npy").read_bytes()
    run = _run_sorter_from_source(str(inbox), str(tmp_path / "pc"), "--model", str(shipped), "--workers", "0")
    assert run["rc"] == 0 and run["heavy"] == [], run["err"]
    main = tmp_path / "main"
    assert sort_folder(ws, inbox, main).ok

    def others(dest: Path) -> set[Path]:
        return {p.relative_to(dest / "_other") for p in (dest / "_other").rglob("*") if p.is_file()}

    assert others(tmp_path / "pc") == others(main) and others(main)
    with open(tmp_path / "pc" / "_review.csv", newline="") as fh:
        flagged = {Path(r["dest_path"]).name for r in csv.DictReader(fh) if r["flag"] == "unfamiliar"}
    assert flagged == {p.name for p in others(main)}


def test_a_model_without_the_score_sorts_as_before(ws, sort_model: Path, inbox: Path, tmp_path: Path) -> None:
    """An old model.json (no "unfamiliar" section) with an old ONNX graph (logits only): every photo to its
    class, as before; nothing goes to _other."""
    import onnx

    old = tmp_path / "old"
    shutil.copytree(sort_model, old)
    graph = onnx.load(str(old / "model.onnx"))
    kept = [o for o in graph.graph.output if o.name == "logits"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(old / "model.onnx"))
    spec = json.loads((old / "model.json").read_text())
    spec.pop("checksums", None)  # an old model.json predates the file checksums too (issue 23)
    (old / "model.json").write_text(json.dumps(spec))
    assert "unfamiliar" not in spec
    deploy_copy(ws, old)
    from loop.model.artifact import load_predictor

    predictor = load_predictor(old)
    paths = sorted(p for p in inbox.rglob("*") if p.is_file())
    best = predictor.predict(np.stack([load_model_input(p, predictor.image_size) for p in paths])).argmax(1)
    dest = tmp_path / "sorted"
    report = sort_folder(ws, inbox, dest)
    assert report.ok and report.unfamiliar == 0 and not (dest / "_other").exists()
    for path, k in zip(paths, best, strict=True):
        assert (dest / predictor.classes[k] / path.relative_to(inbox)).is_file()


def test_a_copy_moved_into_other_is_none_of_these_and_apply_keeps_it_there(ws, familiar_model: Path, inbox: Path,
                                                                            tmp_path: Path) -> None:
    deploy_copy(ws, familiar_model)
    dest = tmp_path / "sorted"
    assert sort_folder(ws, inbox, dest).ok
    records = copies.load_records(ws, dest)
    kept = records[records["category"] != "_other"].sort_values("dest_path").iloc[0]
    moved = dest / "_other" / Path(kept["dest_path"]).name
    moved.parent.mkdir(parents=True, exist_ok=True)
    Path(kept["dest_path"]).rename(moved)
    odd = records[records["category"] == "_other"].sort_values("dest_path").iloc[0]
    back = dest / str(kept["category"]) / Path(odd["dest_path"]).name  # and one out of _other into a class
    Path(odd["dest_path"]).rename(back)

    report = scan(ws, dest)
    found = {Path(m.new_path): m.new_category for m in report.corrections}
    assert found == {moved: "_other", back: str(kept["category"])}
    df = manifest.load(ws).set_index("image_id")
    assert df.at[kept["image_id"], "label"] == OTHER_LABEL and df.at[kept["image_id"], "label_source"] == "user_move"
    assert df.at[odd["image_id"], "label"] == kept["category"]
    history = manifest.history(ws)
    assert OTHER_LABEL in set(history["new_label"])
    assert apply_labels(ws).moved == []  # both copies are where their labels say
    assert moved.is_file() and back.is_file()


def test_the_workers_models_sort_exactly_as_the_main_process_model(ws, familiar_model: Path, inbox: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:
    """Each decode worker predicts with its own copy of the model (`loop.sorting.model_workers`); with no
    workers the main process predicts: the same labels, confidences, flags and `_other` decisions."""
    from loop.sorting import model_workers

    deploy_copy(ws, familiar_model)
    columns = ["source_path", "category", "label", "confidence", "score", "flagged"]
    runs, predicted_in_workers = {}, {}
    for workers in (2, 0):
        monkeypatch.setenv("SORTLOOP_SORT__WORKERS", str(workers))
        ws.__dict__.pop("settings", None)  # read the settings again, with the override
        seen = []
        monkeypatch.setattr(model_workers.Prediction, "concat", staticmethod(
            lambda parts, concat=model_workers.Prediction.concat, seen=seen: seen.append(len(parts)) or concat(parts)))
        dest = tmp_path / f"workers{workers}"
        report = sort_folder(ws, inbox, dest)
        assert report.ok and report.copied == 16
        predicted_in_workers[workers] = report.stages.get("worker_predict", 0.0) > 0 and sum(seen) == 16
        runs[workers] = copies.load_records(ws, dest)[columns].sort_values("source_path").reset_index(drop=True)
    assert predicted_in_workers == {2: True, 0: False}
    assert (runs[2]["category"] == "_other").sum() == 8
    np.testing.assert_allclose(runs[2]["confidence"], runs[0]["confidence"], atol=1e-6)
    np.testing.assert_allclose(runs[2]["score"], runs[0]["score"], atol=1e-6)
    same = ["source_path", "category", "label", "flagged"]
    assert runs[2][same].equals(runs[0][same])
