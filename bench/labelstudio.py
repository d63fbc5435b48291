"""Benchmark: `review push` of N flagged images and `review pull` of M labels against a real Label Studio,
each compared with Label Studio's own bulk operation measured in the same run on the same server:

* push  vs one `import_tasks` call (SDK) of the very same task payloads into a fresh project;
* pull  vs one JSON export (`GET /api/projects/{id}/export?exportType=JSON`, annotated tasks) of the same
  project.

Both sides go through label-studio-sdk (sortloop's `labeling` uses it too), so the SDK's request encoding
(~0.06 ms per task) is in both. Target: each ratio <= 1.3 at the default sizes; at small sizes the fixed
costs of a push (project lookup, the storage, manifest writes) weigh more. The push includes publishing
each photo into the served folder (a hard link, checked by hashing it: `labeling.served`).
The server is a copy of the test template data dir (`tests/prepare_labelstudio.py`),
started with `labeling.server.up` on a free port in a temporary workspace, and stopped at the end.
Caveat: to keep the run short, the M reviewed tasks are created by one bulk import of tasks *with*
annotations for M further manifest images (creating annotations one by one through the API runs at ~6/s);
to `pull` they are ordinary annotated tasks of the project. Each manifest row is its own file: a real photo
from ../shared/data/ikea_products with a few unique bytes appended (so each has its own sha256), written
to the temporary folder.

usage: .venv/bin/python bench/labelstudio.py [--n 10000] [--labels 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IKEA = REPO.parent / "shared" / "data" / "ikea_products"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path):
    """A workspace whose embedded Label Studio runs from a copy of the test template."""
    from labeling import server
    from loop.workspace import init_workspace, open_workspace

    out = subprocess.run([sys.executable, str(REPO / "tests" / "prepare_labelstudio.py")], capture_output=True,
                         text=True, check=True)
    template = Path(out.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(REPO / "tests"))
    from prepare_labelstudio import read_marker

    ws = init_workspace(root)
    ws.config_file.write_text(ws.config_file.read_text().replace("port = 8080", f"port = {free_port()}"))
    ws = open_workspace(root)
    shutil.copytree(template, server.data_dir(ws), symlinks=True)
    creds = read_marker(template)
    server.write_credentials(server.credentials_path(ws), creds)
    server.up(ws)
    return ws, creds


def synthetic_manifest(ws, n_flagged: int, n_reviewed: int) -> pd.DataFrame:
    """n_flagged + n_reviewed rows, each a distinct file (real photo + unique trailing bytes), predictions and
    flags set."""
    from loop import manifest as mf
    from loop.tables import conform

    photos = sorted(IKEA.glob("*/*.jpg"))
    classes = sorted({p.parent.name for p in photos})
    total = n_flagged + n_reviewed
    folder = ws.root.parent / "photos"
    folder.mkdir()
    paths, ids = [], []
    for i in range(total):
        data = photos[i % len(photos)].read_bytes() + f"bench-{i}".encode()  # after the JPEG's end: still valid
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(data)
        paths.append(str(path))
        ids.append(hashlib.sha256(data).hexdigest())
    rows = pd.DataFrame({
        "image_id": ids,
        "path": paths,
        "source": "user",
        "pred_label": [photos[(i * 7) % len(photos)].parent.name for i in range(total)],
        "pred_conf": [0.2 + 0.6 * ((i * 37) % 1000) / 1000 for i in range(total)],
        "pred_model": "v0001",
        "flag": ["user_moved" if i % 50 == 0 else "low_confidence" for i in range(total)],
        "added_at": pd.Timestamp.now(tz="UTC"),
    })
    # one labeled photo per class so the classes are known
    seeds = pd.DataFrame({"image_id": [hashlib.sha256(f"seed-{c}".encode()).hexdigest() for c in classes],
                          "path": [str(next(p for p in photos if p.parent.name == c)) for c in classes],
                          "source": "user", "label": classes, "label_source": "folder"})
    df = conform(pd.concat([rows, seeds], ignore_index=True), mf.COLUMNS)
    mf.update(ws, lambda _: df)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="push/pull vs Label Studio's bulk import/export")
    parser.add_argument("--n", type=int, default=10_000, help="flagged images to push")
    parser.add_argument("--labels", type=int, default=1_000, help="reviewed tasks to pull")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from label_studio_sdk import LabelStudio

    from labeling import payloads, server
    from labeling.pull import pull
    from labeling.push import push
    from labeling.served import served_name
    from loop import manifest as mf

    tmp = Path(tempfile.mkdtemp(prefix="sortloop-bench-ls-"))
    ws, creds = start_server(tmp / "ws")
    try:
        url = server.embedded_url(ws)
        sdk = LabelStudio(base_url=url, api_key=creds.token, timeout=1200)
        rows = synthetic_manifest(ws, args.n, args.labels)
        flagged, reviewed = rows.iloc[:args.n], rows.iloc[args.n:]
        classes = sorted(set(mf.load(ws)["label"].dropna()))

        # --- push: baseline = one import_tasks call of the same payloads into a fresh project
        tasks = [payloads.task(r, served_name(r["image_id"], r["path"])) for _, r in flagged.iterrows()]
        base = sdk.projects.create(title="bench bulk import", label_config=payloads.label_config(classes))
        t = time.perf_counter()
        answer = sdk.projects.import_tasks(id=base.id, request=tasks, return_task_ids=True)
        t_import = time.perf_counter() - t
        assert answer.task_count == len(tasks)

        # only the n flagged rows are candidates while pushing (the reviewed rows get their own tasks below)
        mf.update(ws, lambda d: d.assign(flag=d["flag"].where(~d["image_id"].isin(reviewed["image_id"]))))
        t = time.perf_counter()
        report = push(ws)
        t_push = time.perf_counter() - t
        if report.imported != args.n:
            raise SystemExit(f"push imported {report.imported}, expected {args.n}")

        # --- pull: M reviewed tasks (bulk-imported with annotations) into the workspace's project
        annotated = []
        for i, (_, r) in enumerate(reviewed.iterrows()):
            task = payloads.task(r, served_name(r["image_id"], r["path"]))
            task["annotations"] = [{"result": payloads.choice_result(classes[i % len(classes)]), "lead_time": 2.0}]
            annotated.append(task)
        sdk.projects.import_tasks(id=report.project_id, request=annotated)

        t = time.perf_counter()
        exported = sdk.projects.exports.download_sync(report.project_id, export_type="JSON")
        n_exported = len(json.loads(b"".join(exported)))
        t_export = time.perf_counter() - t

        t = time.perf_counter()
        pulled = pull(ws)
        t_pull = time.perf_counter() - t
        if pulled.labeled != args.labels or n_exported != args.labels:
            raise SystemExit(f"pull set {pulled.labeled} labels, export had {n_exported}; expected {args.labels}")
        t = time.perf_counter()
        again = pull(ws)
        t_again = time.perf_counter() - t

        print(f"Label Studio {url}, {args.n} tasks pushed, {args.labels} labels pulled (2 CPU cores, SQLite)")
        batch = ws.settings.labelstudio.push_batch_size
        print(f"push  sortloop {t_push:7.2f} s   LS one import_tasks {t_import:7.2f} s   "
              f"ratio {t_push / t_import:.2f}  ({report.batches} batches of <= {batch})")
        print(f"pull  sortloop {t_pull:7.2f} s   LS JSON export      {t_export:7.2f} s   ratio {t_pull / t_export:.2f}")
        print(f"pull again with nothing new: {t_again:.2f} s ({again.tasks_seen} tasks seen, {again.labeled} labels)")
    finally:
        server.down(ws)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
