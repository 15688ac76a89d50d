#!/usr/bin/env python3
"""CPU cost of the edge agent for one 1.6 kHz 3-axis stream (128-sample windows: 12.5 windows/s).

    python benchmarks/bench_agent.py [--seconds 30] [--warmup 5] [--quick]

Runs the real `sgw agent` as a subprocess, in real time, against a private mosquitto (mutual TLS, from
`sgw broker config`), and reads its CPU time (user + system, psutil) and windows seen (its own metrics
port) at the start and end of a steady-state interval. Scenarios:

- healthy:  simulated machine, no faults: prefilter every window, one summary every 10 s (the default).
- storm:    a fault for the whole run: every window is scored, sealed, fsynced and published.
- replay_healthy, replay_storm: the same from .npy recordings instead of the simulator: the agent's own
            cost, as with a real sensor driver (signal synthesis is not part of an agent on real hardware).

Also times the per-window stages in-process (median us). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _broker  # noqa: E402

from gateway.agent.outbox import Outbox  # noqa: E402
from gateway.common.mqtt import TlsFiles, tls_context  # noqa: E402
from gateway.core import keys  # noqa: E402
from gateway.core.codec import encode_window  # noqa: E402
from gateway.core.session import Sealer  # noqa: E402
from gateway.inference.engine import load_prefilter  # noqa: E402
from gateway.pb import messages_pb2 as pb  # noqa: E402
from gateway.sim.generator import Machine  # noqa: E402

WINDOW_S = 128 / 1600


def _toml(doc: dict[str, dict[str, Any]]) -> str:
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return repr(v)

    return "\n".join(f"[{s}]\n" + "".join(f"{k} = {val(v)}\n" for k, v in t.items()) for s, t in doc.items())


def _scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


class Subscriber:
    """Stands in for the gateway (same identity): without a subscriber the broker answers PUBACK 0x10 and
    the agent keeps and retries every window, which is not the steady state being measured."""

    def __init__(self, home: _broker.Home) -> None:
        ca, cert, key = home.tls("gateway")
        self.count = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}",
                                  protocol=paho.MQTTv5)
        self.client.tls_set_context(tls_context(TlsFiles(ca, cert, key)))
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe("sgw/v1/dev/+/up", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda *_: self._inc()
        self.client.connect("127.0.0.1", home.port, 30)
        self.client.loop_start()
        if not subscribed.wait(10):
            self.stop()
            raise RuntimeError("bench subscriber did not subscribe")

    def _inc(self) -> None:
        self.count += 1

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_scenario(home: _broker.Home, work: Path, name: str, source: dict[str, Any], warmup: float,
                 seconds: float) -> dict[str, Any]:
    device = home.devices[0]
    bundle = home.path / "devices" / device
    doc = tomllib.loads((bundle / "agent.toml").read_text())
    doc["source"].update(source)
    doc["outbox"]["path"] = str(work / f"{name}-outbox.db")
    port = _broker.free_port()
    doc["metrics"].update({"port": port})
    cfg = bundle / f"bench-{name}.toml"
    cfg.write_text(_toml(doc))
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "agent", "--config", str(cfg)],
                            stdout=log, stderr=log, cwd=_broker.REPO, env=_broker.env_for_children())
    try:
        ps = psutil.Process(proc.pid)
        time.sleep(warmup)
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited: {(work / f'{name}.log').read_text()[-2000:]}")
        seen0 = _scrape(port, "sgw_agent_windows_seen_total")
        cpu0 = ps.cpu_times()
        t0 = time.monotonic()
        time.sleep(seconds)
        seen1 = _scrape(port, "sgw_agent_windows_seen_total")
        cpu1 = ps.cpu_times()
        t1 = time.monotonic()
        fwd = _scrape(port, 'sgw_agent_windows_forwarded_total{reason="anomaly"}') + _scrape(
            port, 'sgw_agent_windows_forwarded_total{reason="summary"}')
        rss = ps.memory_info().rss
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    wall = t1 - t0
    windows = seen1 - seen0
    return {
        "wall_s": round(wall, 2),
        "windows": int(windows),
        "windows_per_s": round(windows / wall, 2),
        "forwarded_total": int(fwd),
        "cpu_s": round(cpu, 3),
        "cpu_percent_of_one_core": round(100 * cpu / wall, 3),
        "cpu_us_per_window": round(1e6 * cpu / max(windows, 1), 1),
        "rss_mib": round(rss / 2**20, 1),
        "exit_code": proc.returncode,
    }


def _median_us(fn: Callable[[int], object], n: int) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e6, 1)


def stages(work: Path, n: int) -> dict[str, float]:
    machine = Machine(1)
    prefilter = load_prefilter(accelerator="cpu")
    x, _ = machine.next_window(0.0)
    window = encode_window(x, kind="vibration", sample_rate_hz=1600.0, start_ns=1, window_seq=1, score=0.1,
                           prefilter_version="prefilter-1.0.0", reason="anomaly")
    plain = pb.Plaintext(sealed_at_ns=time.time_ns(), window=window).SerializeToString()
    gw = keys.generate()
    sealer = Sealer(device_id="bench", device_key=keys.generate(), device_key_id=1,
                    gateway_public=keys.public_bytes(gw), gateway_key_id=1, epoch=1)
    sealed = sealer.seal(plain)
    box = Outbox(work / "stages.db", max_bytes=1 << 30, max_age_s=3600, policy="drop_oldest")
    try:
        return {
            "simulator_next_window": _median_us(lambda i: machine.next_window(i * WINDOW_S), n),
            "prefilter_score_b1": _median_us(lambda _: prefilter.score(x), n),
            "encode_window_int16": _median_us(
                lambda i: encode_window(x, kind="vibration", sample_rate_hz=1600.0, start_ns=i, window_seq=i,
                                        score=0.1, reason="anomaly").SerializeToString(), n),
            "seal": _median_us(lambda _: sealer.seal(plain), n),
            "outbox_put_fsync": _median_us(
                lambda i: box.put(sealed, created_ns=i, epoch=1, counter=i), min(n, 300)),
        }
    finally:
        box.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="10 s per scenario")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.warmup = 10.0, 4.0
    with tempfile.TemporaryDirectory(prefix="sgw-bench-agent-") as tmp:
        work = Path(tmp)
        port = _broker.free_port()
        home = _broker.provision(work / "home", 1, port)
        broker = _broker.Mosquitto(home)
        broker.start()
        subscriber: Subscriber | None = None
        try:
            subscriber = Subscriber(home)
            n_win = int((args.seconds + args.warmup + 10) / WINDOW_S)
            recordings = {}
            for state in ("healthy", "bearing"):
                m = Machine(7, schedule=[(0.0, 1e6, state)])
                recordings[state] = work / f"{state}.npy"
                windows = [m.next_window(i * WINDOW_S)[0] for i in range(n_win)]
                np.save(recordings[state], np.concatenate(windows))
            all_faulty = [{"at_s": 0.0, "duration_s": 1e6, "fault": "bearing"}]
            scenarios = {
                "healthy": {"type": "simulated", "speed": 1.0},
                "storm": {"type": "simulated", "speed": 1.0, "faults": all_faulty},
                "replay_healthy": {"type": "replay", "speed": 1.0, "path": str(recordings["healthy"])},
                "replay_storm": {"type": "replay", "speed": 1.0, "path": str(recordings["bearing"])},
            }
            results = {name: run_scenario(home, work, name, src, args.warmup, args.seconds)
                       for name, src in scenarios.items()}
        finally:
            received = subscriber.count if subscriber is not None else 0
            if subscriber is not None:
                subscriber.stop()
            broker.stop()
        per_stage = stages(work, 2000)
    print(json.dumps({
        "benchmark": "agent",
        "received_by_subscriber": received,
        "stream": {"sample_rate_hz": 1600.0, "axes": 3, "window": 128, "windows_per_s": 12.5},
        "goal_percent_of_one_core": 2.0,
        "scenarios": results,
        "stages_median_us": per_stage,
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
