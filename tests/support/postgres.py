"""A throwaway PostgreSQL server for tests: its own cluster under a temp folder, on a free loopback port.

- `missing_reason()` says why no cluster can be started here (None when one can). Its text names
  `postgresql`, so with CI set a skip for it is a failure (tests/conftest.py): scripts/bootstrap.sh
  installs Debian's `postgresql` for the test profile.
- `start_cluster()` runs initdb and `pg_ctl start` and returns a `PgCluster`; `new_database()` creates an
  empty database and returns its URL, `stop()` stops the server and deletes the folder.

initdb refuses to run as root, and the tests run as root here: the cluster then belongs to the `postgres`
user (created by the Debian package) and its commands run through `runuser`. Its folder is made with
tempfile under /tmp, not under pytest's 0700 temp root, which that user cannot enter. Only TCP on
127.0.0.1 with trust authentication: the server lives as long as the test session and holds nothing.
fsync is off because the cluster is thrown away, not because sgw needs it off (`durable=True`, for the
benchmark, leaves it on).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.mosquitto import free_port


def _pg_bin() -> Path:
    """SGW_TEST_PG_BIN, else the newest Debian/Ubuntu server (/usr/lib/postgresql/<major>/bin: 15 on
    Debian 12, 16 on Ubuntu 24.04)."""
    if os.environ.get("SGW_TEST_PG_BIN"):
        return Path(os.environ["SGW_TEST_PG_BIN"])
    found = sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
HOST = "127.0.0.1"
SUPERUSER = "sgw"
START_TIMEOUT_S = 60


def missing_reason() -> str | None:
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).is_file():
            return f"postgresql not installed ({PG_BIN / tool} missing; apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "postgresql: running as root and there is no postgres user to own the test cluster"
        if shutil.which("runuser") is None:
            return "postgresql: running as root and runuser (util-linux) is missing"
    return None


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgCluster:
    root: Path
    port: int
    _names: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def pid(self) -> int:
        """The postmaster's pid (the server's backends are its children)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{dbname}"

    def new_database(self) -> str:
        """An empty database (no sgw schema yet: run `sgw store migrate` or `migrate()` on it)."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "server.log").read_text(errors="replace")
        return ""

    def stop(self) -> None:
        subprocess.run(_as_owner([str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"]),
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(*, durable: bool = False) -> PgCluster:
    """A running throwaway server. `durable` keeps PostgreSQL's own defaults (fsync, synchronous commit,
    full page writes), as a production server runs: the benchmark measures what the store costs there;
    tests turn them off because the cluster is thrown away."""
    reason = missing_reason()
    if reason is not None:
        raise RuntimeError(reason)
    root = Path(tempfile.mkdtemp(prefix="sgw-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    try:
        subprocess.run(_as_owner([str(PG_BIN / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER,
                                  "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]),
                       capture_output=True, text=True, timeout=120, check=True)
        last = ""
        for _attempt in range(3):  # the free port can be taken between choosing and binding it
            port = free_port(HOST)
            opts = (f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories='' "
                    "-c max_connections=200")
            if not durable:
                opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            res = subprocess.run(
                _as_owner([str(PG_BIN / "pg_ctl"), "start", "-D", str(root / "data"), "-w",
                           "-t", str(START_TIMEOUT_S), "-l", str(root / "server.log"), "-o", opts]),
                capture_output=True, text=True, timeout=START_TIMEOUT_S + 30, check=False,
            )
            if res.returncode == 0:
                return PgCluster(root, port)
            last = res.stdout + res.stderr + (root / "server.log").read_text(errors="replace")
        raise RuntimeError(f"pg_ctl start failed three times: {last[-2000:]}")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
