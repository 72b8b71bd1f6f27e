"""The team setup in deploy/compose (and its Kubernetes twin in deploy/k8s/services.yaml): the services
exist, credentials come only from ${VARS} of the uncommitted .env, MLflow runs behind basic-auth with
proxied artifacts, and the images match requirements.lock."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
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
    assert set(services) == {"postgres", "mlflow", "prefect-server", "worker"}
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
