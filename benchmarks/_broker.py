"""Benchmark home and broker: provisioned with the real `sgw` commands, one private mosquitto.

`provision()` runs `sgw ca init`, `sgw device add --from CSV` and `sgw broker config --run-as-root` (the
benchmark runs as root here; mosquitto would otherwise drop to its own user, which cannot read the keys),
then replaces a few options for the benchmark (BENCH_BROKER_OVERRIDES). `Mosquitto` runs it on a free
loopback port and is always stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.common import ports

REPO = Path(__file__).resolve().parent.parent
# The real entry point (`python -m gateway` = `sgw`); `choose_sgw()` falls back to benchmarks/_sgw.py (the
# same command module, imported alone) when the full CLI does not import in the shared work tree.
SGW_REAL = [sys.executable, "-m", "gateway"]
SGW_SINGLE = [sys.executable, str(REPO / "benchmarks" / "_sgw.py")]
SGW = list(SGW_REAL)


def choose_sgw() -> str:
    """Use `sgw` itself if `sgw gateway --help` works, else the single-module launcher. Returns which."""
    proc = subprocess.run([*SGW_REAL, "gateway", "--help"], cwd=REPO, capture_output=True, timeout=60,
                          check=False)
    SGW[:] = SGW_REAL if proc.returncode == 0 else SGW_SINGLE
    return "sgw" if proc.returncode == 0 else "benchmarks/_sgw.py (sgw CLI did not import)"

# Replace these options of the generated config, for the benchmark only: the overload phase queues up
# to 2x capacity for a minute (more than the production per-client cap of 100,000, which would drop
# messages and count as losses), and persistence would autosave a GB-sized queue to disk mid-run.
BENCH_BROKER_OVERRIDES = """
# --- benchmark overrides (benchmarks/_broker.py) ---
max_queued_messages 0
max_queued_bytes 0
persistence false
log_type error
connection_messages false
# Benchmark clients share identities (several raw subscribers on the gateway or observer certificate, each
# with its own client id); production binds the client id to the CN (tests/test_mqtt_attacks.py).
use_username_as_clientid false
"""
# `sgw gateway` processes run.py may start (each instance needs its own identity: add-instance), and the
# instance that runs with [gateway] workers = 2 (one more identity for its worker 2: add-workers).
BENCH_GATEWAY_IDS = ("bench1", "bench2", "bench3", "bench4")
BENCH_WORKERS_ID = "benchw"
BENCH_WORKERS = 2
# TCP_NODELAY on the broker's sockets too (mosquitto's default is off): without it the broker's Nagle
# holds the second hop (broker -> result subscriber), ~8 ms at p50 at 1k msg/s here. `--broker-nagle`
# leaves it at mosquitto's default to show the difference.
BROKER_NODELAY = "set_tcp_nodelay true\n"


def free_port() -> int:
    return ports.free_port()


def run_sgw(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [*SGW, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sgw {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Home:
    path: Path
    port: int
    devices: list[str]
    broker_conf: Path

    def tls(self, who: str) -> tuple[Path, Path, Path]:
        """(ca, cert, key) for "gateway", "observer" or a device id."""
        if who in ("gateway", "observer"):
            d = self.path / who
            return self.path / "ca" / "ca.crt", d / "client.crt", d / "client.key"
        d = self.path / "devices" / who
        return d / "ca.crt", d / "device.crt", d / "device.key"


def device_ids(n: int) -> list[str]:
    return [f"bench-{i:04d}" for i in range(n)]


def provision(home: Path, n_devices: int, port: int, *, nodelay: bool = True) -> Home:
    """`sgw ca init`, `sgw device add --from CSV`, `sgw broker config --run-as-root`, plus the overrides."""
    ids = device_ids(n_devices)
    run_sgw("ca", "init", "--dir", str(home), "--broker-port", str(port))
    csv = home / "bench-devices.csv"
    csv.write_text("id\n" + "".join(f"{d}\n" for d in ids))
    run_sgw("device", "add", "--from", str(csv), "--dir", str(home), "--broker-port", str(port))
    for gw_id in (*BENCH_GATEWAY_IDS, BENCH_WORKERS_ID):  # before the broker config: its ACL lists them
        run_sgw("gateway", "add-instance", gw_id, "--dir", str(home))
    run_sgw("gateway", "add-workers", BENCH_WORKERS_ID, "--count", str(BENCH_WORKERS), "--dir", str(home))
    out = home / "bench-broker"
    run_sgw("broker", "config", "--dir", str(home), "--out", str(out), "--port", str(port), "--run-as-root",
            "--force")
    conf = out / "mosquitto.conf"
    overrides = BENCH_BROKER_OVERRIDES + (BROKER_NODELAY if nodelay else "")
    conf.write_text(bench_conf(conf.read_text(), overrides))
    return Home(home, port, ids, conf)


def bench_conf(text: str, overrides: str) -> str:
    """The generated config with the benchmark's overrides replacing the same options."""
    keys = {ln.split()[0] for ln in overrides.splitlines() if ln and not ln.startswith("#")}
    lines = [ln for ln in text.splitlines() if not (ln.split() and ln.split()[0] in keys)]
    return "\n".join([*lines, overrides])


class Mosquitto:
    """A private mosquitto on a loopback port; always stopped by its pid."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.log = home.path / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([exe, "-c", str(self.home.broker_conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.home.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not start listening")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def env_for_children() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
