"""A real, private PostgreSQL cluster for tests (Debian's postgresql; the shared state of #19).

    with running_postgres() as pg:
        conn = pg.connect()          # psycopg, autocommit
        ... pg.dsn ...               # for a sidusd config (state.dsn)
        pg.stop(); pg.start()        # an outage and its end, same data

``initdb`` and ``postgres`` run as the unprivileged user ``nobody`` (PostgreSQL refuses root)
in a directory of their own under /tmp, listening on a unix socket in that directory only (no
TCP: ``listen_addresses=''``), trust authentication for the superuser ``sidus``.  The server is
our child: it is stopped by its PID (SIGINT: fast shutdown), never by name.  Reusable by any
test that needs a database (h19ctl, h19kea).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "nobody"


def require_postgres() -> Path:
    """The PostgreSQL binaries' directory, or skip naming the tool (Debian package postgresql)."""
    for tool in ("initdb", "postgres"):
        if not os.access(PG_BIN / tool, os.X_OK):
            pytest.skip(f"missing tool: {PG_BIN / tool} (Debian package postgresql, installed by scripts/setup)")
    if os.geteuid() != 0:
        pytest.skip("missing privilege: root (the cluster runs as the user nobody)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("missing tool: psycopg (pip install 'sidusd[postgresql]', in the test extras)")
    return PG_BIN


def _free_port() -> int:
    with socket.socket() as s:          # the number names the unix socket file (.s.PGSQL.<port>)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user() -> list[str]:
    return ["setpriv", f"--reuid={USER}", "--regid=nogroup", "--clear-groups", "--"]


class PgCluster:
    """One private cluster: ``start()``, ``stop()``, ``dsn``, ``connect()``, ``remove()``."""

    def __init__(self) -> None:
        self.bin = require_postgres()
        self.dir = Path(tempfile.mkdtemp(prefix="sidus-pg-"))
        self.data = self.dir / "data"
        self.sock = self.dir / "sock"
        self.log = self.dir / "postgres.log"
        self.port = _free_port()
        pw = pwd.getpwnam(USER)
        self.sock.mkdir()
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chown(self.sock, pw.pw_uid, pw.pw_gid)
        self.proc: subprocess.Popen | None = None
        subprocess.run([*_as_user(), str(self.bin / "initdb"), "-D", str(self.data), "-U", "sidus",
                        "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
                       check=True, capture_output=True, timeout=120, cwd=self.dir)

    @property
    def dsn(self) -> str:
        return f"host={self.sock} port={self.port} user=sidus dbname=postgres"

    def start(self, timeout_s: float = 60) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*_as_user(), str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.sock),
             "-p", str(self.port), "-c", "listen_addresses=", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "max_connections=50"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                self.connect().close()
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"postgres not ready after {timeout_s}s:\n{self.log.read_text()[-2000:]}")

    def stop(self, timeout_s: float = 30) -> None:
        """Fast shutdown by PID (SIGINT), SIGKILL if it does not end."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def connect(self):
        import psycopg
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def running_postgres() -> Iterator[PgCluster]:
    """A started private cluster, stopped by PID and removed on exit."""
    pg = PgCluster()
    try:
        pg.start()
        yield pg
    finally:
        pg.remove()
