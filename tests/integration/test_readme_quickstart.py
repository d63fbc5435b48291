"""The README's two quickstarts, run as written: every `export` and `sortloop ...` line of their code blocks,
in order, with HOME pointing at a temp folder holding `~/Photos/...` (real photos), a real Label Studio, and
a simulated reviewer (the SDK) where the README says to review in the browser.

The only set-up the README does not show: the embedded Label Studio's data dir is copied from the test
template (so its first start skips a minute of migrations) and it listens on a free port.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.integration.conftest import REPO, free_port, template_dir

pytestmark = pytest.mark.integration

README = REPO / "README.md"
IKEA = REPO.parent / "shared" / "data" / "ikea_products"
ROOMS = REPO.parent / "shared" / "data" / "rooms"


def readme_blocks(heading: str) -> list[list[str]]:
    """The command lines of each ```bash block under `heading` (up to the next heading), comments dropped."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    end = min((m.start() for m in re.finditer(r"\n#{2,3} ", text[start + 1:])), default=len(text)) + start + 1
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)
    return [[" ".join(shlex.split(line, comments=True)) for line in block.splitlines()
             if shlex.split(line, comments=True)] for block in blocks]


def _copy(files: list[Path], folder: Path, prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, folder / f"{prefix}{f.name}")


class Shell:
    """Runs README lines: `export K=V` sets the environment; `sortloop ...` runs the CLI in this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, home: Path):
        self.monkeypatch, self.home, self.outputs = monkeypatch, home, []
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("SORTLOOP_LABELSTUDIO__PORT", str(free_port()))

    def run(self, line: str) -> str:
        from sortloop.cli import app

        words = shlex.split(line)
        if words[0] == "export":
            key, value = words[1].split("=", 1)
            self.monkeypatch.setenv(key, str(Path(value).expanduser()))
            return ""
        assert words[0] == "sortloop", line
        result = CliRunner().invoke(app, [str(Path(w).expanduser()) if w.startswith("~/") else w for w in words[1:]])
        assert result.exit_code == 0, f"{line}\n{result.output}"
        self.outputs.append(result.output)
        if words[1] == "init":
            self._seed_labelstudio()
        return result.output

    def _seed_labelstudio(self) -> None:
        from labeling import server
        from loop.workspace import open_workspace
        from tests.prepare_labelstudio import read_marker

        ws = open_workspace()
        if not server.data_dir(ws).exists():
            template = template_dir()
            shutil.copytree(template, server.data_dir(ws), symlinks=True)
            server.write_credentials(server.credentials_path(ws), read_marker(template))


def review_every_task(truth: dict[str, str]) -> int:
    """Play the reviewer: answer every pushed task with the true class of its photo (by file name)."""
    from label_studio_sdk import LabelStudio

    from labeling import payloads, server
    from loop.workspace import open_workspace

    ws = open_workspace()
    creds = server.read_credentials(server.credentials_path(ws))
    sdk = LabelStudio(base_url=server.embedded_url(ws), api_key=creds.token, timeout=120)
    project = next(p for p in sdk.projects.list() if p.title == ws.settings.labelstudio.project_title)
    done = 0
    for task in sdk.tasks.list(project=project.id, fields="all"):
        label = truth[Path(task.data["path"]).name]
        sdk.annotations.create(id=task.id, result=payloads.choice_result(label))
        done += 1
    return done


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from labeling import server
    from loop.workspace import open_workspace

    sh = Shell(monkeypatch, tmp_path / "home")
    yield sh
    with contextlib.suppress(Exception):  # no workspace: nothing was started
        server.down(open_workspace())


def test_i_have_some_sorted_photos(shell: Shell) -> None:
    photos = shell.home / "Photos"
    for cls in ("bed", "chair", "sofa", "table"):
        _copy(sorted((IKEA / cls).glob("*.jpg"))[:8], photos / "by-category" / cls)
    truth = {}
    for cls in ("bed", "chair", "sofa"):
        room = sorted((ROOMS / cls).iterdir())[:5]
        _copy(room, photos / "inbox" / "2025-06", prefix=f"{cls}-")
        truth.update({f"{cls}-{p.name}": cls for p in room})
    (setup,) = readme_blocks("## Quickstart on your own folders")
    first, after_review = readme_blocks("### I have some sorted photos")
    for line in setup + first:
        shell.run(line)
    assert "4 categories (photos added): bed 8, chair 8, sofa 8, table 8" in shell.outputs[1]
    def photo_files(folder: Path) -> list[Path]:
        return [p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")]

    assert len(photo_files(photos / "sorted")) == 15  # every inbox photo copied; the originals stay
    assert len(photo_files(photos / "inbox")) == 15

    assert review_every_task(truth) > 0
    outputs = [shell.run(line) for line in after_review]
    assert int(re.search(r"(\d+) label\(s\) set", outputs[0]).group(1)) > 0, outputs[0]
    assert "trained candidate v0002" in outputs[1]
    assert "new since the deployed model" in outputs[1] and "(0 new" not in outputs[1]


def test_nothing_is_sorted_yet(shell: Shell) -> None:
    (setup,) = readme_blocks("## Quickstart on your own folders")
    first, after_review = readme_blocks("### Nothing is sorted yet")
    init = next(line for line in first if "--classes" in line)
    classes = init.split("--classes", 1)[1].split()[0].split(",")
    # the archive: project folders of unsorted photos of the README's categories (ikea classes stand in)
    stand_in = dict(zip(classes, ("table", "desk", "cabinet", "chair", "sofa", "bed"), strict=False))
    truth = {}
    archive = shell.home / "Photos" / "archive"
    for i, cls in enumerate(classes):
        files = sorted((IKEA / stand_in[cls]).glob("*.jpg"))[:14]
        for j, project in enumerate(("2024-03 Smith order", "2024-05 cafe")):
            part = files[j::2]
            _copy(part, archive / project, prefix=f"{i}-")
            truth.update({f"{i}-{p.name}": cls for p in part})
    for line in setup + first:
        shell.run(line)
    assert f"categories: {', '.join(classes)}" in shell.outputs[0]
    reviewed = review_every_task(truth)
    assert len(classes) * 5 <= reviewed <= len(classes) * 8  # about 8 per category, typical photos first
    outputs = [shell.run(line) for line in after_review]
    assert "trained candidate v0001" in outputs[1]
    assert "deployed v0001" in outputs[2]
    sorted_tree = shell.home / "Photos" / "sorted"
    assert {p.name for p in sorted_tree.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))} <= set(classes)
    assert len([p for p in sorted_tree.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")]) == len(truth)
