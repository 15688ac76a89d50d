"""Fixtures shared by all tests. Provisioning and broker fixtures are lazy: only tests that ask pay.

- `sgw_env` (session): a home with devices dev-0001..dev-0004 and a running mosquitto on a free port.
  Shared: do not revoke, rotate or remove its devices; use `make_env` for that.
- `make_env` (function): factory `make_env(device_ids, extra_conf="") -> SgwEnv` with its own home and
  broker, stopped after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto, free_port, start_broker
from tests.support.provision import Provisioned, provision

SHARED_DEVICES = ("dev-0001", "dev-0002", "dev-0003", "dev-0004")


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
