"""A real PostgreSQL 15 server for the tests (Debian's ``postgresql-15``), started by the tests and stopped.

One server per test session (:func:`tests.conftest.postgres_server`) on 127.0.0.1 and a free port, its data in a
fresh folder under /tmp, ``fsync`` off (the tests never survive a power loss); each test gets a database of its
own (:meth:`PostgresServer.create_database`), owned by the role ``node`` which logs in over TCP with a password
(SCRAM), as a node would; the tests' own administration goes over the server's Unix socket. PostgreSQL refuses to
run as root: as root the server runs as the user ``postgres`` (``runuser -u postgres --``).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
RUN_AS = "postgres"
#: The role the journals log in as, and its password.
ROLE, PASSWORD = "node", "s3cret-for-tests"


def unavailable() -> str | None:
    """Why no server can be started here (None: it can)."""
    for tool in ("initdb", "postgres"):
        if not (PG_BIN / tool).is_file():
            return f"PostgreSQL 15 not installed ({PG_BIN / tool} missing; apt-get install postgresql-15)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 not installed (pip install 'psycopg[binary]', the scale extra)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and there is no user {RUN_AS!r} to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One running server; :meth:`stop` ends it and deletes its data."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.log = self.root / "postgres.log"
        self._names = itertools.count(1)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                   "--auth-host=scram-sha-256", "-E", "UTF8",
                   "--locale=C", "--no-sync"], check=True)
        options = ["-c", "listen_addresses=127.0.0.1", "-p", str(self.port), "-k", str(self.root),
                   "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                   "-c", "max_connections=300", "-c", "logging_collector=off"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self._wrap([str(PG_BIN / "postgres"), "-D", str(self.data), *options]),
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as db:
            db.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")

    def _wrap(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", RUN_AS, "--", *argv] if self._as_root else argv

    def _run(self, argv: list[str], *, check: bool) -> None:
        done = subprocess.run(self._wrap(argv), capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    @property
    def admin_dsn(self) -> str:
        """The superuser, over the Unix socket (trust)."""
        return f"host={self.root} port={self.port} user=postgres dbname=postgres"

    def dsn(self, database: str) -> str:
        """A journal's conninfo (TCP, the role ``node``; its password is :data:`PASSWORD`)."""
        return f"host=127.0.0.1 port={self.port} user={ROLE} dbname={database}"

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                psycopg.connect(self.admin_dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres did not accept connections within {timeout_s:.0f} s") from None
                time.sleep(0.1)

    def create_database(self) -> str:
        """A new empty database; returns its conninfo."""
        import psycopg

        name = f"journal_{next(self._names)}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.dsn(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            # fast shutdown (ends the sessions, then the server), to the group runuser and postgres run in
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
