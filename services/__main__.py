"""``python -m services start|stop|status`` (``make services`` / ``make services-stop``): PostgreSQL
and an MLflow tracking server on it, on this machine, for a team that shares one machine.

State lives in ``BERTSHRINK_SERVICES_DIR`` (default ``.services/``, git-ignored): the cluster,
the server's log, pid and (by default) its artifacts. Settings come from the environment:

- ``BERTSHRINK_PG_PORT`` (5433): PostgreSQL on 127.0.0.1, databases ``mlflow`` and ``optuna``;
- ``BERTSHRINK_MLFLOW_HOST`` (127.0.0.1) and ``BERTSHRINK_MLFLOW_PORT`` (5000): the server;
- ``BERTSHRINK_ARTIFACTS`` (``<services dir>/artifacts``): ``--artifacts-destination``, a folder or
  ``s3://bucket/prefix`` (the server then needs ``boto3`` and AWS credentials in its environment);
- ``PGPASSWORD``: the database password on first start; without it one is generated. Either way it
  is kept only in ``<services dir>/pgpass`` (mode 0600) and never printed.

Running ``start`` again finds what runs and says so; ``stop`` stops both, keeping the data.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from services.mlflow_server import MlflowServer
from services.postgres import Postgres, ServiceError, read_pgpass_password

DATABASES = ("mlflow", "optuna")  # the tracking store; the search's study storage


def services_dir() -> Path:
    return Path(os.environ.get("BERTSHRINK_SERVICES_DIR", ".services")).resolve()


def postgres() -> Postgres:
    return Postgres(services_dir(), int(os.environ.get("BERTSHRINK_PG_PORT", "5433")))


def mlflow_server() -> MlflowServer:
    return MlflowServer(services_dir() / "mlflow", int(os.environ.get("BERTSHRINK_MLFLOW_PORT", "5000")),
                        os.environ.get("BERTSHRINK_MLFLOW_HOST", "127.0.0.1"))


def artifacts_destination() -> str:
    return os.environ.get("BERTSHRINK_ARTIFACTS") or str(services_dir() / "artifacts")


def start_postgres(pg: Postgres) -> None:
    if not pg.initialized():
        password = os.environ.get("PGPASSWORD") or read_pgpass_password(pg.pgpass) or secrets.token_urlsafe(24)
        pg.init(password)
        print(f"PostgreSQL: new cluster in {pg.data} (password in {pg.pgpass}, mode 0600)")
    if pg.running():
        print(f"PostgreSQL: already running on {pg.host}:{pg.port}")
    else:
        pg.start()
        print(f"PostgreSQL: started on {pg.host}:{pg.port} (log {pg.log})")
    for database in DATABASES:
        pg.create_database(database)


def start_mlflow(pg: Postgres, server: MlflowServer) -> None:
    if server.healthy():
        print(f"MLflow: already running at {server.uri}")
        return
    print(f"MLflow: starting at {server.uri} (first start creates its tables: up to a minute) ...", flush=True)
    server.start(pg.url("mlflow"), artifacts_destination(), {**os.environ, **pg.client_env()})
    print(f"MLflow: started (log {server.log}; artifacts in {artifacts_destination()})")


def start() -> None:
    pg, server = postgres(), mlflow_server()
    start_postgres(pg)
    start_mlflow(pg, server)
    print("\nPoint runs, workers and the UI at it (this shell, or every worker's):\n"
          f"  export MLFLOW_TRACKING_URI={server.uri}\n"
          f"PostgreSQL for the search's study: {pg.url('optuna')} with PGPASSFILE={pg.pgpass}")


def stop() -> None:
    pg, server = postgres(), mlflow_server()
    print("MLflow: stopped" if server.stop() else "MLflow: was not running (from this folder)")
    if pg.running():
        pg.stop()
        print("PostgreSQL: stopped (data kept in " f"{pg.data})")
    else:
        print("PostgreSQL: was not running")


def status() -> int:
    pg, server = postgres(), mlflow_server()
    up = pg.running(), server.healthy()
    print(f"PostgreSQL {pg.host}:{pg.port}: {'running' if up[0] else 'stopped'}")
    print(f"MLflow {server.uri}: {'running' if up[1] else 'stopped'}")
    return 0 if all(up) else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    action = parser.parse_args(argv).action
    try:
        if action == "status":
            return status()
        start() if action == "start" else stop()
    except ServiceError as err:
        print(f"services: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
