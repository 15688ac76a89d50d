"""`sgw demo`: the whole path on one machine, started in order, watched live, stopped cleanly.

Order matters both ways. Start: broker (listening) -> gateway (/metrics up and connected) -> observer
(subscribed) -> agents (metrics up) -> hostile device. Stop: hostile -> agents (SIGTERM: they flush their
outboxes) -> wait until every forwarded window has its result (bounded) -> gateway (drains) -> broker.
The summary's "lost" compares what the agents' ledgers say they forwarded with what the observer saw.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.agent.ledger import Line as LedgerLine
from gateway.agent.ledger import read as read_ledger
from gateway.common.ports import free_ports
from gateway.demo import stage as stg
from gateway.demo.hostile import EXPECTED_REASONS, HostileDevice
from gateway.demo.observer import HEALTHY_LABELS, Metrics, RateMeter, ResultObserver, percentile
from gateway.demo.procs import (
    Child,
    DemoError,
    Processes,
    find_mosquitto,
    http_get,
    port_open,
    sgw_argv,
    wait_until,
)
from gateway.demo.view import View
from gateway.inference.decision import UNKNOWN
from gateway.sim.generator import FAULTS

STOP_ORDER = ("hostile", "agent", "gateway", "broker")
DRAIN_TIMEOUT_S = 20.0
DRAIN_QUIET_S = 3.0
OPEN_ENDED_HORIZON_S = 3600.0
AGENT_SCRAPE_S = 2.0


@dataclass
class Options:
    devices: int = 20
    duration_s: float | None = None
    tui: bool = True
    attack: bool = False
    sparkplug: bool = False
    hybrid: int = 0  # how many of the devices seal suite x25519-mlkem768 (the rest x25519)
    state_dir: Path | None = None
    json: bool = False
    commission_s: float = 0.0  # > 0: agents learn their machine's normal first (sgw demo --commission)


class _Interrupted(Exception):  # noqa: N818 - a control-flow signal, not an error
    pass


def say(msg: str) -> None:
    sys.stderr.write(f"[demo] {msg}\n")
    sys.stderr.flush()


class Demo:
    def __init__(self, opts: Options, *, log: Callable[[str], None] = say) -> None:
        self.opts = opts
        self.say = log
        self._stop_requested = False
        self._phase = "start"
        self.stage: stg.Stage | None = None
        self._procs: Processes | None = None
        self.observer: ResultObserver | None = None
        self.hostile: HostileDevice | None = None
        self.commands: dict[str, int] = {}  # outcome -> devices, from the demo's `sgw device cmd` run
        self.rates = RateMeter(span_s=5.0)
        self.view = View(devices=opts.devices, attack=opts.attack)
        self._agent_metrics: dict[str, Metrics] = {}
        self._gateway_metrics = Metrics(None)
        self._live_started = 0.0
        self._live_s = 0.0
        self._cpu: dict[str, float] = {}
        self._missing: list[str] = []
        self.stopped_by = "duration"
        self._agents_scraped = 0.0
        # device -> (windows seen, forwarded) when its commissioning was first seen done
        self._commissioned_at: dict[str, tuple[float, float]] = {}

    @property
    def procs(self) -> Processes:
        if self._procs is None:
            raise DemoError("internal: no process table before run()")
        return self._procs

    @property
    def st(self) -> stg.Stage:
        if self.stage is None:
            raise DemoError("internal: nothing provisioned yet")
        return self.stage

    # -- signals ------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._phase == "stop":
            self.say("already stopping; the children get SIGKILL after their grace period")
            return
        self._stop_requested = True
        if self._phase == "start":
            raise _Interrupted

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- run ----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        tmp: tempfile.TemporaryDirectory[str] | None = None
        if self.opts.state_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="sgw-demo-")
            home = Path(tmp.name) / "home"
        else:
            home = self.opts.state_dir.absolute()
            if home.exists() and any(home.iterdir()):
                raise DemoError(f"--state-dir {home} is not empty; give a new or empty folder")
        home.mkdir(parents=True, exist_ok=True)
        self.view.state_dir = str(home) if tmp is None else f"{home} (deleted at exit)"
        self._procs = Processes(home / "logs")
        error: BaseException | None = None
        try:
            with self._signals():
                try:
                    self._start(home)
                    self._phase = "live"
                    self._live()
                except _Interrupted:
                    self.stopped_by = "interrupted during start-up"
                    self.say("interrupted during start-up; stopping")
                except BaseException as exc:  # noqa: BLE001 - stop everything first, re-raise below
                    error = exc
                finally:
                    self._phase = "stop"
                    summary = self._stop_and_summarise()
        finally:
            if tmp is not None:
                tmp.cleanup()
        if error is not None:
            raise error
        return summary

    def _start(self, home: Path) -> None:
        mosquitto = find_mosquitto()
        if mosquitto is None:
            raise DemoError("mosquitto is not installed (./scripts/demo installs it with apt-get)")
        n = self.opts.devices
        devices = stg.device_ids(n)
        horizon = (self.opts.duration_s or OPEN_ENDED_HORIZON_S) + 30.0
        ports = free_ports(2 + n)
        self.stage = st = stg.provision(
            home, devices, hostile=stg.HOSTILE_ID if self.opts.attack else None, ports=ports,
            sparkplug=self.opts.sparkplug, commission_s=self.opts.commission_s,
            hybrid=devices[n - min(n, self.opts.hybrid):],
            horizon_s=horizon + self.opts.commission_s, say=self.say,
        )
        self.view.metrics_url = st.metrics_url
        if self.opts.sparkplug:
            # What a SCADA (Ignition, any Sparkplug B host) needs to watch this fleet.
            self.view.scada = (f"SCADA (Sparkplug B): mqtts://{stg.HOST}:{st.broker_port} as "
                               f"{home / 'scada' / 'client.crt'} (key beside it, "
                               f"CA {home / 'ca' / 'ca.crt'}), subscribe spBv1.0/sgw/#")

        broker = self.procs.start("mosquitto", "broker", [mosquitto, "-c", str(st.broker_conf)])
        wait_until("mosquitto", lambda: port_open(stg.HOST, st.broker_port), timeout_s=15, watch=[broker])
        self.say(f"broker listening on {stg.HOST}:{st.broker_port} (mutual TLS, ACL)")

        gateway = self.procs.start("gateway", "gateway",
                                   sgw_argv("gateway", "--config", str(home / "gateway.toml")))
        wait_until("gateway /metrics", lambda: self._scrape_gateway().ok, timeout_s=60, watch=[gateway])
        wait_until("gateway connected to the broker",
                   lambda: self._scrape_gateway().value("sgw_gateway_connected") >= 1,
                   timeout_s=30, watch=[gateway])
        self.say(f"gateway up and connected: {st.metrics_url}")

        self.observer = ResultObserver(home, host=stg.HOST, port=st.broker_port, window_ns=st.window_ns)
        self.observer.start()
        obs = self.observer
        wait_until("observer subscription", lambda: obs.subscribed, timeout_s=15)
        self.say("observer subscribed to sgw/v1/results (observer certificate)")

        agents = [
            self.procs.start(dev, "agent", sgw_argv("agent", "--config", str(st.agent_config(dev)),
                                                    "--ledger", str(st.ledger(dev))))
            for dev in devices
        ]
        self._wait_agents(agents)
        self._ask_status()

        if self.opts.attack and st.hostile:
            victim = devices[0] if devices else None
            self.hostile = HostileDevice(st.bundle(st.hostile), host=stg.HOST, port=st.broker_port,
                                         victim=victim)
            self.hostile.start()
            self.say(f"hostile device {st.hostile} attacking: replays, forged, oversized, malformed, "
                     f"QoS 0 and QoS 2 telemetry, client-id takeover of {victim}")

    def _ask_status(self) -> None:
        """A sealed `status` command to every device, as an operator would (`sgw device cmd`); the
        replies show in the live view (gateway metrics) and the summary (what the command printed)."""
        argv = sgw_argv("device", "cmd", "--all", "status", "--dir", str(self.st.home), "--json",
                        "--wait", "20")

        def ask() -> None:
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                                      stdin=subprocess.DEVNULL)
                rows = json.loads(done.stdout or "[]")
                self.commands = dict(Counter(str(r["outcome"]) for r in rows))
            except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as exc:
                self.commands = {f"failed: {type(exc).__name__}": 1}

        threading.Thread(target=ask, name="demo-status-command", daemon=True).start()

    def _wait_agents(self, agents: list[Child]) -> None:
        st = self.st
        last = -1
        deadline = time.monotonic() + 90.0

        def up() -> int:
            return sum(1 for dev in st.devices if Metrics(http_get(st.agent_metrics_url(dev), 0.5)).ok)

        while True:
            dead = [a for a in agents if not a.alive()]
            if dead:
                raise DemoError(f"agent {dead[0].describe_exit()}")
            n = up()
            if n != last:
                self.say(f"agents up: {n}/{len(agents)}")
                last = n
            if n == len(agents):
                return
            if self._stop_requested:
                raise _Interrupted
            if time.monotonic() > deadline:
                raise DemoError(f"only {n} of {len(agents)} agents serve metrics after 90 s "
                                f"(logs in {agents[0].log.parent})")
            time.sleep(0.5)

    # -- live ---------------------------------------------------------------------------------------

    def _live(self) -> None:
        self._live_started = time.monotonic()
        end = None if self.opts.duration_s is None else self._live_started + self.opts.duration_s
        if self.opts.tui:
            from rich.console import Console  # noqa: PLC0415 - only the interactive mode pays for it
            from rich.live import Live  # noqa: PLC0415

            from gateway.demo.tui import render  # noqa: PLC0415

            console = Console(stderr=True)
            with Live(render(self.collect()), console=console, refresh_per_second=2, screen=False) as live:
                while not self._stop_requested and (end is None or time.monotonic() < end):
                    time.sleep(0.5)
                    live.update(render(self.collect()))
                    self._check_services()
        else:
            next_line = time.monotonic() + 5.0
            while not self._stop_requested and (end is None or time.monotonic() < end):
                time.sleep(0.5)
                v = self.collect()
                self._check_services()
                if time.monotonic() >= next_line:
                    next_line += 5.0
                    self.say(_progress_line(v))
        self._live_s = time.monotonic() - self._live_started
        if self._stop_requested:
            self.stopped_by = "signal"
            self.say("stopping (Ctrl-C)")

    def _check_services(self) -> None:
        for c in self.procs.of_role("broker") + self.procs.of_role("gateway"):
            if not c.alive():
                raise DemoError(c.describe_exit())
        dead = [c.name for c in self.procs.of_role("agent") if not c.alive()]
        logs = self.procs.of_role("agent")[0].log.parent if dead else ""
        self.view.notes = [f"agents exited: {', '.join(dead)} (logs in {logs})"] if dead else []

    def _scrape_gateway(self) -> Metrics:
        m = Metrics(http_get(self.st.metrics_url))
        if m.ok:
            self._gateway_metrics = m
        return m

    def _scrape_agents(self) -> None:
        for dev in self.st.devices:
            m = Metrics(http_get(self.st.agent_metrics_url(dev), 0.5))
            if m.ok:
                self._agent_metrics[dev] = m

    def collect(self) -> View:
        """One reading of everything; also feeds the rate meters."""
        v = self.view
        v.elapsed_s = time.monotonic() - self._live_started if self._live_started else 0.0
        v.agents_alive = sum(1 for c in self.procs.of_role("agent") if c.alive())
        g = self._scrape_gateway()
        v.gateway_up = g.ok
        gm = self._gateway_metrics
        v.gateway_connected = g.ok and gm.value("sgw_gateway_connected") >= 1
        v.gateway_accepted = gm.value("sgw_gateway_messages_total", outcome="accepted")
        v.gateway_rejected = gm.value("sgw_gateway_messages_total", outcome="rejected")
        v.rejections = gm.by_label("sgw_gateway_rejections_total", "reason")
        v.receipts_sent = gm.value("sgw_gateway_receipts_total")
        v.command_replies = gm.by_label("sgw_gateway_command_replies_total", "outcome")
        v.backends = sorted(
            (r.get("model", "?"), r.get("backend", "?"), r.get("requested", ""))
            for r, val in gm.rows("sgw_gateway_model_backend_info") if val
        )
        if time.monotonic() - self._agents_scraped >= AGENT_SCRAPE_S:
            # N agents' /metrics each time would cost the demo more CPU than the gateway uses.
            self._scrape_agents()
            self._agents_scraped = time.monotonic()
            am = self._agent_metrics.values()
            v.windows_seen = sum(m.value("sgw_agent_windows_seen_total") for m in am)
            v.forwarded = sum(m.value("sgw_agent_windows_forwarded_total") for m in am)
            v.outbox = {d: m.value("sgw_agent_outbox_messages") for d, m in self._agent_metrics.items()}
            v.agent_reconnects = {d: m.value("sgw_agent_reconnects_total")
                                  for d, m in self._agent_metrics.items()}
            v.unreceipted = {d: m.value("sgw_agent_unreceipted") for d, m in self._agent_metrics.items()}
            self._track_commissioning()
            # Fed only when read, so the rate is not diluted by repeats of a stale reading.
            self.rates.add("seen", v.windows_seen)
            self.rates.add("fwd", v.forwarded)
        if self.observer is not None:
            s = self.observer.snapshot()
            v.results, v.duplicates = s.results, s.duplicates
            v.faults = {}
            v.labels = {}
            for (model, label), n in s.by_label.items():
                v.labels.setdefault(model, {})[label] = n
                if label not in HEALTHY_LABELS:
                    v.faults[label] = v.faults.get(label, 0) + n
            recent = self.observer.recent_latencies(10.0)
            v.latency_p50_ms, v.latency_p99_ms = percentile(recent, 50), percentile(recent, 99)
            v.latency_all_p50_ms = percentile(s.latencies_ms, 50)
            v.latency_all_p99_ms = percentile(s.latencies_ms, 99)
        if self.hostile is not None:
            v.attack_sent = self.hostile.counts()
        self.rates.add("results", float(v.results))
        self.rates.add("in", v.gateway_accepted + v.gateway_rejected)
        v.windows_seen_rate, v.forwarded_rate = self.rates.rate("seen"), self.rates.rate("fwd")
        v.results_rate, v.gateway_in_rate = self.rates.rate("results"), self.rates.rate("in")
        return v

    def _track_commissioning(self) -> None:
        if not self.opts.commission_s:
            return
        learning: dict[str, float] = {}
        for dev, m in self._agent_metrics.items():
            if m.value("sgw_agent_commissioning") >= 1:
                learning[dev] = m.value("sgw_agent_commissioning_progress")
            elif dev not in self._commissioned_at and m.value("sgw_agent_commissioning_progress") >= 1:
                self._commissioned_at[dev] = (m.value("sgw_agent_windows_seen_total"),
                                              m.value("sgw_agent_windows_forwarded_total"))
        self.view.commissioning = learning
        self.view.commissioned = len(self._commissioned_at)

    def _per_device(self) -> dict[str, dict[str, Any]]:
        """Each device's forwarding, and after commissioning alone (what the learned normal lets through)."""
        out: dict[str, dict[str, Any]] = {}
        for dev, m in sorted(self._agent_metrics.items()):
            seen, fwd = m.value("sgw_agent_windows_seen_total"), m.value("sgw_agent_windows_forwarded_total")
            row: dict[str, Any] = {"windows_seen": int(seen), "forwarded": int(fwd),
                                   "fraction_forwarded": _r(fwd / seen if seen else None, 4)}
            if self.opts.commission_s:
                at = self._commissioned_at.get(dev)
                row["commissioned"] = at is not None
                if at is not None and seen > at[0]:
                    row["fraction_forwarded_after_commissioning"] = _r((fwd - at[1]) / (seen - at[0]), 4)
            out[dev] = row
        return out

    # -- stop ---------------------------------------------------------------------------------------

    def _stop_and_summarise(self) -> dict[str, Any]:
        if self._procs is None:
            return self.summary([])
        procs = self._procs
        if self._live_started and not self._live_s:
            self._live_s = time.monotonic() - self._live_started
        for c in procs.children:
            c.cpu_s()
        killed: list[str] = []
        try:
            if self.hostile is not None:
                self.hostile.stop()
            if self.stage is not None and self._live_started:
                self._final_agent_scrape()
            agents = procs.of_role("agent")
            if agents:
                self.say(f"stopping {len(agents)} agents (SIGTERM; they flush their outboxes)")
                self._record_cpu()
                killed += procs.stop(agents, grace_s=15.0)
            if self.observer is not None and self.stage is not None and self._live_started:
                self._drain()
            if self.stage is not None and self._gateway_alive():
                self._scrape_gateway()
                self.collect_final_gateway()
            self._record_cpu()
            killed += procs.stop_all(STOP_ORDER, grace_s=10.0)
        finally:
            if self.observer is not None:
                self.observer.stop()
            if killed:
                self.say(f"had to SIGKILL: {', '.join(killed)}")
        return self.summary(killed)

    def _gateway_alive(self) -> bool:
        return any(c.alive() for c in self.procs.of_role("gateway"))

    def collect_final_gateway(self) -> None:
        gm = self._gateway_metrics
        self.view.rejections = gm.by_label("sgw_gateway_rejections_total", "reason")
        self.view.gateway_accepted = gm.value("sgw_gateway_messages_total", outcome="accepted")
        self.view.gateway_rejected = gm.value("sgw_gateway_messages_total", outcome="rejected")

    def _final_agent_scrape(self) -> None:
        with contextlib.suppress(Exception):
            self._scrape_agents()

    def _record_cpu(self) -> None:
        for c in self.procs.children:
            self._cpu[c.name] = c.cpu_s()

    def _drain(self) -> None:
        """Waits (bounded) until every window the ledgers list has a result, or results stop coming."""
        obs = self.observer
        if obs is None:
            return
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            pending = [e for e in self._ledger_windows() if not obs.has_result(*e.window)]
            if not pending:
                return
            count = obs.snapshot().results
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > DRAIN_QUIET_S and not self._gateway_alive():
                return
            time.sleep(0.2)
        self.say(f"drain: {len(pending)} forwarded windows without a result after {DRAIN_TIMEOUT_S:g} s")

    def _ledger_windows(self) -> list[LedgerLine]:
        st = self.st
        out: list[LedgerLine] = []
        for dev in st.devices:
            out.extend(read_ledger(st.ledger(dev)))
        return out

    def summary(self, killed: list[str]) -> dict[str, Any]:
        v = self.view
        obs = self.observer.snapshot() if self.observer is not None else None
        out: dict[str, Any] = {"devices": self.opts.devices, "duration_s": round(self._live_s, 1),
                               "attack": self.opts.attack, "stopped_by": self.stopped_by,
                               "hybrid_devices": min(self.opts.devices, self.opts.hybrid)}
        out["results"] = obs.results if obs else 0
        ledger: list[LedgerLine] | None = None
        if self.stage is not None and any(self.stage.ledger(d).exists() for d in self.stage.devices):
            ledger = self._ledger_windows()
        if ledger is not None and obs is not None:
            unique = {e.window for e in ledger}
            out["forwarded"] = len(ledger)
            out["lost"] = sum(1 for w in unique if w not in obs.windows)
            out["classified"] = classification(ledger, obs.predicted)
        else:
            out["forwarded"] = int(v.forwarded)
            out["lost"] = None
            self._missing.append("agent ledgers (no --ledger files written): 'lost' not computed")
        out["duplicates"] = obs.duplicates if obs else 0
        out["rejections"] = {r: int(n) for r, n in sorted(v.rejections.items()) if n}
        lat = obs.latencies_ms if obs else []
        out["latency_ms"] = {"p50": _r(percentile(lat, 50)), "p99": _r(percentile(lat, 99)),
                             "max": _r(max(lat) if lat else None), "n": len(lat)}
        out["backends"] = {model: backend for model, backend, _ in v.backends}
        out["faults"] = dict(sorted(v.faults.items()))
        out["labels"] = v.labels
        out["windows_seen"] = int(v.windows_seen)
        out["fraction_forwarded"] = _r(v.fraction_forwarded, 4)
        out["commission_s"] = self.opts.commission_s
        out["per_device"] = self._per_device()
        out["gateway"] = {"accepted": int(v.gateway_accepted), "rejected": int(v.gateway_rejected)}
        if self.opts.attack:
            out["attack_sent"] = v.attack_sent
            out["results_hostile"] = obs.by_device.get(stg.HOSTILE_ID, 0) if obs else 0
            out["attack_expected_reasons"] = list(EXPECTED_REASONS)
            out["attack_refused_as_expected"] = sorted(out["rejections"]) == sorted(EXPECTED_REASONS)
            victim = self.hostile.victim if self.hostile is not None else None
            if victim is not None:
                # The takeover target: its agent must never have been displaced (issue 14).
                out["victim"] = {"id": victim, "reconnects": int(v.agent_reconnects.get(victim, 0))}
        out["cpu_percent_of_one_core"] = self._cpu_summary()
        if self.view.scada:
            out["scada"] = self.view.scada
        out["commands"] = dict(self.commands)  # the status command to --all: ok / no_reply / error
        out["receipts_sent"] = int(v.receipts_sent)
        out["killed"] = killed
        if self.stage is not None:
            out["metrics_url"] = self.stage.metrics_url
        if self.opts.state_dir is not None:
            out["state_dir"] = str(self.opts.state_dir.absolute())
        if self._missing:
            out["missing"] = self._missing
        return out

    def _cpu_summary(self) -> dict[str, float]:
        if self._procs is None or not self._live_s:
            return {}
        groups: dict[str, float] = {}
        lifetimes: dict[str, float] = {}
        now = time.monotonic()
        for c in self.procs.children:
            groups[c.role] = groups.get(c.role, 0.0) + self._cpu.get(c.name, c.last_cpu_s)
            lifetimes[c.role] = max(lifetimes.get(c.role, 0.0), now - c.started)
        out = {role: round(100 * cpu / lifetimes[role], 1) for role, cpu in groups.items() if lifetimes[role]}
        agents = self.procs.of_role("agent")
        if agents and "agent" in out:
            out["per_agent"] = round(out["agent"] / len(agents), 2)
        return out


def _r(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


def classification(ledger: list[LedgerLine], predicted: dict[tuple[str, int], dict[str, str]]
                   ) -> dict[str, dict[str, dict[str, int]]]:
    """model -> true state -> predicted label -> windows: how the gateway's models judged the windows whose
    true state the simulator knows (only models that predict machine states, not anomaly scores)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for e in ledger:
        if e.label is None:
            continue
        for model, label in predicted.get(e.window, {}).items():
            if label not in FAULTS and label != UNKNOWN:  # unknown is an answer of its own, not a wrong fault
                continue
            row = out.setdefault(model, {}).setdefault(e.label, {})
            row[label] = row.get(label, 0) + 1
    return out


def _progress_line(v: View) -> str:
    rej = ", ".join(f"{r}={int(n)}" for r, n in sorted(v.rejections.items()) if n) or "none"
    p50 = "-" if v.latency_p50_ms is None else f"{v.latency_p50_ms:.1f}"
    p99 = "-" if v.latency_p99_ms is None else f"{v.latency_p99_ms:.1f}"
    frac = "-" if v.fraction_forwarded is None else f"{100 * v.fraction_forwarded:.1f}%"
    learning = ""
    if v.commissioning:
        avg = 100 * sum(v.commissioning.values()) / len(v.commissioning)
        learning = f"commissioning {len(v.commissioning)} devices ({avg:.0f}% on average), "
    return (f"{int(v.elapsed_s):>4d}s {learning}windows {v.windows_seen_rate:.0f}/s, forwarded {frac}, "
            f"gateway in {v.gateway_in_rate:.1f}/s, results {v.results} ({v.results_rate:.1f}/s), "
            f"e2e p50 {p50} ms p99 {p99} ms, rejections: {rej}")


def _kv(d: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if isinstance(d, dict) and d else "none"


def _after(s: dict[str, Any]) -> str:
    after = [r["fraction_forwarded_after_commissioning"] for r in (s.get("per_device") or {}).values()
             if r.get("fraction_forwarded_after_commissioning") is not None]
    if not after:
        return ""
    return (f"; after commissioning, per device: {min(after)} to {max(after)} "
            f"({len(after)} devices, faults included)")


def human_summary(s: dict[str, Any]) -> str:
    lat = s.get("latency_ms", {})
    lines = [
        f"sgw demo: {s['devices']} devices for {s['duration_s']} s (stopped by {s.get('stopped_by')})",
        (f"  forwarded {s['forwarded']}, results {s['results']}, lost {s['lost']}, "
         f"duplicates {s['duplicates']}"),
        f"  e2e latency p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms ({lat.get('n')} results)",
        f"  fraction forwarded by the agents: {s.get('fraction_forwarded')}{_after(s)}",
        f"  faults detected: {_kv(s.get('faults'))}",
        f"  rejections: {_kv(s.get('rejections'))}",
        f"  status command to every device: {_kv(s.get('commands'))}; receipts sent {s.get('receipts_sent')}",
        f"  models run on: {_kv(s.get('backends'))}",
        f"  cpu, % of one core: {_kv(s.get('cpu_percent_of_one_core'))}",
    ]
    if s.get("attack_sent"):
        victim = s.get("victim") or {}
        lines.insert(2, f"  hostile device sent: {_kv(s['attack_sent'])}; "
                        f"its honest messages got {s.get('results_hostile', 0)} of the results; "
                        f"takeover victim {victim.get('id')} reconnects {victim.get('reconnects')}")
    if s.get("missing"):
        lines.append(f"  missing: {'; '.join(s['missing'])}")
    return "\n".join(lines)
