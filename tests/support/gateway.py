"""The gateway as a process, and the test publisher and observer around it (shared by the gateway,
log-secrecy and fault suites and by benchmarks/bench_gateway_client.py).

Traffic comes from `Device`, a test publisher that seals windows with the core Sealer using a
provisioned device's e2e key and TLS certificate (what the agent does), and keeps the list of what it
sent: the (device_id, epoch, counter) idempotency keys. An observer collects every ResultBatch.
Every wait is bounded; every process started here is stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from gateway.common import tomledit
from gateway.core import keys
from gateway.core.codec import encode_window
from gateway.core.session import Sealer
from gateway.pb import messages_pb2 as pb
from tests.support.cli import SGW_ARGV
from tests.support.mosquitto import Mosquitto, connect, disconnect, free_port, start_broker
from tests.support.provision import Provisioned, add_instance, provision

ROOT = Path(__file__).resolve().parent.parent.parent
Key = tuple[str, int, int]


# -- harness ------------------------------------------------------------------------------------


def gateway_config(prov: Provisioned, name: str, *, gateway_id: str, metrics_port: int,
                   extra: str = "") -> Path:
    """A copy of the provisioned gateway.toml (same folder, so relative paths hold) with test overrides."""
    # Each instance has its own identity and config from `sgw gateway add-instance` (Env.gateway runs it).
    base = prov.gateway_toml if gateway_id == "gw-1" else prov.home / f"gateway-{gateway_id}.toml"
    text = tomledit.set_keys(base.read_text(), {
        "metrics": {"port": metrics_port},
        # Test publishers send in bursts far above an agent's rate; the limiter has its own tests.
        "pipeline": {"device_rate": 100000.0, "device_burst": 100000},
        "inference": {"accelerator": "cpu"},
    })
    path = prov.home / name
    path.write_text(text + extra)
    return path


class GatewayProc:
    def __init__(self, config: Path, metrics_port: int, log: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.args = args
        self.env = env
        self.metrics_port = metrics_port
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False

    def start(self) -> GatewayProc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*SGW_ARGV, "gateway", "--config", str(self.config), *self.args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, **(self.env or {})},
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gateway exited early:\n{self.log()[-3000:]}"
            with contextlib.suppress(OSError):
                if metric(self.scrape(), "sgw_gateway_connected") == 1.0:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"gateway did not connect:\n{self.log()[-3000:]}")

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed = True

    def stop(self) -> int:
        """SIGTERM (drain) and the exit code; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return -1 if self.proc is None else int(self.proc.returncode)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return int(self.proc.wait(30))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
            found = True
    return total if found else float("nan")


@dataclass
class Observer:
    """Collects every ResultBatch on sgw/v1/results (QoS 1)."""

    client: mqtt.Client
    batches: list[pb.ResultBatch] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def results(self) -> list[pb.InferenceResult]:
        with self.lock:
            return [r for b in self.batches for r in b.results]

    def keys(self) -> set[Key]:
        return {(r.device_id, r.epoch, r.counter) for r in self.results()}

    def wait_for(self, wanted: set[Key], timeout: float) -> set[Key]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            missing = wanted - self.keys()
            if not missing:
                return set()
            time.sleep(0.1)
        return wanted - self.keys()


def observe(prov: Provisioned, port: int) -> Observer:
    client = connect(prov.identity("observer"), port)
    obs = Observer(client)
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        batch = pb.ResultBatch.FromString(msg.payload)
        with obs.lock:
            obs.batches.append(batch)

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe("sgw/v1/results", qos=1)
    assert subscribed.wait(10)
    return obs


class Device:
    """Seals windows like the agent does, with the provisioned bundle's keys and certificate."""

    def __init__(self, prov: Provisioned, device_id: str, port: int) -> None:
        bundle = prov.bundle(device_id)
        self.device_id = device_id
        self.sealer = Sealer(
            device_id=device_id, device_key=keys.private_from_bytes((bundle / "e2e.key").read_bytes()),
            device_key_id=1, gateway_public=(bundle / "gateway_e2e.pub").read_bytes(), gateway_key_id=1,
            epoch=time.time_ns(),
        )
        self.client = connect(prov.identity(device_id), port)
        self.topic = f"sgw/v1/dev/{device_id}/up"
        self.sent: list[Key] = []
        self._rng = np.random.default_rng(abs(hash(device_id)) % 2**32)
        self._seq = 0

    def publish(self, n: int, *, pace_s: float = 0.0, **window: Any) -> list[Key]:
        """n sealed windows of noise; `window`: more encode_window fields (score, reason, ...)."""
        infos = []
        for _ in range(n):
            now = time.time_ns()
            w = encode_window(self._rng.normal(0, 0.2, size=(128, 3)).astype(np.float32), kind="vibration",
                              sample_rate_hz=1600.0, start_ns=now - 80_000_000, window_seq=self._seq,
                              **window)
            self._seq += 1
            key = (self.device_id, self.sealer.epoch, self.sealer.next_counter)
            sealed = self.sealer.seal(pb.Plaintext(sealed_at_ns=now, window=w).SerializeToString())
            info = self.client.publish(self.topic, sealed, qos=1)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
            infos.append(info)
            self.sent.append(key)
            if pace_s:
                time.sleep(pace_s)
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
        return self.sent[-n:]

    def close(self) -> None:
        disconnect(self.client)


@dataclass
class Env:
    prov: Provisioned
    broker: Mosquitto
    root: Path
    gateways: list[GatewayProc] = field(default_factory=list)
    clients: list[Device | Observer] = field(default_factory=list)

    def gateway(self, gateway_id: str = "gw-1", *args: str, start: bool = True,
                env: dict[str, str] | None = None, results: dict[str, Any] | None = None) -> GatewayProc:
        port = free_port()
        if gateway_id != "gw-1" and not (self.prov.home / f"gateway-{gateway_id}.toml").exists():
            # What an operator does for a new instance: issue its identity (the broker folder's ACL is
            # rewritten), then reload the broker so it reads the new ACL block.
            add_instance(self.prov, gateway_id)
            self.broker.reload()
        conf = gateway_config(self.prov, f"{gateway_id}.toml", gateway_id=gateway_id, metrics_port=port)
        if results:
            tomledit.edit_file(conf, {"results": results})
        gw = GatewayProc(conf, port, self.root / f"{gateway_id}.log", *args, env=env)
        self.gateways.append(gw)
        return gw.start() if start else gw

    def device(self, device_id: str) -> Device:
        d = Device(self.prov, device_id, self.broker.port)
        self.clients.append(d)
        return d

    def observer(self) -> Observer:
        o = observe(self.prov, self.broker.port)
        self.clients.append(o)
        return o


def assert_one_result_per_window(obs: Observer, sent: set[Key]) -> int:
    """Every sent key has a result, nothing else has one, duplicates are identical; returns #duplicates."""
    by_key: dict[Key, list[bytes]] = {}
    for r in obs.results():
        by_key.setdefault((r.device_id, r.epoch, r.counter), []).append(r.SerializeToString())
    assert set(by_key) == sent, f"missing {len(sent - set(by_key))}, unexpected {len(set(by_key) - sent)}"
    dups = 0
    for key, copies in by_key.items():
        assert all(c == copies[0] for c in copies), f"{key}: redelivered result differs"
        dups += len(copies) - 1
    return dups


@contextlib.contextmanager
def running_env(root: Path, devices: Sequence[str]) -> Iterator[Env]:
    """A provisioned home and a running broker; on exit every gateway and client started through the Env
    is stopped, the broker last. A gateway must exit 0 on SIGTERM unless the test SIGKILLed it."""
    port = free_port()
    prov = provision(root / "home", list(devices), broker_port=port)
    broker = start_broker(prov.home, root / "broker", port=port)
    e = Env(prov, broker, root)
    try:
        yield e
    finally:
        codes = [gw.stop() for gw in e.gateways]
        for c in e.clients:
            if isinstance(c, Device):
                c.close()
            else:
                disconnect(c.client)
        broker.stop()
    for gw, code in zip(e.gateways, codes, strict=True):
        # SIGTERM drains and exits 0 (unless the test SIGKILLed it on purpose).
        assert gw.killed or code == 0, f"gateway exit {code}:\n{gw.log()[-2000:]}"
