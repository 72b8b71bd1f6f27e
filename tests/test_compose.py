"""The team setup in deploy/compose (and its Kubernetes twin in deploy/k8s/services.yaml): the services
exist, credentials come only from ${VARS} of the uncommitted .env, MLflow runs behind basic-auth with
proxied artifacts, and the images match requirements.lock."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "deploy" / "compose"
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "AUTH_STRING", "KEY")
REQUIRED_VAR = re.compile(r"^\$\{(\w+):\?[^}]+\}$")  # ${NAME:?message}: compose stops if unset or empty


def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


def locked(package: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.lower() == package:
            return version
    raise AssertionError(f"{package} is not in requirements.lock")


def options(command: list[str]) -> dict[str, str]:
    """--name=value and --name value pairs of a command line."""
    found, args = {}, list(command)
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            found[name] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return found


def mlflow_command() -> list[str]:
    return compose()["services"]["mlflow"]["command"]


def test_the_team_services_are_all_there():
    services = compose()["services"]
    assert set(services) == {"postgres", "mlflow", "prefect-server", "prefect-setup", "worker"}
    assert services["prefect-setup"]["command"] == ["python", "-m", "flows.zombies"]   # the zombie automation, once
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["command"][:3] == ["prefect", "worker", "start"]
    assert services["worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_every_credential_is_a_required_variable_from_env():
    for name, service in compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in SECRET_WORDS):
                assert REQUIRED_VAR.match(str(value)), f"{name}.{key} must be ${{VAR:?...}}, not {value!r}"


def test_no_password_sits_in_a_uri_or_a_command_line():
    text = (COMPOSE_DIR / "docker-compose.yml").read_text()
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "user:password@ in a URI"
    for service in compose()["services"].values():
        command = " ".join(service.get("command", []))
        assert "PASSWORD" not in command and "password" not in command.lower()


def test_the_env_example_names_every_variable_and_holds_no_secret_value():
    text = (COMPOSE_DIR / ".env.example").read_text()
    assigned = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    # ${NAME} is compose's, from .env; $${NAME} is escaped for the container's shell.
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", yaml.safe_dump(compose())))
    optional = {"MLFLOW_ALLOWED_HOSTS"}
    assert used - optional <= set(assigned), f"missing in .env.example: {used - optional - set(assigned)}"
    for key, value in assigned.items():
        if any(word in key for word in SECRET_WORDS):
            assert value == "", f".env.example gives {key} a value"


def test_env_is_ignored_by_git_and_not_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/compose/.env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env is not in .gitignore"
    tracked = subprocess.run(["git", "ls-files", "deploy/compose/.env"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""


def test_mlflow_runs_behind_basic_auth_with_proxied_artifacts_on_postgresql():
    command = mlflow_command()
    assert command[:2] == ["mlflow", "server"]
    found = options(command)
    assert found["--app-name"] == "basic-auth"
    assert found["--artifacts-destination"] == "/mlartifacts" or found["--artifacts-destination"].startswith("s3://")
    assert found["--backend-store-uri"].startswith("postgresql://")
    environment = compose()["services"]["mlflow"]["environment"]
    assert environment["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in environment


def test_the_auth_config_gives_everyone_read_and_holds_no_secret():
    text = (COMPOSE_DIR / "mlflow-auth.ini").read_text()
    settings = dict(re.findall(r"^(\w+) = (.*)$", text, flags=re.M))
    assert settings["default_permission"] == "READ"
    assert settings["database_uri"].startswith("postgresql://")
    assert "admin_password" not in settings
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text)


def test_images_match_requirements_lock():
    services = compose()["services"]
    prefect = locked("prefect")
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{prefect}-python3.11"
    mlflow = locked("mlflow")
    assert services["mlflow"]["build"]["args"]["MLFLOW_VERSION"] == mlflow
    assert services["mlflow"]["image"].endswith(f":{mlflow}")
    dockerfile = (COMPOSE_DIR / services["mlflow"]["build"]["dockerfile"]).read_text()
    assert f"ARG MLFLOW_VERSION={mlflow}" in dockerfile


@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"])
def test_the_kubernetes_services_match_compose(kind):
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "services.yaml").read_text()))
    workload = next(d for d in documents if d["kind"] == kind)
    container = workload["spec"]["template"]["spec"]["containers"][0]
    service = compose()["services"]["postgres" if kind == "StatefulSet" else "mlflow"]
    assert container["image"] == service["image"]
    for env in container.get("env", []):
        if any(word in env["name"] for word in SECRET_WORDS):
            assert "secretKeyRef" in env.get("valueFrom", {}), f"{kind} {env['name']} must come from a Secret"
    if kind == "Deployment":
        k8s_options, compose_options = options(container["args"]), options(mlflow_command())
        for flag in ("--app-name", "--backend-store-uri", "--artifacts-destination"):
            assert k8s_options[flag] == compose_options[flag]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def basic_auth_server(tmp_path):
    """`mlflow server --app-name basic-auth` with the compose auth config, on SQLite in tmp_path."""
    ini = (COMPOSE_DIR / "mlflow-auth.ini").read_text()
    ini = re.sub(r"^database_uri = .*$", f"database_uri = sqlite:///{tmp_path / 'auth.db'}", ini, flags=re.M)
    (tmp_path / "basic_auth.ini").write_text(ini)
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(16)}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    found = options(mlflow_command())
    server = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, "-m", "mlflow", "server", "--app-name", found["--app-name"],
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "mlartifacts"),
         # One worker: uvicorn's supervisor kills workers slower to start than its health check.
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"),
        start_new_session=True)  # the CLI starts uvicorn as a child: stop the whole session
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420  # a loaded 2-core machine imports slowly
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("MLflow did not come up:\n" + (tmp_path / "server.log").read_text()[-3000:])
        yield uri, env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    finally:
        stop_session(server)


def stop_session(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_only_the_pipeline_user_and_granted_owners_write_to_the_registered_model(basic_auth_server, monkeypatch):
    """The README's trust note against a real server: READ by default, the creator owns the model,
    an EDIT grant lets a release owner add versions and move aliases."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    uri, admin, admin_password = basic_auth_server
    assert requests.get(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).status_code == 401

    def as_user(name: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    passwords = {name: secrets.token_urlsafe(16) for name in ("bertshrink-pipeline", "release-owner")}
    as_user(admin, admin_password)
    auth = get_app_client("basic-auth", tracking_uri=uri)
    for name, password in passwords.items():
        auth.create_user(username=name, password=password)

    client, model, source = MlflowClient(tracking_uri=uri), "bertshrink-classifier", "s3://bertshrink-test/model"
    as_user("bertshrink-pipeline", passwords["bertshrink-pipeline"])
    client.create_registered_model(model)
    client.create_model_version(model, source)

    as_user("release-owner", passwords["release-owner"])
    assert client.get_registered_model(model).name == model          # READ by default
    for write in (lambda: client.create_model_version(model, source),
                  lambda: client.set_registered_model_alias(model, "champion", "1")):
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            write()

    as_user(admin, admin_password)
    auth.grant_user_permission(username="release-owner", resource_type="registered_model",
                               resource_id=model, permission="EDIT")
    as_user("release-owner", passwords["release-owner"])
    assert client.create_model_version(model, source).version == "2"
    client.set_registered_model_alias(model, "champion", "2")
    assert client.get_model_version_by_alias(model, "champion").version == "2"
