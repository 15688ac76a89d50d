"""The demo's scratch world: a throwaway CA, N devices, a broker config, all wired to free loopback ports.

Provisioning goes through the real `sgw` commands (what an operator runs), then the generated files are
adjusted in place for this run only: ports picked at random so parallel runs never collide, a fault
schedule per device so faults show up, a metrics port per agent so outbox depths can be watched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.agent.config import MIN_COMMISSION_WINDOWS
from gateway.common import tomledit
from gateway.demo.procs import DemoError, run_sgw
from gateway.sim.generator import FAULTS

HOST = "127.0.0.1"
FAULT_CLASSES = tuple(f for f in FAULTS if f != "healthy")
WINDOWS_PER_S = 1600.0 / 128  # the demo agents' simulated sensors, at real time
MIN_COMMISSION_S = MIN_COMMISSION_WINDOWS / WINDOWS_PER_S
HOSTILE_ID = "mallory-01"

def device_ids(n: int) -> list[str]:
    return [f"demo-{i:04d}" for i in range(1, n + 1)]


def fault_schedule(index: int, n: int, *, horizon_s: float, period_s: float = 15.0,
                   duration_s: float = 2.5, first_s: float = 2.0) -> list[dict[str, Any]]:
    """Device `index` of `n`: one fault every period, classes in turn, devices staggered across the
    period so a few machines are faulty at any moment (the rest send only summaries)."""
    offset = first_s + (index * period_s / max(n, 1)) % period_s
    out: list[dict[str, Any]] = []
    k = 0
    while offset + k * period_s < horizon_s:
        fault = FAULT_CLASSES[(index + k) % len(FAULT_CLASSES)]
        out.append({"at_s": round(offset + k * period_s, 3), "duration_s": duration_s, "fault": fault})
        k += 1
    return out


@dataclass
class Stage:
    home: Path
    devices: list[str]
    broker_port: int
    metrics_port: int
    agent_metrics_ports: dict[str, int]
    hostile: str | None = None
    broker_conf: Path = field(default_factory=Path)
    window: int = 128
    sample_rate_hz: float = 1600.0

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def window_ns(self) -> int:
        return int(self.window / self.sample_rate_hz * 1e9)

    def bundle(self, device_id: str) -> Path:
        return self.home / "devices" / device_id

    def agent_config(self, device_id: str) -> Path:
        return self.bundle(device_id) / "agent.toml"

    def ledger(self, device_id: str) -> Path:
        return self.bundle(device_id) / "ledger.jsonl"

    def agent_metrics_url(self, device_id: str) -> str:
        return f"http://{HOST}:{self.agent_metrics_ports[device_id]}/metrics"


def provision(home: Path, devices: Sequence[str], *, hostile: str | None, ports: Sequence[int],
              horizon_s: float, say: Any, sparkplug: bool = False, commission_s: float = 0.0,
              hybrid: Sequence[str] = ()) -> Stage:
    """ports: broker, gateway metrics, then one per device. commission_s > 0: each agent first learns
    its machine's normal for that long, and the faults start after it (a baseline learned on faults
    would call them normal). `hybrid` devices seal suite x25519-mlkem768 (a mixed fleet: the gateway
    accepts both suites, each device is held to its own)."""
    broker_port, metrics_port, *agent_ports = ports
    stage = Stage(home, list(devices), broker_port, metrics_port,
                  dict(zip(devices, agent_ports, strict=True)), hostile=hostile)
    env = {**os.environ, "SGW_HOME": str(home)}
    say(f"creating a throwaway CA in {home}")
    run_sgw(["ca", "init", "--dir", str(home), "--broker-host", HOST, "--broker-port", str(broker_port)],
            env=env)
    everyone = [*devices, *([hostile] if hostile else [])]
    say(f"provisioning {len(devices)} devices" + (f" ({len(hybrid)} post-quantum hybrid)" if hybrid else "")
        + (f" and the hostile device {hostile}" if hostile else ""))
    _add_devices(home, everyone, env, hybrid=set(hybrid))
    if sparkplug:
        say("issuing the Sparkplug B edge node and SCADA identities")
        run_sgw(["gateway", "add-sparkplug", "--dir", str(home)], env=env)
    say("writing the broker's mutual-TLS + ACL config")
    broker_dir = home / "mosquitto"
    as_root = ["--run-as-root"] if os.geteuid() == 0 else []
    run_sgw(["broker", "config", "--dir", str(home), "--out", str(broker_dir), "--port", str(broker_port),
             "--listen", HOST, *as_root], env=env)
    stage.broker_conf = broker_dir / "mosquitto.conf"
    if not stage.broker_conf.is_file():
        raise DemoError(f"'sgw broker config' wrote no {stage.broker_conf}")

    tomledit.edit_file(home / "gateway.toml", {"mqtt": {"host": HOST, "port": broker_port},
                                      "metrics": {"host": HOST, "port": metrics_port}})
    for i, dev in enumerate(devices):
        cfg = stage.agent_config(dev)
        if not cfg.is_file():
            raise DemoError(f"'sgw device add {dev}' wrote no {cfg}")
        faults = fault_schedule(i, len(devices), horizon_s=horizon_s, first_s=2.0 + commission_s)
        sections: dict[str, dict[str, Any]] = {
            "mqtt": {"host": HOST, "port": broker_port},
            "source": {"seed": i + 1, "faults": faults},
            "filter": {"summary_interval_s": 5.0},
            "metrics": {"host": HOST, "port": stage.agent_metrics_ports[dev]},
        }
        if commission_s:
            sections["commission"] = {"enabled": True, "windows": round(commission_s * WINDOWS_PER_S)}
        tomledit.edit_file(cfg, sections)
    if hostile:
        tomledit.edit_file(stage.agent_config(hostile), {"mqtt": {"host": HOST, "port": broker_port}})
    return stage


def _add_devices(home: Path, ids: Sequence[str], env: Mapping[str, str], *, hybrid: set[str]) -> None:
    # One CSV import: one process and one registry transaction instead of N of each.
    csv = home / "demo-devices.csv"
    csv.write_text("id,kind,suite\n" + "".join(
        f"{d},vibration,{'x25519-mlkem768' if d in hybrid else 'x25519'}\n" for d in ids))
    try:
        run_sgw(["device", "add", "--from", str(csv), "--dir", str(home)], env=env, timeout_s=300)
    finally:
        csv.unlink(missing_ok=True)
