"""Fixtures shared by all tests. Provisioning and broker fixtures are lazy: only tests that ask pay.

- `sgw_env` (session): a home with devices dev-0001..dev-0004 and a running mosquitto on a free port.
  Shared: do not revoke, rotate or remove its devices; use `make_env` for that.
- `make_env` (function): factory `make_env(device_ids, extra_conf="") -> SgwEnv` with its own home and
  broker, stopped after the test.
- `pg_cluster` (session): a throwaway PostgreSQL server; `pg_url` (function): a fresh migrated database on
  it; `store_at` (function, parametrised sqlite/postgresql): an empty registry store of each kind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.common import ports
from tests.support.mosquitto import Mosquitto, free_port, start_broker
from tests.support.postgres import PgCluster, start_cluster
from tests.support.postgres import missing_reason as pg_missing_reason
from tests.support.provision import Provisioned, provision

SHARED_DEVICES = ("dev-0001", "dev-0002", "dev-0003", "dev-0004")

# Two test workers (pytest-xdist) side by side must never draw the same loopback port: each gets its own
# slice of the non-ephemeral range (gateway/common/ports.py); child processes (the demo) inherit it.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and _WORKER[2:].isdigit():
    _COUNT = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    os.environ.setdefault(ports.SLICE_ENV, f"{int(_WORKER[2:])}/{_COUNT}")

# The system tools scripts/bootstrap.sh installs. A test file marks what it needs with a skipif (the
# `needs_*` markers) naming the tool in its reason: on a developer's machine a missing tool is a skip, but
# with CI set in the environment it is a broken install, so such a skip is reported as a failure.
REQUIRED_TOOLS = ("mosquitto", "openssl", "promtool", "systemd-analyze", "prometheus", "postgresql")
_TOOL_NAMED = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, REQUIRED_TOOLS)) + r")(?![\w-])")


def missing_tool_in_ci(reason: str) -> list[str]:
    """The required tools a skip reason names, when CI is set; empty when the skip may stand."""
    if not os.environ.get("CI"):
        return []
    return sorted(set(_TOOL_NAMED.findall(reason)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    tools = missing_tool_in_ci(reason)
    if tools:
        report.outcome = "failed"
        report.longrepr = (f"CI is set, so this skip is a failure: {reason!r}. {', '.join(tools)} must be "
                           "installed (scripts/bootstrap.sh); a missing tool in CI is a broken install.")


@dataclass(frozen=True)
class SgwEnv:
    prov: Provisioned
    broker: Mosquitto

    @property
    def home(self) -> Path:
        return self.prov.home

    @property
    def port(self) -> int:
        return self.broker.port


@pytest.fixture(scope="session")
def sgw_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SgwEnv]:
    root = tmp_path_factory.mktemp("sgw-shared")
    port = free_port()
    prov = provision(root / "home", list(SHARED_DEVICES), broker_port=port)
    broker = start_broker(prov.home, root / "broker", port=port)
    try:
        yield SgwEnv(prov, broker)
    finally:
        broker.stop()


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., SgwEnv]]:
    brokers: list[Mosquitto] = []

    def factory(device_ids: Sequence[str] = ("dev-a", "dev-b"), extra_conf: str = "") -> SgwEnv:
        n = len(brokers)
        port = free_port()
        prov = provision(tmp_path / f"home{n}", list(device_ids), broker_port=port)
        broker = start_broker(prov.home, tmp_path / f"broker{n}", port=port, extra_conf=extra_conf)
        brokers.append(broker)
        return SgwEnv(prov, broker)

    try:
        yield factory
    finally:
        for broker in brokers:
            broker.stop()


# -- PostgreSQL (tests/support/postgres.py) -------------------------------------------------------------

PG_MISSING = pg_missing_reason()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    if PG_MISSING is not None:
        pytest.skip(PG_MISSING)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh database on the session's cluster with sgw's schema migrated in."""
    from gateway.store.postgres import migrate

    url = pg_cluster.new_database()
    migrate(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """An empty registry store of each kind (the same store tests run against both): a SQLite path made
    as `sgw ca init` makes it, or a migrated PostgreSQL URL. Pass it to Registry.open / ResultStore."""
    if request.param == "sqlite":
        from gateway.registry.store import Registry

        path = tmp_path / "registry.db"
        Registry.open(path, create=True).close()
        return path
    return str(request.getfixturevalue("pg_url"))
