"""docker-compose.yml and the worker's Dockerfile, checked without Docker (there is no engine here): services,
shared volumes, environment that sortloop's settings really accept, and a worker command that exists."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loop.config import Settings, load_settings
from sortloop.cli import app

REPO = Path(__file__).resolve().parents[3]
VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?|-|\?)(?P<arg>[^}]*))?\}")
# what a team's `.env` would hold (required variables, `${VAR:?...}`)
DOTENV = {"SORTLOOP_LABELSTUDIO_TOKEN": "0123456789abcdef0123456789abcdef01234567", "LABEL_STUDIO_PASSWORD": "pw"}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR:?error}`; a missing required variable fails."""

    def sub(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise AssertionError(f"compose needs ${name}: {arg}")
        return ""

    return VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v), DOTENV) for k, v in env.items()}


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) with variables resolved."""
    result = {}
    for spec in service.get("volumes") or []:
        parts = interpolate(spec, DOTENV).split(":")
        result[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "rw")
    return result


def test_services_are_label_studio_on_postgres_and_the_worker(compose):
    services = compose["services"]
    assert set(services) == {"db", "app", "nginx", "worker", "ray-head", "ray-worker"}
    # the Ray cluster is opt-in: a plain `docker compose up` starts Label Studio and the worker only
    assert {name for name, svc in services.items() if not svc.get("profiles")} == {"db", "app", "nginx", "worker"}
    assert "postgres" in services["db"]["image"] or "pgautoupgrade" in services["db"]["image"]
    for name in ("app", "nginx"):
        assert services[name]["image"].startswith("heartexlabs/label-studio:")
    app_env = environment(services["app"])
    assert app_env["DJANGO_DB"] == "default"
    assert app_env["POSTGRE_HOST"] in services  # the db service by name
    assert services["app"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["nginx"]["command"] == "nginx" and services["app"]["command"] == "label-studio-uwsgi"


def test_label_studio_and_worker_share_the_token_and_only_the_served_photos(compose):
    import labeling.server

    services = compose["services"]
    app_env, worker_env = environment(services["app"]), environment(services["worker"])
    # one secret: it becomes the admin's legacy token on first start, and the worker authenticates with it
    token = DOTENV["SORTLOOP_LABELSTUDIO_TOKEN"]
    assert worker_env[labeling.server.TOKEN_ENV] == app_env["LABEL_STUDIO_USER_TOKEN"] == token
    assert app_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert app_env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] == "true"
    # Label Studio sees only the served folder (pushed photos), at the worker's path, read-only; never the
    # photo folder or the workspace
    app_mounts, worker_mounts = mounts(services["app"]), mounts(services["worker"])
    served = worker_env["SORTLOOP_LABELSTUDIO__SERVED_DIR"]
    assert app_env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == served
    assert app_mounts[served][0] == worker_mounts[served][0] and app_mounts[served][0] in compose["volumes"]
    assert app_mounts[served][1] == "ro" and worker_mounts[served][1] == "rw"  # only the worker writes
    assert "/photos" not in app_mounts and worker_env["SORTLOOP_WORKSPACE"] not in app_mounts
    # the worker's workspace is a named, declared volume at $SORTLOOP_WORKSPACE
    source = worker_mounts[worker_env["SORTLOOP_WORKSPACE"]][0]
    assert source in compose["volumes"]
    # the worker reaches Label Studio through the nginx service's container port
    url = worker_env["SORTLOOP_LABELSTUDIO__URL"]
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    assert host in services
    assert any(str(p).endswith(f":{port}") for p in services[host]["ports"])


def test_every_named_volume_is_declared(compose):
    declared = set(compose["volumes"])
    for service in compose["services"].values():
        for source, _ in mounts(service).values():
            if not source.startswith((".", "/")):
                assert source in declared, source


def test_worker_environment_is_accepted_by_sortloop_settings(compose, monkeypatch):
    env = environment(compose["services"]["worker"])
    for key in [k for k in os.environ if k.startswith("SORTLOOP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
        if key.startswith("SORTLOOP_") and "__" in key:
            section, field = key.removeprefix("SORTLOOP_").lower().split("__", 1)
            assert section in Settings.model_fields, key
            assert field in type(getattr(Settings(), section)).model_fields, key
    settings = load_settings(None)
    assert settings.labelstudio.url == env["SORTLOOP_LABELSTUDIO__URL"]
    assert [(str(a), str(b)) for a, b in settings.schedule.inboxes] == [("/photos/inbox", "/photos/sorted")]
    assert all(str(src).startswith("/photos") for src, _ in settings.schedule.inboxes)
    assert settings.schedule.timezone == "UTC" and settings.schedule.retrain_cron == "0 2 * * *"


def test_worker_command_is_a_real_sortloop_command_matching_the_dockerfile(compose):
    worker = compose["services"]["worker"]
    command = worker["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[0] == "sortloop"
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert "Run the loop as a service" in result.output

    dockerfile = (REPO / worker["build"] / "Dockerfile").read_text()
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", dockerfile, re.M)
    assert cmd and yaml.safe_load(cmd.group(1)) == command
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert copies
    for source in [s for sources in copies for s in sources]:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert "'.[train,ray]'" in dockerfile  # the worker retrains (train extra); Ray nodes run this image (ray)


def test_ray_head_and_workers_share_the_photos_workspace_and_token_with_the_worker(compose):
    """`docker compose --profile ray up`: a head and N workers the sortloop worker reaches at ray.address,
    each seeing /photos and the workspace at the worker's paths (Ray workers write the sorted copies)."""
    start = pytest.importorskip("ray.scripts.scripts").start
    services = compose["services"]
    worker, head, node = services["worker"], services["ray-head"], services["ray-worker"]
    assert head["profiles"] == node["profiles"] == ["ray"]
    assert head["image"] == node["image"] == worker["image"]  # sortloop + ray, same versions everywhere

    def ray_start(service: dict) -> dict:
        command = service["command"]
        assert command[:2] == ["ray", "start"] and "--block" in command
        return start.make_context("start", list(command[2:])).params  # real `ray start` options

    head_args, node_args = ray_start(head), ray_start(node)
    assert head_args["head"] and not node_args["head"]
    assert head_args["num_cpus"] == 0  # the head schedules; the workers sort
    address = f"ray-head:{head_args['port']}"
    assert node_args["address"] == address
    assert environment(worker)["SORTLOOP_RAY__ADDRESS"] == address
    assert node["depends_on"] == ["ray-head"] and int(interpolate(str(node["deploy"]["replicas"]), {})) >= 2

    worker_mounts, worker_env = mounts(worker), environment(worker)
    for service in (head, node):
        assert mounts(service)["/photos"] == worker_mounts["/photos"]  # same source, same path, writable
        assert mounts(service)[worker_env["SORTLOOP_WORKSPACE"]] == worker_mounts[worker_env["SORTLOOP_WORKSPACE"]]
        env = {k: interpolate(str(v), {**DOTENV, "RAY_AUTH_TOKEN": "t0k"}) for k, v in service["environment"].items()}
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "t0k"
        with pytest.raises(AssertionError, match="RAY_AUTH_TOKEN"):  # no cluster without a token
            interpolate(service["environment"]["RAY_AUTH_TOKEN"], DOTENV)
    assert worker_env["RAY_AUTH_MODE"] == "token"
    assert interpolate(str(worker["environment"]["RAY_AUTH_TOKEN"]), {"RAY_AUTH_TOKEN": "t0k"}) == "t0k"
    assert worker_env["SORTLOOP_SORT__ENGINE"] == "local"  # Ray only when the user opts in
