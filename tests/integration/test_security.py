"""What the running Label Studio may show, and to whom: only the pushed photos, to a logged-in user; and the
`labelstudio/` tree is owner-only. Each probe asks the real server for a file that must stay private.

The module has its own server whose owner workspace lives inside the photos' common folder (the layout
that made earlier versions serve the credentials), with more photo folders than the old 64-storage cap.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import IKEA, running_labelstudio

pytestmark = pytest.mark.integration

N_FOLDERS = 70  # more than earlier versions' 64 storages, which collapsed them to a common ancestor


@pytest.fixture(scope="module")
def site():
    """A home folder holding 70 photo folders and the workspace, whose embedded server is running. Other
    users may enter it (0755, unlike pytest's own temp folders), so file modes alone decide what they read."""
    home = Path(tempfile.mkdtemp(prefix="sortloop-home-"))
    os.chmod(home, 0o755)
    try:
        with running_labelstudio(home / "ws") as ls:
            yield home, ls
    finally:
        shutil.rmtree(home, ignore_errors=True)


def fetch(ls, d: str, *, token: bool = True) -> httpx.Response:
    headers = {"Authorization": f"Token {ls.token}"} if token else {}
    return httpx.get(f"{ls.url}/data/local-files/", params={"d": d}, headers=headers, timeout=30)


def test_only_pushed_photos_are_served_never_credentials_database_or_symlink_targets(site):
    from labeling import served, server
    from labeling.push import push
    from loop.data import manifest as mf
    from loop.data.images import file_sha256
    from loop.data.ingest import ImageInfo, register_images

    home, ls = site
    ws = ls.owner
    originals = sorted(IKEA.glob("*/*.jpg"))[: N_FOLDERS + 2]
    infos, folders = [], []
    for i, src in enumerate(originals[:N_FOLDERS]):
        folder = home / "photos" / f"day{i:03d}"
        folder.mkdir(parents=True)
        shutil.copy(src, folder / "p.jpg")
        folders.append(folder)
        infos.append(ImageInfo(file_sha256(src), str(folder / "p.jpg"), label="chair" if i < 2 else None))
    (home / "photos" / "day000" / "not-pushed.jpg").write_bytes(originals[N_FOLDERS].read_bytes())
    # a photo that is a symlink leaving its folder, to a private image elsewhere in the home folder
    secret = home / "private" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(originals[N_FOLDERS + 1], secret)
    evil = folders[0] / "evil.jpg"
    evil.symlink_to(secret)
    infos.append(ImageInfo(file_sha256(secret), str(evil)))
    register_images(ws, infos)
    mf.update(ws, flag_unlabeled)

    report = push(ws)
    evil_id = file_sha256(secret)
    assert report.imported == N_FOLDERS - 2 and list(report.refused) == [evil_id]
    assert "symlink" in report.refused[evil_id] and "outside its folder" in report.refused[evil_id]
    pushed = set(mf.load(ws).dropna(subset=["review_task"])["image_id"])
    assert len(pushed) == N_FOLDERS - 2 and evil_id not in pushed

    # the served folder holds exactly the pushed photos, named by hash; one storage on it
    storage = served.storage_dir(ws)
    assert {p.name for p in storage.iterdir()} == {f"{i}.jpg" for i in pushed}
    one = next(iter(pushed))
    ok = fetch(ls, f"photos/{one}.jpg")
    assert ok.status_code == 200 and file_sha256_bytes(ok.content) == one
    assert fetch(ls, f"photos/{one}.jpg", token=False).status_code in (401, 403)

    # everything else is refused: the workspace's secrets, the database, the originals, the symlink target
    root = served.served_dir(ws)
    private = [server.credentials_path(ws), server.data_dir(ws) / "label_studio.sqlite3", secret, evil,
               folders[0] / "p.jpg", home / "photos" / "day000" / "not-pushed.jpg", ws.config_file]
    for path in private:
        # as earlier versions addressed it (relative to "/"): no such file under the served folder
        assert fetch(ls, str(path).lstrip("/")).status_code == 404
        # climbing out of the served folder: Label Studio's safe_join refuses it (an error answer, no bytes)
        for d in (os.path.relpath(path, root), f"photos/{os.path.relpath(path, storage)}"):
            answer = fetch(ls, d)
            assert answer.status_code in (400, 403, 404, 500), (d, answer.status_code)
            assert path.read_bytes()[:64] not in answer.content, d
    assert fetch(ls, f"photos/{evil_id}.jpg").status_code == 404


def test_the_labelstudio_tree_is_owner_only_and_up_repairs_it(site):
    from labeling import served, server
    from labeling.pull import pull

    _, ls = site
    ws = ls.owner
    # after up, a push and a pull (the first test), with the server running: every folder is 0700 and every
    # file 0600, except what Django chmods to 0644 itself (uploads, export snapshots), in those 0700 folders
    pull(ws)
    assert stat.S_IMODE(ws.labelstudio_dir.stat().st_mode) == 0o700
    loose = loose_modes(ws.labelstudio_dir)
    assert all(Path(name).parts[:2] == ("server", "media") and mode == "0o644" for name, mode in loose), loose
    assert {p.name for p in ws.labelstudio_dir.iterdir()} >= {"credentials.json", "project.json",
                                                              "server", "served", "server.log", "server.pid"}
    # another local user can read none of it: not the credentials, the database, an export, a served photo
    private = [server.credentials_path(ws), server.data_dir(ws) / "label_studio.sqlite3",
               *[ws.labelstudio_dir / name for name, _ in loose[:1]], next(served.storage_dir(ws).iterdir())]
    if os.geteuid() == 0:
        for path in private:
            assert not readable_by_nobody(path), path

    db = server.data_dir(ws) / "label_studio.sqlite3"
    os.chmod(db, 0o644)  # as an older version left it
    os.chmod(server.data_dir(ws), 0o755)
    again = server.up(ws)
    assert again.running and not again.first_start
    assert loose_modes(ws.labelstudio_dir) == []
    # the server process creates files owner-only from now on
    umask = [line for line in Path(f"/proc/{again.pid}/status").read_text().splitlines() if line.startswith("Umask")]
    assert umask == ["Umask:\t0077"]


def loose_modes(tree: Path) -> list[tuple[str, str]]:
    """Files readable or folders enterable by group/other under `tree`."""
    loose = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            st = (Path(dirpath) / name).lstat()
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                continue  # a hard link to a photo keeps the photo's own mode (inside 0700 folders)
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077 or (stat.S_ISDIR(st.st_mode) and mode != 0o700):
                loose.append((str(Path(dirpath, name).relative_to(tree)), oct(mode)))
    return loose


def readable_by_nobody(path: Path) -> bool:
    """Whether user `nobody` (uid 65534) can read `path` (run as root only)."""
    out = subprocess.run(["head", "-c", "1", str(path)], user=65534, group=65534, extra_groups=[],
                         capture_output=True, timeout=60)
    assert out.returncode == 0 or b"Permission denied" in out.stderr, out.stderr
    return out.returncode == 0


def flag_unlabeled(df):
    df.loc[df["label"].isna(), "flag"] = "low_confidence"
    return df


def file_sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_up_restarts_a_server_an_earlier_version_started_with_document_root_slash(site):
    from labeling import served, server

    _, ls = site
    ws = ls.owner
    info = json.loads(server.pid_path(ws).read_text())
    del info["document_root"]  # what an earlier version wrote: its server served from "/"
    server.pid_path(ws).write_text(json.dumps(info))
    again = server.up(ws)
    assert again.running and again.pid != info["pid"]
    assert json.loads(server.pid_path(ws).read_text())["document_root"] == str(served.served_dir(ws))
    environ = Path(f"/proc/{again.pid}/environ").read_bytes().split(b"\0")
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={served.served_dir(ws)}".encode() in environ
