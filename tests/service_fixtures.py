"""Session fixtures for a real PostgreSQL and a real MLflow tracking server on it (issue 16).

Imported by ``conftest.py``, so any test can ask for them; they start once per test session, on
free ports in a temporary folder, with the same code as ``make services`` (``services/``), and
stop at the session's end, also when tests fail:

- ``postgres``: a ``services.postgres.Postgres`` (``.url(db)``, ``.client_env()``, ``.stop()``,
  ``.start()``, ``.create_database(name)``, ``.psql(sql)``);
- ``mlflow_server``: a ``services.mlflow_server.MlflowServer`` on the ``mlflow`` database, with
  proxied artifacts in the temporary folder (``.uri``);
- ``mlflow_tracking_uri``: its URI, for a process's ``MLFLOW_TRACKING_URI``.

Tests that share them (say, Prefect process workers running recipe flow runs) use their own
experiment and registered-model names. A test that restarts PostgreSQL must leave it running.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from services.mlflow_server import MlflowServer
from services.postgres import Postgres, ServiceError
from services.prefect_pool import free_port  # noqa: F401  (tests import it from here)


@pytest.fixture(scope="session")
def services_home() -> Iterator[Path]:
    """A temporary folder under /tmp, not pytest's private tree: as root, PostgreSQL runs as the
    ``postgres`` user, which must reach its data folder."""
    home = Path(tempfile.mkdtemp(prefix="bertshrink-services-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(services_home) -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster, running for the whole session (fsync off: nothing to keep)."""
    pg = Postgres(services_home, free_port())
    try:
        try:
            pg.init(secrets.token_urlsafe(16), fast=True)
            pg.start()
        except ServiceError as err:
            pytest.fail(f"cannot start PostgreSQL for the tests: {err}", pytrace=False)
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres, services_home) -> Iterator[MlflowServer]:
    """``mlflow server`` on the ``postgres`` fixture, artifacts proxied to a temporary folder."""
    postgres.create_database("mlflow")
    server = MlflowServer(services_home / "mlflow", free_port())
    try:
        # Creating MLflow's tables takes ~30 s on an idle machine; niced beside a busy one, many minutes.
        server.start(postgres.url("mlflow"), str(services_home / "artifacts"), {**os.environ, **postgres.client_env()},
                     timeout_s=900)
    except ServiceError as err:
        pytest.fail(f"cannot start the MLflow tracking server for the tests: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_tracking_uri(mlflow_server) -> str:
    """``http://127.0.0.1:<port>`` of the session's tracking server."""
    return mlflow_server.uri
