"""A throwaway PostgreSQL server for tests and benchmarks: ``initdb`` into a temporary directory, ``pg_ctl``
on 127.0.0.1 with a free port, stopped and removed afterwards.

The server binaries come from ``$TANDEM_PG_BIN`` or ``/usr/lib/postgresql/*/bin`` (newest first). ``initdb``
refuses to run as root, so under root (CI) the cluster belongs to the ``postgres`` user (``runuser -u postgres``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_VERSION_DIRS = "/usr/lib/postgresql/*/bin"


def free_port() -> int:
    """A port nobody listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_pg_bin() -> Path | None:
    """A directory holding ``initdb`` and ``pg_ctl``, newest version first."""
    candidates = [os.environ.get("TANDEM_PG_BIN", "")] + sorted(glob.glob(PG_VERSION_DIRS), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _tmp_root(other_user: bool) -> str:
    """Where to make the cluster's directory: the usual temporary directory, unless another user (postgres)
    could not reach it (a root-only ``$TMPDIR``), then ``/tmp``."""
    tmp = tempfile.gettempdir()
    if other_user and any(not os.stat(p).st_mode & 0o001 for p in [tmp, *map(str, Path(tmp).parents)]):
        return "/tmp"
    return tmp


class PostgresCluster:
    """A PostgreSQL server in a temporary directory on 127.0.0.1, owned by the user that may run it."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = 0
        self._prefix: list[str] = []
        as_root = os.geteuid() == 0
        if as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, initdb needs a 'postgres' user to run as; none exists") from None
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root, starting PostgreSQL needs runuser (util-linux)")
            self._prefix = ["runuser", "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="tandem-pg-", dir=_tmp_root(as_root)))
        self.data = self.root / "data"
        if as_root:
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._prefix, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")

    def start(self) -> PostgresCluster:
        """initdb, then pg_ctl start on a free port (a few tries if another process takes the port)."""
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "tandem", "-E", "UTF8", "--no-sync"
        )
        for attempt in range(5):
            self.port = free_port()
            opts = f"-k {self.root} -h 127.0.0.1 -p {self.port} -c max_connections=300"
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts,
                          "-w", "-t", "60", "start")  # fmt: skip
                return self
            except RuntimeError:
                if attempt == 4:
                    log = (self.root / "log").read_text()[-2000:] if (self.root / "log").exists() else ""
                    raise RuntimeError(f"PostgreSQL did not start: {log}") from None
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq DSN of ``dbname`` as the superuser ``tandem``."""
        return f"host=127.0.0.1 port={self.port} user=tandem dbname={dbname}"

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever still uses it."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        """pg_ctl stop -m fast, then remove the directory."""
        if self.port and (self.data / "postmaster.pid").exists():
            subprocess.run([*self._prefix, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                            "stop"], capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def throwaway_postgres() -> Iterator[PostgresCluster]:
    """A started cluster, stopped and removed on exit; RuntimeError where none can run here."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError(f"PostgreSQL server binaries not found ($TANDEM_PG_BIN or {PG_VERSION_DIRS})")
    cluster = PostgresCluster(bin_dir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
