"""A real PostgreSQL for tests and benchmarks: Debian's server binaries, a fresh cluster in a temporary
directory, on a free loopback port, stopped and removed afterwards. Nothing is started by hand.

PostgreSQL refuses to run as root; as root, the cluster runs as the ``postgres`` user the Debian package
creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from scaleset.testing.server import free_port

__all__ = ["PostgresServer", "binaries"]


def binaries() -> Path:
    """The directory with initdb and pg_ctl (Debian keeps them out of PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not candidates:
        raise RuntimeError(
            "PostgreSQL's server is not installed: `apt-get install postgresql` (scripts/test.sh does it)."
        )
    return Path(candidates[0]).parent


class PostgresServer:
    """``with PostgresServer() as pg: pg.url("db")``: a throwaway cluster; ``create_database`` makes a
    fresh database per test."""

    def __init__(self) -> None:
        self.port = free_port()
        self._bin = binaries()
        self._dir = Path(tempfile.mkdtemp(prefix="scaleset-pg-"))
        self._as_root = os.geteuid() == 0
        self._databases = 0

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def __enter__(self) -> PostgresServer:
        data = self._dir / "data"
        if self._as_root:
            shutil.chown(self._dir, "postgres")
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self._dir} -c fsync=on "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self._dir / "log"), "-w", "start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._run("pg_ctl", "-D", str(self._dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"scaleset_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
