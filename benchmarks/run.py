"""sgw end-to-end benchmark: the gateway against the raw-MQTT ceiling, side by side in one run.

    python benchmarks/run.py [--quick] [--out DIR] [--profile]

One private mosquitto (from `sgw broker config`, mutual TLS, a free loopback port), one payload size (a
sealed 128x3 int16 window), measured in the same run:

1. ceilings: the C client `mosquitto_sub` (the physical ceiling: what the broker hands out over one
   connection, acks included) and a bare paho subscriber (the Python ceiling) each draining a QoS 1
   backlog over TLS (persistent session: subscribe, disconnect, publish N, reconnect, time
   first->last); one-hop and two-hop raw latency at fixed rates;
2. sgw: `sgw gateway --config` (a subprocess) draining the same backlog, counted as ResultBatch results
   at an observer; end-to-end latency (window's sensor time -> result received) at 1k, 5k windows/s and
   at 80% of the measured maximum; CPU-seconds per 1,000 windows and RSS over time (psutil);
3. overload: 2x capacity offered, RSS growth and losses (every sent window must get a result);
4. scale (full run only): two raw subscribers on the shared subscription against two gateway
   processes and against one gateway with `[gateway] workers = 2` (and that against one worker);
5. PostgreSQL (with the scale phases, unless --no-postgres): the fleet copied to a throwaway durable
   server (`sgw store copy`), the same drain and latency runs with one and with three instances sharing
   it, and the store's cost: server CPU per 1,000 windows, commits and WAL per 1,000 windows.

Everything is reported as a ratio to the ceilings measured in the same run (the machine is shared and
noisy). Output in --out (default benchmarks/results/): results.json (every figure, ratios, targets),
results.png (plot), results.md (the tables of docs/PERFORMANCE.md), logs/ (every process's stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _broker  # noqa: E402
import _load  # noqa: E402
import _pg  # noqa: E402
import _report  # noqa: E402

from gateway.common import tomledit  # noqa: E402
from gateway.registry.ids import gateway_cn, worker_id  # noqa: E402

PY = sys.executable

# Full run and --quick: sizes and durations. The quick run exists for the smoke test (bounded ~60 s).
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"devices": 50, "drain_n": 100_000, "latency_s": 10.0, "warmup_s": 1.0, "overload_s": 60.0,
             "rates": [1000, 5000], "scale": True, "idle_s": 15.0},
    "quick": {"devices": 8, "drain_n": 5_000, "latency_s": 1.5, "warmup_s": 0.3, "overload_s": 5.0,
              "rates": [1000, 5000], "scale": False, "idle_s": 5.0},
}

# The gateway config for the benchmark: sgw ca init's gateway.toml with only these keys replaced.
# device_rate/burst: the token bucket still runs on every message but never trips; rate limiting is not
# what is measured (50 devices at the default 200/s would cap the gateway at 10k windows/s).
GATEWAY_OVERRIDES: dict[str, dict[str, str]] = {
    "pipeline": {"device_rate": "1000000.0", "device_burst": "1000000"},
    "log": {"level": '"warning"'},
}
# Extra overrides for the throughput and latency phases (the overload phase never gets them). Empty: the
# gateway no longer sheds when mosquitto 2.0.11 overruns its receive maximum (a raw paho client acking 64
# at a time saw 15,000 unacked with 1,024), so every phase runs the shipped queue_max. Until 0323a59 it
# acked and dropped `overloaded` and these phases needed {"pipeline": {"queue_max": "1000000"}}.
CAPACITY_OVERRIDES: dict[str, dict[str, str]] = {}

UP_SHARE = "$share/bench/sgw/v1/dev/+/up"
UP_PLAIN = "sgw/v1/dev/+/up"
RESULTS = "sgw/v1/results"
DB = "postgresql"  # the Sampler's name for the PostgreSQL server and its backends


class Child:
    """A benchmark helper process speaking lines on stdio; always stopped."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, bufsize=1, env=env, cwd=str(HERE.parent))
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.last_json: dict[str, Any] | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, word: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name}: no '{word}' within {timeout:.0f} s{self._err()}") from None
            if line is None:
                raise RuntimeError(f"{self.name}: exited before '{word}'{self._err()}")
            if line.strip() == word:
                return

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"{self.name}: no result within {timeout:.0f} s{self._err()}") from None
            if line is None:
                raise RuntimeError(f"{self.name}: exited without a result{self._err()}")
            if line.startswith("{"):
                self.last_json = json.loads(line)
                self.proc.wait(timeout=30)
                return self.last_json

    def _err(self) -> str:
        text = self.stderr_path.read_text(errors="replace").strip() if self.stderr_path.exists() else ""
        return f": {text[-1500:]}" if text else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class Sampler:
    """psutil RSS and CPU time of named processes every `interval` s, on a thread; plus any extra
    probes (the gateways' queue-depth and in-flight gauges) every second."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.probes: dict[str, Any] = {}
        self.probe_samples: dict[str, list[tuple[float, float]]] = {}
        self.procs: dict[str, psutil.Process] = {}
        self.trees: set[str] = set()  # names sampled with their children (PostgreSQL's backends)
        self.samples: dict[str, list[tuple[float, float, float]]] = {}  # name -> (unix s, rss MB, cpu s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, name: str, pid: int, *, tree: bool = False) -> None:
        """Sample `pid`; with `tree`, its children too: CPU of the live ones and of those it has reaped
        (a connection's backend that exited), RSS of the live ones."""
        with self._lock:
            self.procs[name] = psutil.Process(pid)
            if tree:
                self.trees.add(name)
            self.samples.setdefault(name, [])
        self._sample_one(name)

    def unwatch(self, name: str) -> None:
        self._sample_one(name)
        with self._lock:
            self.procs.pop(name, None)

    def _sample_one(self, name: str) -> tuple[float, float, float] | None:
        with self._lock:
            p = self.procs.get(name)
        if p is None:
            return None
        try:
            with p.oneshot():
                c = p.cpu_times()
                s = (time.time(), p.memory_info().rss / 2**20, c.user + c.system)
            if name in self.trees:
                cpu, rss = s[2] + c.children_user + c.children_system, s[1]
                for kid in p.children(recursive=True):
                    with contextlib.suppress(psutil.Error), kid.oneshot():
                        k = kid.cpu_times()
                        cpu, rss = cpu + k.user + k.system, rss + kid.memory_info().rss / 2**20
                s = (s[0], rss, cpu)
        except psutil.Error:
            return None
        with self._lock:
            self.samples[name].append(s)
        return s

    def now(self, name: str) -> tuple[float, float, float] | None:
        return self._sample_one(name)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            for name in list(self.procs):
                self._sample_one(name)
            n += 1
            if n % max(1, round(1.0 / self.interval)) == 0:
                for name, probe in list(self.probes.items()):
                    v = probe()
                    if v is not None:
                        self.probe_samples.setdefault(name, []).append((time.time(), v))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def cpu_between(self, name: str, t0: float, t1: float) -> float | None:
        """CPU seconds used by `name` between unix times t0 and t1 (linear between samples)."""
        s = self.samples.get(name) or []
        if len(s) < 2 or t0 < s[0][0] or t1 > s[-1][0]:
            return None
        return _interp(s, t1) - _interp(s, t0)

    def rss_between(self, name: str, t0: float, t1: float) -> list[float]:
        return [r for (t, r, _) in self.samples.get(name, []) if t0 <= t <= t1]


def _interp(s: list[tuple[float, float, float]], t: float) -> float:
    for (ta, _, ca), (tb, _, cb) in itertools.pairwise(s):
        if ta <= t <= tb:
            return ca + (cb - ca) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
    return s[-1][2]


def set_toml(text: str, overrides: dict[str, dict[str, str]]) -> str:
    """Set `key = value` inside [section]s (values as TOML text, as `--set` takes them); every override
    must hit an existing key."""
    have = tomllib.loads(text)
    missing = sorted((s, k) for s, kv in overrides.items() for k in kv if k not in have.get(s, {}))
    if missing:
        raise RuntimeError(f"gateway.toml has no {missing}")
    return tomledit.set_keys(text, {s: {k: tomllib.loads(f"v = {v}")["v"] for k, v in kv.items()}
                                    for s, kv in overrides.items()})


class Gateway:
    """`sgw gateway --config` as a subprocess; ready when its metrics say connected and a probe passes.
    With `workers` > 1 the process is the supervisor of that many worker processes (gateway/server/
    workers.py): metrics are read from every worker's port and CPU is summed over the workers."""

    def __init__(self, bench: Bench, gw_id: str, *, shipped_queue: bool = False, workers: int = 1,
                 store_url: str = "") -> None:
        self.bench = bench
        self.id = gw_id
        self.workers = workers
        self.client_ids = [gateway_cn(worker_id(gw_id, k)) for k in range(1, workers + 1)]
        self.metrics_port = _broker.free_port()  # worker K serves metrics_port + K - 1
        self.sampled: list[str] = []  # the Sampler names whose CPU and RSS are this gateway's
        base = (bench.home.path / f"gateway-{gw_id}.toml").read_text()  # its own identity (add-instance)
        ov = {k: dict(v) for k, v in GATEWAY_OVERRIDES.items()}
        if not shipped_queue:
            for section, kv in CAPACITY_OVERRIDES.items():
                ov.setdefault(section, {}).update(kv)
        for item in bench.args.set or []:  # experiments: --set batching.max_wait_ms=0.5
            key, _, value = item.partition("=")
            section, _, name = key.rpartition(".")
            ov.setdefault(section, {})[name] = value
        self.overrides = ov
        ov.setdefault("gateway", {})["id"] = json.dumps(gw_id)
        ov["gateway"]["workers"] = str(workers)
        ov.setdefault("metrics", {})["port"] = str(self.metrics_port)
        if store_url:  # the PostgreSQL phases: the shared store instead of HOME/registry.db
            ov.setdefault("store", {})["url"] = json.dumps(store_url)
        self.config = bench.home.path / f"bench-{gw_id}.toml"
        self.config.write_text(set_toml(base, ov))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = bench.logs / f"gateway-{gw_id}.log"

    @property
    def name(self) -> str:
        return f"gateway-{self.id}"

    def start(self, timeout: float = 60.0) -> None:
        self.launch()
        self.wait_connected(timeout)

    def launch(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*_broker.SGW, "gateway", "--config", str(self.config)], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, env=self.bench.env, cwd=str(HERE.parent))
        self.sampled = [self.name]
        self.bench.sampler.watch(self.name, self.proc.pid)
        for gauge in ("sgw_gateway_queue_depth", "sgw_gateway_inflight_messages"):
            self.bench.sampler.probes[f"{self.name}:{gauge}"] = lambda g=gauge: self.metric(g)

    def wait_connected(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text(errors='replace')[-2000:]}")
            if self.metric("sgw_gateway_connected") == float(self.workers):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{self.name} not connected within {timeout:.0f} s")
        if self.workers == 1:
            return
        # The workers do the work (the supervisor only waits): sample each of them instead.
        self.bench.sampler.unwatch(self.name)
        pids = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if "--worker" in cmd:
                pids[int(cmd[cmd.index("--worker") + 1])] = child.pid
        self.sampled = [f"{self.name}.w{k}" for k in sorted(pids)]
        for k in sorted(pids):
            self.bench.sampler.watch(f"{self.name}.w{k}", pids[k])

    def metrics_text(self) -> str:
        """Every worker's /metrics, one after the other (the parsers below sum a series over them)."""
        texts = []
        for k in range(self.workers):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port + k}/metrics", timeout=2) as r:
                texts.append(str(r.read().decode()))
        return "\n".join(texts)

    def metric(self, name: str) -> float | None:
        try:
            text = self.metrics_text()
        except OSError:
            return None
        total = None
        for line in text.splitlines():
            if line.startswith((name + " ", name + "{")):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        return total

    def per_worker(self, name: str) -> list[float]:
        """One series summed per worker (e.g. how the share group split the messages)."""
        out = []
        for k in range(self.workers):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port + k}/metrics", timeout=2) as r:
                text = r.read().decode()
            out.append(sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                           if ln.startswith((name + " ", name + "{"))))
        return out

    def counters(self) -> dict[str, float]:
        """The gateway's own totals: messages by outcome, results published, rejections by reason."""
        out: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in self.metrics_text().splitlines():
                m = re.match(r"(sgw_gateway_(?:messages|rejections|results)_total)(\{[^}]*\})? (\S+)", line)
                if m:
                    key = m.group(1).removeprefix("sgw_gateway_").removesuffix("_total")
                    lab = re.search(r'(?:outcome|reason)="([a-z_]+)"', m.group(2) or "")
                    key += f".{lab.group(1)}" if lab else ""
                    out[key] = out.get(key, 0.0) + float(m.group(3))
        return {k: v for k, v in out.items() if v}

    def rejections(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in self.metrics_text().splitlines():
                m = re.match(r'sgw_gateway_rejections_total\{reason="([a-z_]+)"\} (\S+)', line)
                if m and float(m.group(2)) > 0:
                    out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for name in self.sampled:
            self.bench.sampler.unwatch(name)
        for key in [k for k in self.bench.sampler.probes if k.startswith(self.name + ":")]:
            self.bench.sampler.probes.pop(key)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = dict(PROFILES["quick" if args.quick else "full"])
        if args.scale:
            self.p["scale"] = True
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="sgw-bench-"))
        self.logs = self.out / "logs"
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.env = _broker.env_for_children()
        self.children: list[Child] = []
        self.gateways: list[Gateway] = []
        self.sampler = Sampler()
        self.phases: list[dict[str, Any]] = []
        self.missing: list[str] = []
        self.seq = 0
        self.home: _broker.Home
        self.broker: _broker.Mosquitto
        self.pg: _pg.BenchPostgres

    # -- plumbing ------------------------------------------------------------------------------------

    def spawn(self, script: str, spec: dict[str, Any], name: str) -> Child:
        self.seq += 1
        base = {"home": str(self.home.path), "port": self.home.port}
        child = Child(f"{self.seq:02d}-{name}", [PY, str(HERE / script), "--spec", json.dumps(base | spec)],
                      self.logs, self.env)
        self.children.append(child)
        return child

    def run_sub(self, spec: dict[str, Any], name: str, timeout: float = 300.0) -> dict[str, Any]:
        return self.spawn("_sub.py", spec, name).result(timeout)

    def phase(self, name: str) -> contextlib.AbstractContextManager[dict[str, Any]]:
        bench = self

        @contextlib.contextmanager
        def cm() -> Any:
            rec: dict[str, Any] = {"name": name, "t0": time.time()}
            print(f"[bench] {name} ...", flush=True)
            try:
                yield rec
            finally:
                rec["t1"] = time.time()
                bench.phases.append({"name": name, "t0": rec["t0"], "t1": rec["t1"]})
                print(f"[bench] {name}: {rec['t1'] - rec['t0']:.1f} s", flush=True)
        return cm()

    def publishers(self, *, payload: str, count: int, rate: float = 0.0, procs: int = 1,
                   inline: bool = False, name: str = "load", duration: float | None = None) -> list[Child]:
        devs = self.home.devices
        procs = max(1, min(procs, len(devs)))
        chunks = [devs[i::procs] for i in range(procs)]
        kids = []
        for k, chunk in enumerate(chunks):
            n = count // procs + (1 if k < count % procs else 0)
            spec = {"devices": chunk, "payload": payload, "size": self.size, "count": n,
                    "rate": rate / procs, "inline": inline, "seed": k + 1, "duration": duration}
            kids.append(self.spawn("_load.py", spec, f"{name}{k}"))
        for kid in kids:
            kid.expect("ready", 60)
        return kids

    def go(self, kids: list[Child], lead_s: float) -> None:
        t0 = time.time_ns() + int(lead_s * 1e9)
        for kid in kids:
            kid.send(f"go {t0}")

    def collect(self, kids: list[Child], timeout: float) -> dict[str, Any]:
        res = [k.result(timeout) for k in kids]
        out: dict[str, Any] = {
            "sent": sum(r["sent"] for r in res), "acked": sum(r["acked"] for r in res),
            "achieved_rate": sum(r["achieved_rate"] for r in res),
            "late_start_s": max(r["late_start_s"] for r in res), "procs": len(res),
        }
        lags = [r["lag_ms"] for r in res if "lag_ms" in r]
        if lags:
            out["send_lag_ms"] = {"p50": max(x["p50"] for x in lags), "p99": max(x["p99"] for x in lags)}
        return out

    def procs_for(self, rate: float) -> int:
        return 1 if rate <= 4000 else 2

    # -- the raw ceiling ----------------------------------------------------------------------------

    def raw_drain(self, n: int, subs: int = 1, *, client: str = "paho") -> dict[str, Any]:
        """A raw subscriber (or `subs` on the shared subscription) draining an N-message backlog.
        client "paho": bare paho, no-op callback (the Python ceiling); "c": `mosquitto_sub` (the physical
        ceiling: the broker's own hand-out rate over one TLS connection, acks included)."""
        base = {"who": "gateway", "filter": UP_SHARE, "session_expiry": 600, "receive_maximum": 1024}
        ids = [f"bench-raw-{client}-{self.seq}-{k}" for k in range(subs)]
        for cid in ids:
            self.run_sub(base | {"mode": "setup", "client_id": cid}, "raw-setup", 60)
        pubs = self.publishers(payload="raw", count=n, procs=2, name="preload")
        self.go(pubs, 0.2)
        load = self.collect(pubs, 300)
        if client == "c":
            # It stops at N messages: with several subscribers each one's share is unknown up front.
            if subs != 1:
                raise ValueError("the C-client drain runs one subscriber")
            drains = [self.spawn("_sub.py", base | {"mode": "cdrain", "client_id": ids[0], "expect": n},
                                 "c-drain")]
        else:
            drains = [self.spawn("_sub.py", base | {"mode": "drain", "client_id": cid, "expect": n,
                                                    "idle_s": 2.0 if subs > 1 else 10.0}, "raw-drain")
                      for cid in ids]
        res = [d.result(300) for d in drains]
        count = sum(r["count"] for r in res)
        first = min(r["first_ns"] for r in res if r["count"])
        last = max(r["last_ns"] for r in res)
        dur = (last - first) / 1e9
        cpu = sum(r["cpu_s"] for r in res)
        # Messages counted before the clock started: one per paho subscriber, the first pipe read for C.
        head = sum(r.get("first_read", 1) for r in res)
        out = {"n": n, "client": client, "subscribers": subs, "received": count, "lost": n - count,
               "drain_s": dur, "rate": (count - head) / dur if dur > 0 else 0.0,
               "cpu_s_per_1000": cpu / count * 1000 if count else None, "preload": load,
               "per_subscriber": [r["count"] for r in res]}
        if client == "c":
            out["redelivered"] = res[0]["redelivered"]  # 0: every message was acked
            out["extra"] = res[0]["extra"]  # messages beyond N (duplicates): 0
            out["exit_code"] = res[0]["rc"]
            if res[0]["rc"] != 0:
                out["stderr"] = res[0]["stderr"]
        return out

    def raw_latency(self, rate: float, hops: int) -> dict[str, Any]:
        dur = self.p["latency_s"]
        count = int(rate * dur)
        echo = None
        if hops == 2:
            echo = self.spawn("_sub.py", {"mode": "echo", "who": "gateway", "filter": UP_SHARE,
                                          "client_id": f"bench-echo-{self.seq}", "out_topic": RESULTS},
                              "raw-echo")
            echo.expect("ready", 30)
            obs_spec = {"who": "observer", "filter": RESULTS}
        else:
            obs_spec = {"who": "gateway", "filter": UP_SHARE}
        obs = self.spawn("_sub.py", obs_spec | {"mode": "observe", "parse": "raw", "client_id":
                                                 f"bench-obs-{self.seq}", "warmup_s": self.p["warmup_s"],
                                                 "idle_s": 5.0}, f"raw-obs{hops}")
        obs.expect("ready", 30)
        pubs = self.publishers(payload="raw", count=count, rate=rate, procs=self.procs_for(rate),
                               inline=True, name=f"raw{hops}hop")
        self.go(pubs, 0.5)
        load = self.collect(pubs, dur + 120)
        obs.send(f"expect {load['sent']}")
        r = obs.result(60)
        if echo is not None:
            echo.send("stop")
            echo.result(30)
        return {"offered_rate": rate, "hops": hops, "sent": load["sent"], "received": r["distinct"],
                "lost": load["sent"] - r["distinct"], "latency_ms": r.get("latency_ms"), "load": load}

    # -- the sgw path ---------------------------------------------------------------------------------

    def observer(self, name: str, latency: bool = True) -> Child:
        obs = self.spawn("_sub.py", {"mode": "observe", "who": "observer", "filter": RESULTS, "parse": "sgw",
                                     "client_id": f"bench-obs-{self.seq}", "warmup_s": self.p["warmup_s"],
                                     "latency": latency, "idle_s": self.p["idle_s"]}, name)
        obs.expect("ready", 30)
        return obs

    def sgw_rate_run(self, rate: float, duration: float, *, inline: bool = False, latency: bool = True,
                     name: str = "sgw") -> dict[str, Any]:
        count = int(rate * duration)
        obs = self.observer(f"{name}-obs", latency)
        pubs = self.publishers(payload="sealed", count=count, rate=rate, procs=self.procs_for(rate),
                               inline=inline, name=name, duration=None if latency else duration)
        lead = 0.5 if inline else 0.5 + count / len(pubs) * 60e-6  # pre-sealing: ~25-40 us a window
        t_start = time.time()
        self.go(pubs, lead)
        rss0 = {n: self.sampler.now(n) for g in self.gateways if g.running for n in g.sampled}
        load = self.collect(pubs, duration + lead + 300)
        t_sent = time.time()
        obs.send(f"expect {load['sent']}")
        r = obs.result(max(120.0, duration * 3))
        t_end = time.time()
        out = {"offered_rate": rate, "sent": load["sent"], "results": r["distinct"], "dups": r["dups"],
               "lost": load["sent"] - r["distinct"], "batches": r["batches"], "load": load,
               "latency_ms": r.get("latency_ms"),
               "catch_up_s": (r["last_ns"] / 1e9 - t_sent) if r["count"] else None}
        self.gateway_costs(out, t_start + lead, t_end, r["distinct"], rss0)
        out["gateway_counters"] = [g.counters() for g in self.gateways if g.running]
        return out

    def gateway_costs(self, out: dict[str, Any], t0: float, t1: float, windows: int,
                      rss0: dict[str, Any] | None = None) -> None:
        cpu = 0.0
        rss: list[float] = []
        for name in (n for g in self.gateways if g.running for n in g.sampled):
            self.sampler.now(name)
            c = self.sampler.cpu_between(name, t0, t1)
            if c is None:
                return
            cpu += c
            rss += self.sampler.rss_between(name, t0, t1)
        out["gateway_cpu_s"] = cpu
        out["gateway_cpu_s_per_1000"] = cpu / windows * 1000 if windows else None
        if DB in self.sampler.procs:  # the PostgreSQL phases: the server's share, same span
            self.sampler.now(DB)
            db = self.sampler.cpu_between(DB, t0, t1)
            if db is not None:
                out["db_cpu_s"] = db
                out["db_cpu_s_per_1000"] = db / windows * 1000 if windows else None
        if rss:
            base = sum(v[1] for v in (rss0 or {}).values() if v) or rss[0]
            out["gateway_rss_mb"] = {"start": base, "max": max(rss), "end": rss[-1],
                                     "growth": max(rss) / base - 1.0}

    def start_gateways(self, k: int) -> None:
        while len(self.gateways) < k:
            self.gateways.append(Gateway(self, f"bench{len(self.gateways) + 1}"))
        started = [g for g in self.gateways[:k] if not g.running]
        self.launch_all(started)
        if not started:
            return
        probe = self.sgw_rate_run(200.0, 1.0, name="warmup")  # subscribed end to end, model loaded
        if probe["lost"]:
            raise RuntimeError(f"gateway warm-up lost {probe['lost']} of {probe['sent']}: "
                               f"{[g.rejections() for g in self.gateways]}")

    def launch_all(self, gateways: list[Gateway]) -> None:
        """Start every process first, then wait: started one after another, the first would drain alone
        (and beside the next one's start-up CPU) until the next connects."""
        for g in gateways:
            g.launch()
        for g in gateways:
            g.wait_connected()

    def stop_gateways(self) -> None:
        for g in self.gateways:
            g.stop()

    def sgw_drain(self, n: int, k: int = 1) -> dict[str, Any]:
        """Backlog through k gateways: they hold persistent sessions (clean_start False), so stop them,
        publish N, start them again and count results at the observer, first -> last."""
        self.start_gateways(k)
        self.stop_gateways()
        pubs = self.publishers(payload="sealed", count=n, procs=2, name="preload")
        self.go(pubs, 0.2 + n / 2 * 40e-6)
        load = self.collect(pubs, 300)
        obs = self.observer("sgw-drain-obs", latency=False)
        self.launch_all(self.gateways[:k])
        obs.send(f"expect {n}")
        r = obs.result(600)
        dur = (r["last_ns"] - r["first_ns"]) / 1e9
        first_batch = r.get("first_batch", 1)
        out = {"n": n, "gateways": k, "results": r["distinct"], "dups": r["dups"], "lost": n - r["distinct"],
               "drain_s": dur, "rate": (r["distinct"] - first_batch) / dur if dur > 0 else 0.0,
               "preload": load, "rejections": [g.rejections() for g in self.gateways[:k]],
               "gateway_counters": [g.counters() for g in self.gateways[:k]],
               "messages_per_worker": [g.per_worker("sgw_gateway_messages_total") for g in self.gateways[:k]]}
        self.gateway_costs(out, r["first_ns"] / 1e9, r["last_ns"] / 1e9, r["distinct"] - first_batch)
        return out

    def wipe_sessions(self) -> None:
        """Drop the stopped gateways' persistent sessions so the broker stops queueing copies for them."""
        for cid in (c for g in self.gateways for c in g.client_ids):
            self.run_sub({"mode": "setup", "who": "gateway", "client_id": cid, "filter": UP_PLAIN,
                          "session_expiry": 0}, "wipe", 30)

    # -- PostgreSQL ---------------------------------------------------------------------------------------

    def postgres_phases(self, s: dict[str, Any]) -> None:
        """The same drain and latency runs with the fleet on PostgreSQL (`sgw store copy`): one instance,
        then three sharing it, next to the SQLite figures of this run; and what the store costs."""
        reason = _pg.missing_reason()
        if reason is not None:
            self.missing.append(f"PostgreSQL phases: {reason}")
            return
        p = self.p
        with self.phase("postgres: start, sgw store migrate, sgw store copy"):
            self.pg = _pg.BenchPostgres(self.home)
            self.sampler.watch(DB, self.pg.pid, tree=True)
        out = s["postgres"] = {"server_version": self.pg.version, "durable": True}
        for k in (1, 3):
            self.gateways = [Gateway(self, f"bench{i + 1}", store_url=self.pg.url) for i in range(k)]
            with self.phase(f"postgres drain, {k} instance(s)"):
                out[f"drain_x{k}"] = self.sgw_drain(p["drain_n"], k=k)
            for rate in p["rates"]:
                with self.phase(f"postgres latency {rate}/s, {k} instance(s)"):
                    before, t0 = self.pg.snapshot(), time.time()
                    run = out.setdefault(f"latency_x{k}", {})[str(rate)] = self.sgw_rate_run(
                        rate, p["latency_s"], name=f"pg{k}-{rate}")
                    time.sleep(1.5)  # backends flush their statistics at most once a second
                    run["db"] = self.pg.cost(before, self.pg.snapshot(), run["results"], time.time() - t0)
            self.stop_gateways()
            self.wipe_sessions()
        self.gateways = [Gateway(self, "bench1")]

    # -- profile ----------------------------------------------------------------------------------------

    def profile_drain(self, n: int) -> dict[str, Any]:
        """A py-spy profile of the gateway while it drains a backlog: the top frames by own time."""
        pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(pyspy).exists():
            return {"skipped": "py-spy not installed (pip install py-spy into the venv for the run)"}
        self.start_gateways(1)
        self.stop_gateways()
        pubs = self.publishers(payload="sealed", count=n, procs=2, name="preload")
        self.go(pubs, 0.2 + n / 2 * 40e-6)
        self.collect(pubs, 300)
        obs = self.observer("profile-obs", latency=False)
        g = self.gateways[0]
        g.start()
        raw = self.logs / "py-spy.txt"
        spy = subprocess.Popen([pyspy, "record", "--pid", str(g.pid), "--format", "raw", "--threads",
                                "--nonblocking", "--rate", "200", "-o", str(raw), "--duration", "30"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        obs.send(f"expect {n}")
        r = obs.result(600)
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=5)
        self.stop_gateways()
        return {"n": n, "results": r["distinct"], **_report.top_frames(raw)}

    # -- run ------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        p = self.p
        started = dt.datetime.now(dt.UTC)
        res: dict[str, Any] = {"meta": {
            "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
            "started": started.isoformat(timespec="seconds"),
            "profile": "quick" if self.args.quick else "full",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "loadavg_start": os.getloadavg()},
            "devices": p["devices"], "gateway_overrides": GATEWAY_OVERRIDES,
            "gateway_capacity_overrides": CAPACITY_OVERRIDES, "gateway_set": self.args.set or [],
            "broker_overrides": _broker.BENCH_BROKER_OVERRIDES.strip().splitlines()[1:]
            + ([] if self.args.broker_nagle else [_broker.BROKER_NODELAY.strip()]),
        }, "ceiling": {}, "sgw": {}}
        res["meta"]["git"] = git_state()
        res["meta"]["sgw_command"] = _broker.choose_sgw()
        with self.phase("provision"):
            self.home = _broker.provision(self.tmp / "home", p["devices"], _broker.free_port(),
                                          nodelay=not self.args.broker_nagle)
            self.size = _load.sealed_size(self.home.path, self.home.devices[0])
            res["meta"]["payload_bytes"] = self.size
            self.broker = _broker.Mosquitto(self.home)
            self.broker.start()
            self.sampler.watch("mosquitto", self.broker.pid)
            self.sampler.start()
        c, s = res["ceiling"], res["sgw"]
        with self.phase("raw drain"):
            c["drain"] = self.raw_drain(p["drain_n"])
        with self.phase("C client drain"):
            c["drain_c"] = self.raw_drain(p["drain_n"], client="c")
        for rate in p["rates"]:
            with self.phase(f"raw one-hop {rate}/s"):
                c.setdefault("one_hop", {})[str(rate)] = self.raw_latency(rate, 1)
            with self.phase(f"raw two-hop {rate}/s"):
                c.setdefault("two_hop", {})[str(rate)] = self.raw_latency(rate, 2)
        with self.phase("sgw drain"):
            s["drain"] = self.sgw_drain(p["drain_n"])
        capacity = s["drain"]["rate"]
        s["capacity"] = capacity
        self.start_gateways(1)  # already running after the drain
        lat = s["latency"] = {}
        for rate in p["rates"]:
            with self.phase(f"sgw latency {rate}/s"):
                lat[str(rate)] = self.sgw_rate_run(rate, p["latency_s"], name=f"sgw{rate}")
        r80 = round(0.8 * capacity)
        with self.phase("sgw latency 80% of max"):
            lat["80pct"] = self.sgw_rate_run(r80, p["latency_s"], name="sgw80")
        # Overload runs the shipped queue bound (the gateway's own defence), same session.
        self.stop_gateways()
        self.gateways = [Gateway(self, "bench1", shipped_queue=True)]
        self.start_gateways(1)
        self.sgw_rate_run(0.5 * capacity, 2.0, latency=False, name="warm")  # RSS baseline after real work
        s["overload_config"] = self.gateways[0].overrides
        with self.phase("overload 2x"):
            s["overload"] = self.sgw_rate_run(2 * capacity, p["overload_s"], latency=False, name="overload")
            s["overload"]["capacity"] = capacity
            s["overload"]["rejections"] = self.gateways[0].rejections()
        self.stop_gateways()
        self.wipe_sessions()
        with self.phase("raw two-hop 80% of max"):
            c["two_hop"]["80pct"] = self.raw_latency(r80, 2)
        self.gateways = [Gateway(self, "bench1")]  # capacity config again, same sessions
        if p["scale"]:
            with self.phase("raw drain x2"):
                c["drain_x2"] = self.raw_drain(p["drain_n"], subs=2)
            with self.phase("sgw drain x2"):
                s["drain_x2"] = self.sgw_drain(p["drain_n"], k=2)
            self.stop_gateways()
            self.wipe_sessions()
            # One instance, [gateway] workers = 2: against two raw subscribers and against one worker.
            self.gateways = [Gateway(self, _broker.BENCH_WORKERS_ID, workers=2)]
            with self.phase("sgw drain workers=2"):
                s["drain_workers2"] = self.sgw_drain(p["drain_n"], k=1)
            self.stop_gateways()
            self.wipe_sessions()
            self.gateways = [Gateway(self, "bench1")]
        else:
            self.missing.append("scale (two gateways and workers = 2 vs two raw subscribers): full run or "
                                "--scale only")
        if p["scale"] and not self.args.no_postgres:
            self.postgres_phases(s)
        else:
            self.missing.append("PostgreSQL phases (one and three instances on a shared store): full run or "
                                "--scale, without --no-postgres")
        if self.args.profile:
            with self.phase("profile"):
                s["profile"] = self.profile_drain(p["drain_n"])
        res["rss"] = {name: [[round(t - started.timestamp(), 2), round(r, 1)] for (t, r, _) in smp]
                      for name, smp in self.sampler.samples.items()}
        res["gauges"] = {name: [[round(t - started.timestamp(), 2), v] for (t, v) in smp]
                         for name, smp in self.sampler.probe_samples.items()}
        res["phases"] = [{"name": ph["name"], "t0": round(ph["t0"] - started.timestamp(), 2),
                          "t1": round(ph["t1"] - started.timestamp(), 2)} for ph in self.phases]
        res["meta"]["duration_s"] = round(time.time() - started.timestamp(), 1)
        res["meta"]["machine"]["loadavg_end"] = os.getloadavg()
        res["missing"] = self.missing
        _report.derive(res)
        return res

    def close(self) -> None:
        for g in self.gateways:
            with contextlib.suppress(Exception):
                g.stop(timeout=10)
        for ch in self.children:
            with contextlib.suppress(Exception):
                ch.stop()
        self.sampler.stop()
        if hasattr(self, "pg"):
            self.pg.stop()
        if hasattr(self, "broker"):
            self.broker.stop()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the gateway's code differed from it (a shared work tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short", "HEAD")
    if not commit:  # an export (`git archive COMMIT | tar -x`): the caller names the commit
        return {"commit": os.environ.get("SGW_BENCH_COMMIT", "unknown") + " (exported tree)",
                "uncommitted_gateway_files": []}
    dirty = git("status", "--short", "--", "gateway").splitlines()
    return {"commit": commit, "uncommitted_gateway_files": dirty}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a short run (~1 minute): smaller backlog, 5 s overload")
    ap.add_argument("--out", default=str(HERE / "results"),
                    help="output folder (default benchmarks/results/)")
    ap.add_argument("--profile", action="store_true", help="also profile the gateway draining (needs py-spy)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary sgw home")
    ap.add_argument("--scale", action="store_true",
                    help="with --quick, also the scale phases (two gateways, workers = 2, 2 raw subscribers)")
    ap.add_argument("--no-postgres", action="store_true",
                    help="skip the PostgreSQL phases (run with the scale phases if PostgreSQL is installed)")
    ap.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="override a gateway.toml key for every gateway in the run (TOML value syntax)")
    ap.add_argument("--broker-nagle", action="store_true",
                    help="leave mosquitto's set_tcp_nodelay off (its default, as `sgw broker config` writes)")
    args = ap.parse_args(argv)

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Cleanup (every helper, gateway and the broker stopped by pid) also on SIGTERM, and on SIGINT even
    # when started in the background (where SIGINT arrives ignored).
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    bench = Bench(args)
    try:
        res = bench.run()
    finally:
        bench.close()
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    _report.plot(res, out / "results.png")
    (out / "results.md").write_text(_report.markdown(res) + "\n")
    print(_report.summary(res))
    print(f"[bench] wrote results.json, results.png and results.md (PERFORMANCE.md tables) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
