"""Push and pull against a real Label Studio, with real photos; the SDK plays the reviewer."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest

from labeling.payloads import PREDICTION_VERSION
from tests.integration.conftest import build_manifest

pytestmark = pytest.mark.integration

FLAGGED = [  # (true class, model's guess, confidence, flag)
    ("chair", "chair", 0.45, "low_confidence"),
    ("sofa", "chair", 0.30, "low_confidence"),
    ("table", "table", 0.40, "low_confidence"),
    ("bed", "sofa", 0.35, "low_confidence"),
    ("chair", "table", 0.90, "user_moved"),
    ("sofa", "sofa", 0.48, "low_confidence"),
]
LABELED = {"chair": 2, "sofa": 2, "table": 2, "bed": 2}


def project_tasks(sdk, project_id: int) -> list:
    return list(sdk.tasks.list(project=project_id, page_size=1000))


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def test_server_files_and_secrets(labelstudio):
    from labeling import server

    ws = labelstudio.owner
    st = server.status(ws)
    assert st.running and st.embedded and st.url == labelstudio.url
    mode = stat.S_IMODE(os.stat(server.credentials_path(ws)).st_mode)
    assert mode == 0o600
    again = server.up(ws)  # already running: found, not restarted
    assert again.pid == st.pid and not again.first_start
    assert labelstudio.token not in server.log_path(ws).read_text(errors="replace")


def test_push_creates_one_task_per_flagged_image_with_predictions(ls_ws, sdk):
    from labeling.push import push
    from loop.data import manifest as mf

    ids = build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED)
    first = push(ls_ws)
    assert (first.imported, first.linked, first.candidates) == (len(FLAGGED), 0, len(FLAGGED))
    tasks = project_tasks(sdk, first.project_id)
    assert sorted(t.data["image_id"] for t in tasks) == sorted(ids)
    by_image = {t.data["image_id"]: t for t in tasks}
    for image_id, (_, guess, conf, _) in zip(ids, FLAGGED, strict=True):
        (pred,) = by_image[image_id].predictions
        assert pred.model_version == PREDICTION_VERSION and by_image[image_id].data["model"] == "v0001"
        assert pred.score == pytest.approx(conf)
        assert pred.result[0]["value"]["choices"] == [guess]
    # most useful first: the user move, then the active-learning selection in its rank order
    order = [t.data["image_id"] for t in sorted(tasks, key=lambda t: t.id)]
    df = mf.load(ls_ws).set_index("image_id")
    selected = [i for i in ids if i != ids[4]]
    assert df.loc[selected, "review_rank"].notna().all()
    assert order == [ids[4]] + sorted(selected, key=lambda i: df.at[i, "review_rank"])
    assert (df.loc[ids, "review_status"] == "pushed").all()
    assert set(df.loc[ids, "review_task"].astype(int)) == {t.id for t in tasks}

    again = push(ls_ws)
    assert (again.imported, again.candidates) == (0, 0)
    assert len(project_tasks(sdk, first.project_id)) == len(FLAGGED)

    # the manifest forgot its hints (say a crash after the import): the project's image ids still dedupe
    mf.update(ls_ws, lambda d: d.assign(review_task=pd.NA, review_status=pd.NA))
    third = push(ls_ws)
    assert (third.imported, third.linked) == (0, len(FLAGGED))
    assert len(project_tasks(sdk, first.project_id)) == len(FLAGGED)
    assert (mf.load(ls_ws).set_index("image_id").loc[ids, "review_status"] == "pushed").all()


def test_project_config_and_image_served(ls_ws, labelstudio):
    import httpx

    from labeling.client import connect
    from labeling.payloads import config_classes
    from labeling.project import find_project
    from labeling.push import push

    build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED[:2])
    push(ls_ws)
    with connect(ls_ws) as client:
        project = find_project(client, ls_ws)
        assert config_classes(project.label_config) == sorted(LABELED)
        assert 'hotkey="1"' in project.label_config
        task = next(iter(client.tasks.list(project=project.id, fields="task_only", page_size=1)))
        storages = [s.path for s in client.import_storage.local.list(project=project.id)]
    from labeling.served import storage_dir

    assert storages == [str(storage_dir(ls_ws))]  # one storage: the served photos, nothing else
    assert task.data["image"] == f"/data/local-files/?d=photos/{task.data['image_id']}.jpg"
    # served from its published entry (named by hash), to an authenticated client only
    url = labelstudio.url + task.data["image"]
    ok = httpx.get(url, headers={"Authorization": f"Token {labelstudio.token}"})
    assert ok.status_code == 200 and ok.content == Path(task.data["path"]).read_bytes()
    assert httpx.get(url).status_code in (401, 403)


def test_pull_applies_reviews_exactly_and_is_incremental(ls_ws, sdk, labelstudio):
    from labeling.pull import pull
    from labeling.push import push
    from loop.data import manifest as mf

    ids = build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED)
    report = push(ls_ws)
    task_of = {t.data["image_id"]: t.id for t in project_tasks(sdk, report.project_id)}
    agree, correct, table_task, edited, moved, untouched = ids
    sdk.annotations.create(id=task_of[agree], result=choice("chair"), lead_time=1.0)  # agrees with the guess
    sdk.annotations.create(id=task_of[correct], result=choice("sofa"))  # corrects "chair" -> "sofa"
    sdk.annotations.create(id=task_of[table_task], result=[], was_cancelled=True)  # skipped
    first_edit = sdk.annotations.create(id=task_of[edited], result=choice("sofa"))  # wrong at first
    sdk.annotations.create(id=task_of[moved], result=choice("chair"))  # confirms the user's move

    history_before = len(mf.history(ls_ws))
    p1 = pull(ls_ws)
    assert p1.ok and (p1.labeled, p1.skipped) == (4, 1)
    df = mf.load(ls_ws).set_index("image_id")
    assert df.loc[agree, "label"] == "chair" and df.loc[correct, "label"] == "sofa"
    assert df.loc[edited, "label"] == "sofa" and df.loc[moved, "label"] == "chair"
    assert pd.isna(df.loc[table_task, "label"]) and df.loc[table_task, "review_status"] == "skipped"
    assert pd.isna(df.loc[untouched, "label"]) and df.loc[untouched, "review_status"] == "pushed"
    reviewed = [agree, correct, edited, moved]
    assert (df.loc[reviewed, "label_source"] == "review").all()
    assert (df.loc[reviewed, "label_by"] == labelstudio.username).all()
    assert (df.loc[reviewed, "review_status"] == "reviewed").all()
    hist = mf.history(ls_ws).iloc[history_before:]
    assert sorted(hist["image_id"]) == sorted(reviewed) and set(hist["source"]) == {"review"}

    # nothing changed in Label Studio: a second pull changes nothing
    p2 = pull(ls_ws)
    assert (p2.labeled, p2.skipped) == (0, 0)
    assert len(mf.history(ls_ws)) == history_before + 4

    # the reviewer edits the earlier annotation: bed, not sofa
    sdk.annotations.update(id=first_edit.id, result=choice("bed"))
    p3 = pull(ls_ws)
    assert p3.labeled == 1 and p3.tasks_seen == 1
    df = mf.load(ls_ws).set_index("image_id")
    assert df.loc[edited, "label"] == "bed"
    last = mf.history(ls_ws).iloc[-1]
    assert (last["image_id"], last["old_label"], last["new_label"]) == (edited, "sofa", "bed")
    assert last["at"] == pd.Timestamp(sdk.annotations.get(id=first_edit.id).updated_at)

    # a later user move is not overwritten by re-reading an old annotation of a touched task
    mf.set_labels(ls_ws, [mf.LabelChange(agree, "table", "user_move", "scan")])
    sdk.tasks.update(id=str(task_of[agree]), meta={"image_id": agree, "touched": True})
    p4 = pull(ls_ws)
    assert p4.labeled == 0
    assert mf.load(ls_ws).set_index("image_id").loc[agree, "label"] == "table"

    state = json.loads((ls_ws.labelstudio_dir / "pull.json").read_text())
    assert state["watermark"] and state["project_id"] == report.project_id


def test_unknown_label_is_rejected_unless_allowed(ls_ws, sdk):
    from labeling import payloads
    from labeling.client import connect
    from labeling.pull import pull
    from labeling.push import push
    from loop.data import manifest as mf
    from loop.workspace import open_workspace

    ids = build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED[:2])
    report = push(ls_ws)
    with connect(ls_ws) as client:  # a team member adds a class in Label Studio's settings
        client.projects.update(report.project_id, label_config=payloads.label_config(sorted(LABELED) + ["lamp"]))
    task_of = {t.data["image_id"]: t.id for t in project_tasks(sdk, report.project_id)}
    sdk.annotations.create(id=task_of[ids[0]], result=choice("lamp"))
    sdk.annotations.create(id=task_of[ids[1]], result=choice("sofa"))

    p1 = pull(ls_ws)
    assert not p1.ok and [r.image_id for r in p1.rejected] == [ids[0]] and "lamp" in p1.rejected[0].reason
    assert p1.labeled == 1  # the good label is applied
    assert pd.isna(mf.load(ls_ws).set_index("image_id").loc[ids[0], "label"])
    assert not pull(ls_ws).ok  # not forgotten: the watermark did not move past it

    text = ls_ws.config_file.read_text().replace("allow_new_classes = false", "allow_new_classes = true")
    ls_ws.config_file.write_text(text)
    p3 = pull(open_workspace(ls_ws.root))
    assert p3.ok and p3.labeled == 1
    assert mf.load(ls_ws).set_index("image_id").loc[ids[0], "label"] == "lamp"


def test_cli_push_and_pull(ls_ws):
    from typer.testing import CliRunner

    from loop.data import manifest as mf
    from sortloop.cli import app

    build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED[:3])
    runner = CliRunner()
    # one vocabulary in status and push, and the daily budget named when it holds photos back
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SORTLOOP_REVIEW__DAILY_BUDGET", "2")
        status = runner.invoke(app, ["status", "-w", str(ls_ws.root)])
        assert "3 waiting to be sent for review (3 flagged by sort as unsure); 2 can be sent today " \
               "(review.daily_budget = 2 a day" in status.output, status.output
        res = runner.invoke(app, ["review", "push", "-w", str(ls_ws.root)])
        assert res.exit_code == 0, res.output
        assert "sent 2 photo(s) for review (2 flagged by sort as unsure)" in res.output
        assert "1 more wait for review: today's budget is spent (review.daily_budget = 2 a day" in res.output
    res = runner.invoke(app, ["review", "push", "-w", str(ls_ws.root)])  # the default budget: the last one goes
    assert res.exit_code == 0 and "sent 1 photo(s) for review" in res.output, res.output
    res = runner.invoke(app, ["review", "pull", "-w", str(ls_ws.root)])
    assert res.exit_code == 0 and "0 label(s) set" in res.output, res.output
    assert (mf.load(ls_ws)["review_status"] == "pushed").sum() == 3
    res = runner.invoke(app, ["labelstudio", "status", "--json", "-w", str(ls_ws.root)])
    assert res.exit_code == 0 and json.loads(res.output)["running"] is True


def test_label_studio_killed_mid_push_leaves_no_duplicates(ls_ws, sdk, labelstudio, monkeypatch):
    """Batches of 2; the server is SIGKILLed after the first: the push fails naming the fix, the first batch
    stays recorded in the manifest, and the push after a restart sends the rest, each photo exactly once."""
    import signal

    from labeling import server
    from labeling.push import push
    from loop.data import manifest as mf
    from loop.errors import LabelStudioError
    from loop.workspace import open_workspace

    ls_ws.config_file.write_text(ls_ws.config_file.read_text().replace("push_batch_size = 500", "push_batch_size = 2"))
    ws = open_workspace(ls_ws.root)
    ids = build_manifest(ws, labeled=LABELED, flagged=FLAGGED)
    pid = server.status(labelstudio.owner).pid

    def kill_after_first_batch(done: int, total: int) -> None:
        if done == 2:
            os.kill(pid, signal.SIGKILL)

    try:
        with monkeypatch.context() as m:
            m.setattr("labeling.client.time.sleep", lambda s: None)  # no waits between the refused retries
            with pytest.raises(LabelStudioError, match="may or may not have been applied"):
                push(ws, on_progress=kill_after_first_batch)
        df = mf.load(ws).set_index("image_id")
        assert (df.loc[ids, "review_status"] == "pushed").sum() == 2
    finally:
        server.up(labelstudio.owner)
    again = push(ws)
    assert (again.imported, again.linked, again.batches) == (len(ids) - 2, 0, 2)
    assert sorted(t.data["image_id"] for t in project_tasks(sdk, again.project_id)) == sorted(ids)
    assert (mf.load(ws).set_index("image_id").loc[ids, "review_status"] == "pushed").all()


def test_up_times_out_with_a_clear_error(tmp_path):
    from labeling import server
    from loop.errors import LabelStudioError
    from tests.integration.conftest import configure, free_port, template_dir

    ws = configure(tmp_path / "ws", port=free_port(), title="timeout",
                   replace={"start_timeout_s = 180": "start_timeout_s = 0.5"})
    shutil.copytree(template_dir(), server.data_dir(ws), symlinks=True)
    server.write_credentials(server.credentials_path(ws), server.new_credentials("x@sortloop.test"))
    with pytest.raises(LabelStudioError, match="did not answer") as err:
        server.up(ws)
    assert str(server.log_path(ws)) in str(err.value)
    assert not server.status(ws).running and not server.pid_path(ws).exists()
    assert not server.down(ws)


def test_failed_manifest_write_keeps_the_watermark_and_loses_nothing(ls_ws, sdk, monkeypatch):
    from labeling import pull as pull_module
    from labeling.push import push
    from loop.data import manifest as mf
    from loop.errors import ManifestError

    ids = build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED[:2])
    report = push(ls_ws)
    task_of = {t.data["image_id"]: t.id for t in project_tasks(sdk, report.project_id)}
    sdk.annotations.create(id=task_of[ids[1]], result=choice("sofa"))
    state_file = ls_ws.labelstudio_dir / "pull.json"

    def broken(*args, **kwargs):
        raise ManifestError("disk full (simulated)")

    monkeypatch.setattr(mf, "set_labels", broken)
    with pytest.raises(ManifestError):
        pull_module.pull(ls_ws)
    assert not state_file.exists()
    monkeypatch.undo()

    done = pull_module.pull(ls_ws)
    assert done.labeled == 1 and state_file.exists()
    assert mf.load(ls_ws).set_index("image_id").loc[ids[1], "label"] == "sofa"


def test_an_annotation_deleted_in_label_studio_takes_its_label_back(ls_ws, sdk):
    from labeling.deleted import BY
    from labeling.pull import pull
    from labeling.push import push
    from loop.data import manifest as mf

    fresh, relabeled, moved_later = build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED[:3])
    mf.set_labels(ls_ws, [mf.LabelChange(relabeled, "table", "user_move", "scan")])  # a label before review
    report = push(ls_ws)
    task_of = {t.data["image_id"]: t.id for t in project_tasks(sdk, report.project_id)}
    made = {i: sdk.annotations.create(id=task_of[i], result=choice("sofa")) for i in (fresh, relabeled, moved_later)}
    assert pull(ls_ws).labeled == 3
    mf.set_labels(ls_ws, [mf.LabelChange(moved_later, "bed", "user_move", "scan")])  # changed after the review

    for annotation in made.values():
        sdk.annotations.delete(id=annotation.id)
    history_before = len(mf.history(ls_ws))
    p = pull(ls_ws)
    assert p.ok and p.reverted == 2 and "2 reverted" in p.summary()
    df = mf.load(ls_ws).set_index("image_id")
    assert pd.isna(df.loc[fresh, "label"]) and pd.isna(df.loc[fresh, "label_source"])  # unlabeled again
    assert (df.loc[relabeled, "label"], df.loc[relabeled, "label_source"]) == ("table", "user_move")
    assert df.loc[moved_later, "label"] == "bed"  # not set by the deleted annotation: left alone
    assert (df.loc[[fresh, relabeled, moved_later], "review_status"] == "pushed").all()
    logged = mf.history(ls_ws).iloc[history_before:].set_index("image_id")
    assert sorted(logged.index) == sorted([fresh, relabeled]) and set(logged["by"]) == {BY}
    assert logged.loc[relabeled, "old_label"] == "sofa" and logged.loc[relabeled, "new_label"] == "table"
    assert pd.isna(logged.loc[fresh, "new_label"])

    assert pull(ls_ws).reverted == 0  # taken back once
    sdk.annotations.create(id=task_of[fresh], result=choice("chair"))  # reviewed again: applied as usual
    assert pull(ls_ws).labeled == 1
    assert mf.load(ls_ws).set_index("image_id").loc[fresh, "label"] == "chair"
    assert len(project_tasks(sdk, report.project_id)) == 3  # nothing re-imported


def test_a_label_that_cannot_be_a_class_is_rejected_even_when_new_classes_are_allowed(ls_ws, sdk):
    from labeling import payloads
    from labeling.client import connect
    from labeling.pull import pull
    from labeling.push import push
    from loop.data import manifest as mf
    from loop.workspace import open_workspace

    ls_ws.config_file.write_text(ls_ws.config_file.read_text().replace("allow_new_classes = false",
                                                                       "allow_new_classes = true"))
    ws = open_workspace(ls_ws.root)
    bad, good = build_manifest(ws, labeled=LABELED, flagged=FLAGGED[:2])
    report = push(ws)
    with connect(ws) as client:  # someone adds a "class" that is a path
        client.projects.update(report.project_id, label_config=payloads.label_config(sorted(LABELED) + ["../../etc"]))
    task_of = {t.data["image_id"]: t.id for t in project_tasks(sdk, report.project_id)}
    sdk.annotations.create(id=task_of[bad], result=choice("../../etc"))
    sdk.annotations.create(id=task_of[good], result=choice("lamp"))

    p = pull(ws)
    assert not p.ok and [r.image_id for r in p.rejected] == [bad] and "cannot be a class name" in p.rejected[0].reason
    df = mf.load(ws).set_index("image_id")
    assert pd.isna(df.loc[bad, "label"]) and df.loc[good, "label"] == "lamp"
    assert "../../etc" not in set(mf.history(ws)["new_label"].dropna())


def test_tasks_and_storages_of_an_earlier_version_are_brought_to_the_served_folder(ls_ws, sdk, labelstudio):
    import httpx

    from labeling import payloads
    from labeling.project import state_path
    from labeling.push import push
    from labeling.served import served_dir, storage_dir

    build_manifest(ls_ws, labeled=LABELED, flagged=FLAGGED[:2])
    report = push(ls_ws)
    # as an earlier version left the project: tasks pointing at the photo in place, a storage per folder
    tasks = project_tasks(sdk, report.project_id)
    for t in tasks:
        sdk.tasks.update(id=str(t.id), data={**t.data, "image": "/data/local-files/?d=" + t.data["path"].lstrip("/")})
    legacy = served_dir(ls_ws) / "legacy-folder"
    legacy.mkdir()
    sdk.import_storage.local.create(project=report.project_id, path=str(legacy), use_blob_urls=False)
    state = json.loads(state_path(ls_ws).read_text())
    del state["served"]
    state_path(ls_ws).write_text(json.dumps(state))

    again = push(ls_ws)
    assert again.imported == 0
    storages = [s.path for s in sdk.import_storage.local.list(project=report.project_id)]
    assert storages == [str(storage_dir(ls_ws))]
    for t in project_tasks(sdk, report.project_id):
        assert t.data["image"] == payloads.image_url(f"{t.data['image_id']}.jpg")
        shown = httpx.get(labelstudio.url + t.data["image"], headers={"Authorization": f"Token {labelstudio.token}"})
        assert shown.status_code == 200 and shown.content == Path(t.data["path"]).read_bytes()


def test_a_review_that_confirms_the_class_counts_as_unchanged(ls_ws, sdk):
    """A moved photo (label user_move) confirmed by a reviewer: only the label's source changes."""
    from labeling.pull import pull
    from labeling.push import push
    from loop.data import manifest as mf

    (moved,) = build_manifest(ls_ws, labeled=LABELED, flagged=[("chair", "table", 0.9, "user_moved")])
    mf.set_labels(ls_ws, [mf.LabelChange(moved, "chair", "user_move", "scan")])
    report = push(ls_ws)
    task_id = int(mf.load(ls_ws).set_index("image_id").loc[moved, "review_task"])
    sdk.annotations.create(id=task_id, result=choice("chair"))
    pulled = pull(ls_ws)
    assert report.imported == 1 and pulled.ok
    assert (pulled.labeled, pulled.confirmed) == (0, 1)
    assert "0 label(s) set, 1 unchanged" in pulled.summary()
    row = mf.load(ls_ws).set_index("image_id").loc[moved]
    assert (row["label"], row["label_source"]) == ("chair", "review")  # the review is still recorded


def test_pulled_correction_moves_the_sorted_copy(ls_ws, sdk, sort_model, shared_data, tmp_path, monkeypatch):
    """A reviewer corrects a sorted photo in Label Studio; `review pull` moves its copy to the right folder."""
    import csv

    from labeling.push import push
    from loop.folders import corrections
    from loop.sorting import copies
    from loop.sorting.folder import sort_folder
    from loop.sorting.review_csv import REVIEW_CSV
    from loop.workspace import Workspace
    from sortloop.jobs import pull_reviews
    from tests.helpers.sorting import deploy_copy, ikea_classes, sample_ikea

    monkeypatch.setenv("SORTLOOP_SORT__FLAG_THRESHOLD", "0")  # every copy flagged, so every photo is pushed
    ws = Workspace(ls_ws.root)
    deploy_copy(ws, sort_model)
    src, dest = tmp_path / "inbox", tmp_path / "sorted"
    sample_ikea(shared_data, src, per_class=1, classes=3)
    assert sort_folder(ws, src, dest).ok
    records = copies.load_records(ws, dest)
    report = push(ws)
    task_of = {t.data["image_id"]: t.id for t in project_tasks(sdk, report.project_id)}
    rec = records.iloc[0]
    truth = Path(rec.source_path).parent.name  # the photo's real class (its ikea folder)
    label = truth if truth != rec.label else next(c for c in ikea_classes(shared_data) if c != rec.label)
    sdk.annotations.create(id=task_of[rec.image_id], result=choice(label))

    pulled = pull_reviews(ws)  # what `review pull` runs: the labels, then the folders follow

    old = Path(rec.dest_path)
    new = dest / label / old.relative_to(dest / rec.label)
    assert pulled.ok and pulled.pulled.labeled == 1 and f"{old} -> {new}" in pulled.summary()
    assert not old.exists() and new.read_bytes() == Path(rec.source_path).read_bytes()
    assert Path(rec.source_path).exists()  # the original stays
    with open(dest / REVIEW_CSV, newline="") as fh:
        listed = {row["image_id"] for row in csv.DictReader(fh)}
    assert listed == set(records.image_id) - {rec.image_id}  # reviewed: off the pending list
    assert corrections.scan(ws, dest).moves == []  # the move is sortloop's, not a person's correction
    before = sorted(p for p in dest.rglob("*") if p.is_file())
    rerun = pull_reviews(ws)  # a no-op
    assert rerun.folders == "" and sorted(p for p in dest.rglob("*") if p.is_file()) == before
