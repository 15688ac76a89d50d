"""Accounting for the fault and attack suites: what the sensors produced, what the agents forwarded,
what the gateway produced results for; and the whole path (broker, gateway, agents, result sink) as
real processes.

Three sources, compared by `Ledger.report()`:
- produced: the window_seq values each device's sensor produced, declared by the test (a run with
  `--max-windows N` from a fresh outbox produces 0..N-1; every window is a fault, so every one is
  forwarded). Left undeclared for runs that crash the agent: windows still in its memory at a SIGKILL
  were never accepted, which is not a loss sgw promises to prevent.
- forwarded: the agents' `--ledger` files (one JSON line per window committed to the outbox, with its
  (device, epoch, counter) idempotency key).
- results: every InferenceResult seen on `sgw/v1/results` by `ResultSink`, a persistent-session QoS 1
  subscriber, so a broker or gateway restart does not hide a result that was published.

lost = produced-but-not-forwarded + forwarded-without-a-result. duplicated = idempotency keys whose
copies differ + windows (device, window_seq) that got results under more than one key (a window
processed twice). Identical copies of one result (QoS 1 redelivery after a gateway crash) are
`redelivered`, which the key exists for, and are reported, not failed. Results whose key no ledger
line names are `unledgered`: after an agent SIGKILL its ledger may miss the last second of lines
(gateway/agent/ledger.py), so they are reported, and `check()` accepts them only from a crashed epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import statistics
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.agent import ledger
from gateway.common import tomledit
from gateway.pb import messages_pb2 as pb
from tests.support.mosquitto import Mosquitto, _client, free_port, start_broker
from tests.support.provision import Provisioned, add_instance, provision

Key = tuple[str, int, int]  # (device_id, epoch, counter): the idempotency key
Window = tuple[str, int]  # (device_id, window_seq)
ROOT = Path(__file__).resolve().parents[2]


# -- the result sink --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    key: Key
    window_seq: int
    raw: bytes  # the serialized InferenceResult: identical copies are redeliveries
    window_start_ns: int
    received_ns: int  # gateway clock when the input arrived
    published_ns: int
    observed_ns: int  # our clock when the result arrived here


class ResultSink:
    """Subscribes to sgw/v1/results as the observer identity, QoS 1, persistent session (expiry 600 s),
    reconnecting by itself (paho's loop, 0.1-1 s), and keeps every InferenceResult it sees."""

    def __init__(self, prov: Provisioned, port: int) -> None:
        self.prov = prov
        self.port = port
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self.batches = 0
        self.connects = 0  # CONNACKs accepted (a reconnect after a broker restart adds one)

    def start(self, timeout: float = 15.0) -> ResultSink:
        client = _client(self.prov.identity("observer"), f"sink-{os.getpid()}-{time.monotonic_ns()}")
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, u: object, flags: object, rc: object, props: object = None) -> None:
            if not getattr(rc, "is_failure", False):
                c.subscribe("sgw/v1/results", qos=1)
                self.connects += 1

        def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: object, props: object = None) -> None:
            subscribed.set()

        def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            now = time.time_ns()
            batch = pb.ResultBatch.FromString(msg.payload)
            seen = [Seen((r.device_id, r.epoch, r.counter), r.window_seq, r.SerializeToString(),
                         r.window_start_ns, r.received_ns, r.published_ns, now) for r in batch.results]
            with self._lock:
                self._seen.extend(seen)
                self.batches += 1

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        client.reconnect_delay_set(0.1, 1.0)
        client.connect("127.0.0.1", self.port, keepalive=10, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                       properties=props)
        client.loop_start()
        self._client = client
        if not subscribed.wait(timeout):
            self.stop()
            raise TimeoutError("result sink did not subscribe")
        return self

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def key_set(self) -> set[Key]:
        return {s.key for s in self.seen()}


# -- the ledger -----------------------------------------------------------------------------------------
def read_agent_ledger(path: Path) -> list[dict[str, Any]]:
    """The agent's --ledger file (format and torn lines: gateway/agent/ledger.py), as dicts."""
    return [dataclasses.asdict(line) for line in ledger.read(path)]


@dataclass
class Report:
    produced: int
    forwarded: int
    resulted: int  # distinct idempotency keys with a result
    unforwarded: list[Window]  # produced, never forwarded
    lost: list[Key]  # forwarded, no result
    duplicated: list[str]  # descriptions
    redelivered: int  # identical extra copies
    unledgered: list[Key]

    @property
    def lost_total(self) -> int:
        return len(self.unforwarded) + len(self.lost)

    def summary(self) -> str:
        return (f"produced {self.produced}, forwarded {self.forwarded}, results {self.resulted}; "
                f"lost {self.lost_total}, duplicated {len(self.duplicated)}, redelivered copies "
                f"{self.redelivered}, results with no ledger line {len(self.unledgered)}")


@dataclass
class Ledger:
    produced: dict[str, set[int]] = field(default_factory=dict)
    forwarded: list[dict[str, Any]] = field(default_factory=list)
    results: list[Seen] = field(default_factory=list)
    crashed_epochs: set[tuple[str, int]] = field(default_factory=set)  # agent runs that were SIGKILLed

    def declare_produced(self, device: str, seqs: Iterable[int]) -> None:
        self.produced.setdefault(device, set()).update(seqs)

    def add_forwarded(self, entries: Iterable[dict[str, Any]]) -> None:
        self.forwarded.extend(entries)

    def report(self) -> Report:
        fwd_keys = {(e["device"], e["epoch"], e["counter"]) for e in self.forwarded}
        fwd_windows = {(e["device"], e["window_seq"]) for e in self.forwarded}
        by_key: dict[Key, list[Seen]] = {}
        for s in self.results:
            by_key.setdefault(s.key, []).append(s)
        duplicated: list[str] = []
        redelivered = 0
        keys_of_window: dict[Window, set[Key]] = {}
        for key, copies in by_key.items():
            distinct = {c.raw for c in copies}
            if len(distinct) > 1:
                duplicated.append(f"{key}: {len(distinct)} different results")
            redelivered += len(copies) - len(distinct)
            keys_of_window.setdefault((key[0], copies[0].window_seq), set()).add(key)
        for window, keys in keys_of_window.items():
            if len(keys) > 1:
                duplicated.append(f"window {window}: results under {len(keys)} keys {sorted(keys)[:3]}")
        produced = {(d, s) for d, seqs in self.produced.items() for s in seqs}
        return Report(
            produced=len(produced), forwarded=len(fwd_keys), resulted=len(by_key),
            unforwarded=sorted(produced - fwd_windows),
            lost=sorted(fwd_keys - set(by_key)),
            duplicated=duplicated, redelivered=redelivered,
            unledgered=sorted(set(by_key) - fwd_keys),
        )

    def check(self, *, allow_unledgered_from_crash: bool = False) -> Report:
        """Asserts lost = 0 and duplicated = 0; results with no ledger line only from a crashed run."""
        r = self.report()
        assert not r.unforwarded, f"{len(r.unforwarded)} produced, never forwarded: {r.unforwarded[:5]}"
        assert not r.lost, f"{len(r.lost)} forwarded windows have no result: {r.lost[:5]}"
        assert not r.duplicated, f"duplicated results: {r.duplicated[:5]}"
        stray = [k for k in r.unledgered
                 if not (allow_unledgered_from_crash and (k[0], k[1]) in self.crashed_epochs)]
        assert not stray, f"{len(stray)} results for windows no agent forwarded: {stray[:5]}"
        return r


def latency_ms(seen: Sequence[Seen]) -> dict[str, float]:
    """Processing (input arrived -> result published, gateway clock) and end to end (window start ->
    result observed here) percentiles in ms."""
    if not seen:
        return {}
    proc = sorted((s.published_ns - s.received_ns) / 1e6 for s in seen)
    e2e = sorted((s.observed_ns - s.window_start_ns) / 1e6 for s in seen)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"proc_p50": pct(proc, 0.5), "proc_p99": pct(proc, 0.99), "e2e_p50": pct(e2e, 0.5),
            "e2e_p99": pct(e2e, 0.99), "e2e_mean": statistics.fmean(e2e)}


# -- the whole path as processes -------------------------------------------------------------------------
def gateway_toml(prov: Provisioned, name: str, *, metrics_port: int, gateway_id: str = "gw-1",
                 pipeline: dict[str, float | int] | None = None, mqtt_port: int | None = None) -> Path:
    """The provisioned gateway.toml beside it (relative paths hold), with the metrics port, CPU inference
    and any `[pipeline]` values replaced (`device_rate`, `device_burst`, ...)."""
    # Each instance has its own identity (`sgw gateway add-instance`): start from the file it wrote.
    base = prov.gateway_toml if gateway_id == "gw-1" else prov.home / f"gateway-{gateway_id}.toml"
    text = base.read_text()
    known = tomllib.loads(text)["pipeline"]
    for k in pipeline or {}:
        assert k in known, f"[pipeline] {k} not in gateway.toml"
    changes: dict[str, dict[str, Any]] = {"metrics": {"port": metrics_port},
                                          "inference": {"accelerator": "cpu"}}
    changes["pipeline"] = dict(pipeline or {})
    if mqtt_port is not None:
        changes["mqtt"] = {"port": mqtt_port}
    path = prov.home / name
    path.write_text(tomledit.set_keys(text, changes))
    return path


ALL_FAULT = [{"at_s": 0.0, "duration_s": 1e6, "fault": "bearing"}]  # every window is forwarded


class System:
    """broker + gateway + result sink (+ agents on demand) for one test; `close()` stops everything.

    Honest devices are `devices`; `extra` devices are provisioned too (hostile, victims) but get no agent
    unless asked. `pipeline` overrides gateway.toml's [pipeline] (the defaults keep a 200/s rate limit,
    far above an agent's 12.5 windows/s at speed 1). `hybrid` devices are honest too, added with
    `--suite x25519-mlkem768` (their agents seal suite 3 and the registry holds them to it).
    """

    def __init__(self, root: Path, devices: Sequence[str], *, extra: Sequence[str] = (),
                 pipeline: dict[str, float | int] | None = None, instances: Sequence[str] = (),
                 broker_drop: Sequence[str] = (), broker_extra: str = "",
                 hybrid: Sequence[str] = (), store_url: str = "") -> None:
        from tests.support.gateway import GatewayProc

        self.root = root
        self.devices = [*devices, *hybrid]
        port = free_port()
        if store_url:  # the shared store first, so the devices are registered there (and instances copy it)
            home = provision(root / "home", [], broker_port=port).gateway_toml
            home.write_text(home.read_text().replace('[store]\nurl = ""', f'[store]\nurl = "{store_url}"'))
            assert f'url = "{store_url}"' in home.read_text()
        self.prov = provision(root / "home", [*devices, *extra], broker_port=port)
        if hybrid:  # the same home: one CA, one registry, one broker ACL for all
            self.prov = provision(root / "home", hybrid, broker_port=port, suite="x25519-mlkem768")
        for gid in instances:  # before the broker config, so its ACL lists every instance
            add_instance(self.prov, gid)
        self.broker: Mosquitto = start_broker(self.prov.home, root / "broker", port=port,
                                              drop_conf=broker_drop, extra_conf=broker_extra)
        self.ledger = Ledger()
        self.agents: dict[str, Any] = {}
        self._ledgers: list[Path] = []
        self._all_agents: list[Any] = []
        self.gateways: list[Any] = []
        self.sink: ResultSink | None = None
        try:
            self.sink = ResultSink(self.prov, port).start()
            metrics_port = free_port()
            conf = gateway_toml(self.prov, "gateway-test.toml", metrics_port=metrics_port, pipeline=pipeline)
            self._gateway_args = (conf, metrics_port)
            self._GatewayProc = GatewayProc
            self.gateway = self.start_gateway()
        except BaseException:
            self.close()
            raise

    @property
    def port(self) -> int:
        return self.broker.port

    def start_gateway(self) -> Any:
        conf, metrics_port = self._gateway_args
        gw = self._GatewayProc(conf, metrics_port, self.root / f"gateway{len(self.gateways)}.log")
        self.gateways.append(gw)
        self.gateway = gw.start()
        return gw

    def scrape(self) -> str:
        return str(self.gateway.scrape())

    def rejections(self) -> dict[str, float]:
        """sgw_gateway_rejections_total by reason (0 for a reason not seen yet)."""
        out: dict[str, float] = {}
        for line in self.scrape().splitlines():
            m = re.match(r'sgw_gateway_rejections_total\{reason="([a-z_]+)"\} (\S+)', line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def start_agent(self, device: str, *, windows: int | None, speed: float, port: int | None = None,
                    run: int = 0, outbox: dict[str, Any] | None = None, metrics_port: int = 0,
                    flush_timeout_s: float = 120.0, extra_args: Sequence[str] = (),
                    mqtt: dict[str, Any] | None = None, bundle: Path | None = None,
                    env: dict[str, str] | None = None, model: dict[str, Any] | None = None,
                    e2e: dict[str, Any] | None = None,
                    source: dict[str, Any] | None = None) -> Any:
        """`sgw agent` for `device` (every window a fault, so every one is forwarded), its ledger under
        root. `port` points it elsewhere (a TcpProxy). Fresh outbox per device, kept across `run`s.
        `source` overrides [source] keys (faults=[]: a healthy machine, few windows forwarded)."""
        from tests.support.agent import agent_toml, start_agent

        sections: dict[str, dict[str, Any]] = {
            "source": {"speed": speed, "faults": ALL_FAULT, **(source or {})},
            "filter": {"summary_interval_s": 3600.0},
            "metrics": {"port": metrics_port},
        }
        sections["mqtt"] = dict(mqtt or {})
        if port is not None:
            sections["mqtt"]["port"] = port
        if outbox:
            sections["outbox"] = outbox
        if model:
            sections["model"] = model
        if e2e:
            sections["e2e"] = e2e
        cfg = agent_toml(self.prov, device, self.root, name=f"agent-{run}.toml", bundle=bundle, **sections)
        ledger = self.root / f"{device}.ledger"
        if ledger not in self._ledgers:
            self._ledgers.append(ledger)
        args = ["--ledger", str(ledger), "--flush-timeout-s", str(flush_timeout_s), "--heartbeat-s", "3600"]
        if windows is not None:
            args += ["--max-windows", str(windows)]
        args += list(extra_args)
        agent = start_agent(cfg, self.root / f"{device}-agent{run}.log", *args, env=env)
        self.agents[device] = agent
        self._all_agents.append(agent)
        return agent

    def forwarded(self) -> list[dict[str, Any]]:
        return [e for p in self._ledgers for e in read_agent_ledger(p)]

    def wait_agents(self, timeout: float) -> None:
        """Every agent exits 0 by itself (source ended, outbox flushed)."""
        deadline = time.monotonic() + timeout
        for device, agent in self.agents.items():
            left = max(0.1, deadline - time.monotonic())
            rc = agent.wait(left)
            assert rc == 0, f"agent {device} exited {rc}:\n{agent.log()[-3000:]}"

    def wait_results(self, timeout: float, *, idle_s: float = 8.0) -> set[Key]:
        """Waits until every forwarded window has a result; returns the keys still missing. Gives up
        early once nothing new has arrived for `idle_s` (the agents have exited: nothing more is coming
        but redeliveries, which the gateway sends right after it reconnects)."""
        assert self.sink is not None
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while True:
            wanted = {(e["device"], e["epoch"], e["counter"]) for e in self.forwarded()}
            have = self.sink.key_set()
            missing = wanted - have
            now = time.monotonic()
            if len(have) != last_count:
                last_count, last_change = len(have), now
            if not missing or now > deadline or now - last_change > idle_s:
                return missing
            time.sleep(0.1)

    def finish(self, *, results_timeout: float = 60.0, idle_s: float = 8.0) -> Ledger:
        """The ledger of this run: forwarded from the agents' files, results from the sink."""
        self.wait_results(results_timeout, idle_s=idle_s)
        assert self.sink is not None
        time.sleep(0.3)  # let in-flight redeliveries land so they are counted, not missed
        self.ledger.forwarded = self.forwarded()
        self.ledger.results = self.sink.seen()
        return self.ledger

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls `predicate`; fails at once (with its log) if an agent exited with an error meanwhile."""
        deadline = time.monotonic() + timeout
        while not predicate():
            for device, agent in self.agents.items():
                rc = agent.proc.poll()
                if rc not in (None, 0):
                    raise AssertionError(f"agent {device} exited {rc} while waiting for {what}:\n"
                                         + agent.log()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}:\n"
                                   + self.gateway.log()[-2000:])
            time.sleep(0.05)

    def results_for(self, device: str) -> int:
        assert self.sink is not None
        return sum(1 for k in self.sink.key_set() if k[0] == device)

    def close(self) -> None:
        for agent in self._all_agents:
            with contextlib.suppress(Exception):
                agent.kill()
        for gw in self.gateways:
            with contextlib.suppress(Exception):
                gw.stop()
        if self.sink is not None:
            self.sink.stop()
        self.broker.stop()


@contextlib.contextmanager
def running_system(root: Path, devices: Sequence[str], **kw: Any) -> Iterator[System]:
    system = System(root, devices, **kw)
    try:
        yield system
    finally:
        system.close()
