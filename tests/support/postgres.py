"""A throwaway PostgreSQL server for the tests that run on PostgreSQL.

Uses ``$MUSUBI_TEST_PG_DSN`` when set; otherwise starts a private cluster (initdb + pg_ctl
from the machine's PostgreSQL packages) on 127.0.0.1 with a free port, in a temporary folder,
and stops it afterwards. Tests skip, saying why, only when no PostgreSQL server binaries (or
no psycopg) exist. :func:`fresh_database` gives a test a database of its own, as a URL, which
is what a user passes to ``MusubiCache``, ``instrument``, ``run`` or ``--db``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from urllib.parse import quote


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI runs as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


@dataclass
class PgServer:
    """A running server; ``bindir`` is None for an external one (``$MUSUBI_TEST_PG_DSN``)."""

    dsn: str
    bindir: str | None = None
    data: str | None = None
    folder: str | None = None
    options: str = ""

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        assert self.bindir is not None and self.data is not None, "not a private cluster"
        return subprocess.run(
            _as_postgres([f"{self.bindir}/pg_ctl", "-D", self.data, *args]),
            check=True, capture_output=True, timeout=120,
        )

    def restart(self) -> None:
        """``pg_ctl restart`` (fast shutdown: every client connection is cut)."""
        self.pg_ctl("-o", self.options, "-l", f"{self.folder}/log", "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        if self.bindir is None:
            return
        subprocess.run(
            _as_postgres([f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(str(self.folder), ignore_errors=True)


def server_binaries() -> str | None:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(bins[-1]) if bins else None


def start_server() -> PgServer | None:
    """A new private cluster, or the external server of ``$MUSUBI_TEST_PG_DSN``; None when
    neither is possible."""
    dsn = os.environ.get("MUSUBI_TEST_PG_DSN")
    if dsn:
        return PgServer(dsn)
    bindir = server_binaries()
    if bindir is None:
        return None
    folder = tempfile.mkdtemp(prefix="musubi-pg-")
    data = os.path.join(folder, "data")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]),
        check=True,
        capture_output=True,
    )
    options = (
        f"-k {folder} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
    )
    server = PgServer(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres", bindir, data, folder, options
    )
    server.pg_ctl("-o", options, "-l", f"{folder}/log", "-w", "start")
    return server


def fresh_database(dsn: str) -> str:
    """A new, empty database on the server of ``dsn``, as a ``postgresql://`` URL."""
    import psycopg

    name = f"m{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        info = conn.info
        host, port, user = info.host, info.port, info.user
    return f"postgresql://{quote(user)}@{host}:{port}/{name}"
