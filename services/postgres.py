"""A PostgreSQL cluster of Debian's ``postgresql`` package in a folder of its own: ``initdb`` once,
then ``pg_ctl`` start and stop.

It listens on 127.0.0.1 (a port of the caller's choice) and on a unix socket in its run folder.
Its one role has a password kept in a 0600 ``pgpass`` file, which clients read through
``PGPASSFILE``: no URL, command line or log carries the password. PostgreSQL refuses to run as
root, so as root (CI) the server runs as the ``postgres`` system user the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = ("install Debian's postgresql package (`apt-get update && apt-get install -y postgresql`; "
                ".ci/run does this when it is absent)")
SERVER_OS_USER = "postgres"
# Throwaway clusters (tests) trade crash safety for speed: nothing in them must survive a power cut.
FAST_SETTINGS = ("fsync = off", "synchronous_commit = off", "full_page_writes = off")


class ServiceError(RuntimeError):
    """A local service could not be set up, started or stopped; the message names the fix."""


def bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding ``pg_ctl``."""
    found = [Path(p) for p in glob.glob(BIN_GLOB) if (Path(p) / "pg_ctl").is_file()]
    if not found:
        raise ServiceError(f"PostgreSQL's programs (initdb, pg_ctl) are not in {BIN_GLOB}: {INSTALL_HINT}.")
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def server_os_user() -> str | None:
    """Who runs the server: this user (None), or ``postgres`` when this is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise ServiceError(f"running as root, which PostgreSQL refuses, and there is no `{SERVER_OS_USER}` "
                           f"user to run it as: {INSTALL_HINT}, or run as a normal user.") from None
    return SERVER_OS_USER


def read_pgpass_password(pgpass: Path) -> str | None:
    """The password of the one line ``*:*:*:<role>:<password>`` we write, or None."""
    if not pgpass.is_file():
        return None
    line = pgpass.read_text().strip()
    return line.split(":", 4)[4] if line.count(":") >= 4 else None


@dataclass(frozen=True)
class Postgres:
    """One cluster: data in ``home/pg``, socket and log in ``home/pg-run``, password in ``home/pgpass``."""

    home: Path
    port: int
    role: str = "bertshrink"
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.home / "pg"

    @property
    def run_dir(self) -> Path:
        return self.home / "pg-run"

    @property
    def pgpass(self) -> Path:
        return self.home / "pgpass"

    @property
    def log(self) -> Path:
        return self.run_dir / "postgres.log"

    def url(self, database: str) -> str:
        """SQLAlchemy URL without the password (libpq reads it from ``PGPASSFILE``)."""
        return f"postgresql+psycopg2://{self.role}@{self.host}:{self.port}/{database}"

    def client_env(self) -> dict[str, str]:
        """What a client process (the MLflow server, psql) needs in its environment to log in."""
        return {"PGPASSFILE": str(self.pgpass)}

    # ------------------------------------------------------------------ setup
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self, password: str, fast: bool = False) -> None:
        """``initdb`` a new cluster whose role ``self.role`` logs in with ``password`` (scram-sha-256)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o711)  # the server's OS user must reach its folders; pgpass stays 0600
        self._check_reachable_by_server_user()
        for folder in (self.data, self.run_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
            self._hand_to_server_user(folder)
        pwfile = self.run_dir / "initdb-password"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        self._hand_to_server_user(pwfile)
        try:
            self._run([str(bin_dir() / "initdb"), "-D", str(self.data), "-U", self.role, "--auth=scram-sha-256",
                       f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale", *(["--no-sync"] if fast else [])],
                      as_server=True, what="initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        settings = [f"listen_addresses = '{self.host}'", f"unix_socket_directories = '{self.run_dir}'",
                    *(FAST_SETTINGS if fast else ())]
        conf = self.data / "postgresql.conf"
        self._run(["sh", "-c", f"cat >> '{conf}'"], as_server=True, what="postgresql.conf",
                  stdin="\n".join(["", "# bertshrink services", *settings, ""]))
        self.write_pgpass(password)

    def write_pgpass(self, password: str) -> None:
        """The 0600 file libpq reads the password from (any host, port and database, our role only)."""
        self.pgpass.touch(mode=0o600, exist_ok=True)
        self.pgpass.chmod(0o600)
        self.pgpass.write_text(f"*:*:*:{self.role}:{password}\n")

    # ------------------------------------------------------------------ run
    def running(self) -> bool:
        if not self.initialized():
            return False
        return self._run([str(bin_dir() / "pg_ctl"), "-D", str(self.data), "status"],
                         as_server=True, check=False).returncode == 0

    def start(self, timeout_s: int = 120) -> None:
        """Start the server and wait until it takes connections."""
        self._run([str(bin_dir() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", f"-p {int(self.port)}",
                   "-w", "-t", str(timeout_s), "start"], as_server=True, what="pg_ctl start")

    def stop(self, timeout_s: int = 60) -> None:
        """Stop at once: open sessions are ended, committed work is kept."""
        if self.running():
            self._run([str(bin_dir() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", str(timeout_s),
                       "stop"], as_server=True, what="pg_ctl stop")

    def create_database(self, name: str) -> None:
        """Create ``name`` unless it exists."""
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if exists.strip() != "1":
            self._run([str(bin_dir() / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.role, name],
                      what="createdb")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one statement as our role over TCP; returns its unaligned output."""
        return self._run([str(bin_dir() / "psql"), "-h", self.host, "-p", str(self.port), "-U", self.role,
                          "-d", database, "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql], what="psql").stdout

    # ------------------------------------------------------------------ plumbing
    def _hand_to_server_user(self, path: Path) -> None:
        user = server_os_user()
        if user:
            shutil.chown(path, user, user)

    def _check_reachable_by_server_user(self) -> None:
        user = server_os_user()
        if user and self._run(["test", "-x", str(self.home)], as_server=True, check=False).returncode != 0:
            raise ServiceError(f"the `{user}` user, which runs PostgreSQL for root, cannot reach {self.home} "
                               "(a parent folder is private): set BERTSHRINK_SERVICES_DIR to a folder it can "
                               "reach, e.g. /var/tmp/bertshrink-services.")

    def _run(self, args: list[str], as_server: bool = False, check: bool = True, what: str = "",
             stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run a PostgreSQL program (as the server's OS user where ``as_server``); a failure raises
        ``ServiceError`` with its output and the server log's tail."""
        user = server_os_user() if as_server else None
        command = ["runuser", "-u", user, "--", *args] if user else args
        env = {**os.environ, **self.client_env(), "PGCONNECT_TIMEOUT": "10"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, input=stdin, cwd="/")
        if check and done.returncode != 0:
            raise ServiceError(f"{what or args[0]} failed (exit {done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()}{self._log_tail()}")
        return done

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- {self.log} (last lines) ---\n" + "\n".join(tail) if tail else ""
