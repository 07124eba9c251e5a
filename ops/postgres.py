"""A throwaway PostgreSQL server for a shared origin catalog on one machine: the tests' and the
publish benchmark's (`kvcdn loadtest publish`). It runs Debian's own binaries (package postgresql)
in a folder of its own, listening on 127.0.0.1 on a free port, and is stopped and deleted with it.

PostgreSQL refuses to run as root: under root the server runs as the `postgres` user the Debian
package creates (the folder is handed to it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from kvcdn.errors import Unavailable

__all__ = ["LocalPostgres", "postgres_binaries"]

_DEBIAN = Path("/usr/lib/postgresql")


def postgres_binaries() -> Path | None:
    """The folder holding `initdb`, `pg_ctl` and `postgres`, or None when PostgreSQL is not installed."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    versions = sorted(_DEBIAN.glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name), reverse=True)
    return versions[0].parent if versions and versions[0].parent.name == "bin" else None


class LocalPostgres:
    """A PostgreSQL server in a temporary folder; `url()` names a database on it."""

    def __init__(self) -> None:
        self.bin = postgres_binaries()
        if self.bin is None:
            raise Unavailable("PostgreSQL is not installed: `apt install postgresql` (Debian's package)")
        self._tmp = tempfile.TemporaryDirectory(prefix="kvcdn-pg-")
        self.data = Path(self._tmp.name) / "data"
        self.port = 0
        self._user: list[str] = []
        if os.geteuid() == 0:
            self._user = ["runuser", "-u", "postgres", "--"]
            try:
                shutil.chown(self._tmp.name, "postgres")
            except LookupError:
                self._tmp.cleanup()
                raise Unavailable(
                    "running as root, PostgreSQL needs the `postgres` user its Debian package makes"
                ) from None

    def _run(self, *cmd: str) -> str:
        done = subprocess.run([*self._user, *cmd], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            raise Unavailable(f"{Path(cmd[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
        return done.stdout

    def start(self) -> LocalPostgres:
        assert self.bin is not None
        try:
            self._start(self.bin)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, binaries: Path) -> None:
        from kvcdn.ops.launcher import free_ports

        self._run(str(binaries / "initdb"), "-D", str(self.data), "-U", "kvcdn", "--auth=trust", "-E", "UTF8")
        self.port = free_ports("127.0.0.1", 1)[0]
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self._tmp.name} -c fsync=off"
        log = str(Path(self._tmp.name) / "server.log")
        self._run(str(binaries / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://kvcdn@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.port and self.bin is not None:
            with contextlib.suppress(Unavailable):  # it never started, or stopped already
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.port = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self._tmp.cleanup()
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
