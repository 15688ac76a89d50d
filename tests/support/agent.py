"""Shared pieces of the agent tests (no tests here): agent.toml variants, the agent as a real process,
and a collector that opens what arrives with the gateway's identity, e2e key and the core Opener.

Every wait is bounded by a deadline and every process is stopped by the fixture or `finally` that
started it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.agent import ledger
from gateway.common import tomledit
from gateway.core import keys
from gateway.core.session import Opened, Opener
from gateway.pb import messages_pb2 as pb
from gateway.registry.store import Registry
from tests.support.mosquitto import _client
from tests.support.provision import Provisioned

ROOT = Path(__file__).resolve().parent.parent.parent


# -- agent.toml --------------------------------------------------------------------------------------
def dump_toml(doc: Mapping[str, Mapping[str, Any]]) -> str:
    return tomledit.dumps(doc)


def agent_toml(prov: Provisioned, device_id: str, work: Path, name: str = "agent-test.toml",
               bundle: Path | None = None, **sections: Mapping[str, Any]) -> Path:
    """A copy of the device's agent.toml beside it (so key paths still resolve) with sections overridden.

    The outbox defaults to `work/<device>.db` so tests never share one. `bundle` is a copy of the
    bundle installed elsewhere (as on the device), instead of the one in the provisioning home.
    """
    bundle = bundle or prov.bundle(device_id)
    doc: dict[str, dict[str, Any]] = tomllib.loads((bundle / "agent.toml").read_text())
    doc["outbox"]["path"] = str(work / f"{device_id}-outbox.db")
    doc["log"]["format"] = "json"
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path = bundle / f"{work.name}-{name}"
    path.write_text(dump_toml(doc))
    return path


# -- the agent process ------------------------------------------------------------------------------------
@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_agent(config: Path, log_path: Path, *args: str, env: Mapping[str, str] | None = None) -> AgentProc:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "agent", "--config", str(config), *args],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, **(env or {})},
        )
    return AgentProc(proc, log_path)


@contextlib.contextmanager
def running_agent(config: Path, log_path: Path, *args: str,
                  env: Mapping[str, str] | None = None) -> Iterator[AgentProc]:
    agent = start_agent(config, log_path, *args, env=env)
    try:
        yield agent
    finally:
        agent.kill()


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The agent's --ledger file (format and torn lines: gateway/agent/ledger.py), as dicts."""
    return [dataclasses.asdict(line) for line in ledger.read(path)]


def scrape(port: int) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05,
             agent: AgentProc | None = None) -> None:
    """Polls until predicate() holds; fails early (with its log) if `agent` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if agent is not None and agent.proc.poll() is not None:
            raise AssertionError(f"agent exited ({agent.proc.returncode}) while waiting for {what}:\n"
                                 + agent.log()[-3000:])
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


# -- the collector -----------------------------------------------------------------------------------------
@dataclass
class Received:
    device_id: str
    epoch: int
    counter: int
    plaintext: pb.Plaintext


@dataclass
class Collector:
    """Subscribes as the gateway (persistent session, so a broker restart loses nothing queued for it)
    and opens every message with the real Opener. Thread-safe views of what was accepted/rejected."""

    prov: Provisioned
    port: int
    accepted: list[Received] = field(default_factory=list)
    rejected: list[tuple[str, str | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: mqtt.Client | None = None

    def __post_init__(self) -> None:
        home = self.prov.home
        gw_key = keys.private_from_bytes((home / "gateway" / "e2e.key").read_bytes())
        self._registry = Registry.open(home / "registry.db")
        self._opener = Opener(gateway_keys={1: gw_key}, lookup=lambda d: self._registry.snapshot().get(d))

    def start(self) -> Collector:
        client = _client(self.prov.identity("gateway"), f"collector-{os.getpid()}-{time.monotonic_ns()}")
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, u: object, flags: object, rc: object, props: object = None) -> None:
            c.subscribe("sgw/v1/dev/+/up", qos=1)

        def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: object, props: object = None) -> None:
            subscribed.set()

        def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            result = self._opener.open(msg.payload, time.time_ns())
            with self._lock:
                if isinstance(result, Opened):
                    self.accepted.append(Received(result.device_id, result.epoch, result.counter,
                                                  pb.Plaintext.FromString(result.plaintext)))
                else:
                    self.rejected.append((str(result.reason), result.device_id))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        client.reconnect_delay_set(0.1, 0.5)
        client.connect("127.0.0.1", self.port, keepalive=10, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                       properties=props)
        client.loop_start()
        self._client = client
        if not subscribed.wait(10):
            self.stop()
            raise TimeoutError("collector did not subscribe")
        return self

    def stop(self) -> None:
        if self._client is not None:
            # End the persistent session too: an offline session would count as a subscriber later.
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            with contextlib.suppress(Exception):
                self._client.disconnect(properties=props)
            self._client.loop_stop()
            self._client = None
        self._registry.close()

    def windows(self) -> list[Received]:
        with self._lock:
            return [r for r in self.accepted if r.plaintext.WhichOneof("body") == "window"]

    def statuses(self) -> list[Received]:
        with self._lock:
            return [r for r in self.accepted if r.plaintext.WhichOneof("body") == "status"]

    def reject_reasons(self) -> list[str]:
        with self._lock:
            return [r for r, _ in self.rejected]


@contextlib.contextmanager
def collecting(prov: Provisioned, port: int) -> Iterator[Collector]:
    c = Collector(prov, port).start()
    try:
        yield c
    finally:
        c.stop()


def check_delivery(ledger: list[dict[str, Any]], got: list[Received]) -> None:
    """Every ledger window arrived exactly once, in order per device, each opened exactly once."""
    seqs = [(r.device_id, r.plaintext.window.window_seq) for r in got]
    assert len(seqs) == len(set(seqs)), "a window was accepted twice"
    pairs = [(r.device_id, r.epoch, r.counter) for r in got]
    assert len(pairs) == len(set(pairs)), "an (epoch, counter) was accepted twice: nonce reuse"
    have = set(seqs)
    missing = [e for e in ledger if (e["device"], e["window_seq"]) not in have]
    assert not missing, f"{len(missing)} forwarded windows never arrived, first {missing[:3]}"
    by_device: dict[str, list[Received]] = {}
    for r in got:
        by_device.setdefault(r.device_id, []).append(r)
    for device, rs in by_device.items():
        order = [(r.epoch, r.counter) for r in rs]
        assert order == sorted(order), f"{device}: windows out of order"
        wseq = [r.plaintext.window.window_seq for r in rs]
        assert wseq == sorted(wseq), f"{device}: window_seq out of order"
