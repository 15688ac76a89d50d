#!/usr/bin/env python3
"""Gateway client structure: drain throughput against the bare-paho ceiling, and latency at a fixed rate.

    python benchmarks/bench_gateway_client.py [--quick] [--n 20000] [--rate 1000] [--seconds 4]
                                              [--only drain|latency]

Runs a private mosquitto (mutual TLS) and the real `sgw gateway` as a subprocess, provisioned by the
real CLI (tests/support). Prints one JSON object; asserts no time.

drain: a backlog of N sealed windows is queued in mosquitto for three persistent sessions of the gateway
identity (each its own share group, so each gets every message), then drained one after the other:
  1. bare paho: on_message does nothing, auto-ack (the ceiling: paho's receive path alone);
  2. paho + asyncio hop: on_message hands (topic, payload, mid) to an asyncio loop in another thread
     with call_soon_threadsafe, and the loop hands the ack back to the network thread (paho is not
     thread-safe): the cost of the "queue into asyncio" structure before any pipeline work;
  3. `sgw gateway`: the full pipeline, inference and result publishing.
CPU seconds per message come from the draining process (psutil), which a loaded machine distorts
less than wall time.

latency: four devices publish at --rate windows/s for --seconds; device publish call -> ResultBatch at
an observer, one clock.

--quick: N=2000 and 2 s of latency load (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway.common.mqtt import TlsFiles, set_nodelay, tls_context  # noqa: E402
from gateway.core.codec import encode_window  # noqa: E402
from gateway.pb import messages_pb2 as pb  # noqa: E402
from tests.support.gateway import Device, GatewayProc, gateway_config, metric, observe  # noqa: E402
from tests.support.mosquitto import disconnect, free_port, start_broker  # noqa: E402
from tests.support.provision import add_instance, provision  # noqa: E402

DEVICES = ("dev-1", "dev-2", "dev-3", "dev-4")


def _client(tls: TlsFiles, client_id: str, manual_ack: bool = False) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                    manual_ack=manual_ack)
    c.tls_set_context(tls_context(tls))
    return c


def _props() -> Properties:
    p = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    p.SessionExpiryInterval = 600
    p.ReceiveMaximum = 1024
    return p


def _session(tls: TlsFiles, client_id: str, group: str, port: int) -> None:
    """Create the persistent session and its subscription, then leave (messages queue for it)."""
    c = _client(tls, client_id)
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    topic = f"$share/{group}/sgw/v1/dev/+/up"
    c.on_connect = lambda cl, *a: cl.subscribe(topic, options=SubscribeOptions(qos=1))
    c.connect("127.0.0.1", port, clean_start=False, properties=_props())
    c.loop_start()
    if not done.wait(10):
        raise RuntimeError(f"{client_id}: no SUBACK")
    c.disconnect()
    c.loop_stop()


def _drain(tls: TlsFiles, client_id: str, port: int, n: int, setup: Callable[[mqtt.Client, list[int]], None],
           manual_ack: bool = False, pump: Callable[[mqtt.Client], None] | None = None) -> dict[str, float]:
    """Reconnect the session and time until n messages arrived."""
    c = _client(tls, client_id, manual_ack)
    count = [0]
    setup(c, count)
    proc = psutil.Process()
    c.connect("127.0.0.1", port, clean_start=False, properties=_props())
    cpu0 = proc.cpu_times()
    t0 = time.perf_counter()
    deadline = t0 + 120
    while count[0] < n and time.perf_counter() < deadline:
        c.loop(0.01 if pump else 0.1)
        if pump:
            pump(c)
    wall = time.perf_counter() - t0
    cpu1 = proc.cpu_times()
    c.disconnect()
    if count[0] < n:
        raise RuntimeError(f"{client_id}: drained {count[0]} of {n} in 120 s")
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"msg_per_s": n / wall, "cpu_us_per_msg": cpu / n * 1e6}


def bench_drain(tmp: Path, n: int) -> dict[str, Any]:
    port = free_port()
    prov = provision(tmp / "home", list(DEVICES), broker_port=port)
    add_instance(prov, "gw-perf")
    # The raw drainers below share the gateway certificate, each with its own client id.
    broker = start_broker(prov.home, tmp / "broker", port=port, drop_conf=("use_username_as_clientid",))
    gw_folder = prov.home / "gateway"
    tls = TlsFiles(prov.ca_file, gw_folder / "client.crt", gw_folder / "client.key")
    mport = free_port()
    conf = gateway_config(prov, "perf.toml", gateway_id="gw-perf", metrics_port=mport)
    gw = GatewayProc(conf, mport, tmp / "gw.log")
    devices: list[Device] = []
    try:
        gw.start()  # creates the gateway's own persistent session and shared subscription
        if gw.stop() != 0:
            raise RuntimeError(f"gateway did not stop cleanly:\n{gw.log()[-3000:]}")
        _session(tls, "bench-bare", "bare", port)
        _session(tls, "bench-hop", "hop", port)
        devices = [Device(prov, d, port) for d in DEVICES]
        per = n // len(DEVICES)
        for d in devices:
            for _ in range(per // 500):
                d.publish(500)
        n = per // 500 * 500 * len(DEVICES)  # what was actually queued

        def bare(c: mqtt.Client, count: list[int]) -> None:
            def on_message(_c: object, _u: object, _m: object) -> None:
                count[0] += 1
            c.on_message = on_message

        try:
            bare_res = _drain(tls, "bench-bare", port, n, bare)
        except RuntimeError:
            print(broker.log()[-3000:], file=sys.stderr)
            raise

        loop = asyncio.new_event_loop()
        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()

        # paho is not thread-safe: the asyncio side hands acks back to the network thread (a second hop).
        acks: collections.deque[int] = collections.deque()

        def hop(c: mqtt.Client, count: list[int]) -> None:
            def handle(topic: str, payload: bytes, mid: int) -> None:
                count[0] += 1
                acks.append(mid)

            def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
                loop.call_soon_threadsafe(handle, m.topic, m.payload, m.mid)
            c.on_message = on_message

        def pump(c: mqtt.Client) -> None:
            while acks:
                c.ack(acks.popleft(), 1)

        hop_res = _drain(tls, "bench-hop", port, n, hop, manual_ack=True, pump=pump)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)

        gw.killed = False
        t0 = time.perf_counter()
        gw.start()
        started = time.perf_counter()
        gproc = psutil.Process(gw.proc.pid)  # type: ignore[union-attr]
        cpu0 = gproc.cpu_times()
        text = gw.scrape()
        rss0 = metric(text, "process_resident_memory_bytes")
        rss_max, inflight_max = rss0, 0.0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            text = gw.scrape()
            rss_max = max(rss_max, metric(text, "process_resident_memory_bytes"))
            inflight_max = max(inflight_max, metric(text, "sgw_gateway_inflight_messages"))
            done = metric(text, "sgw_gateway_results_total")
            if done >= n and metric(text, "sgw_gateway_queue_depth") == 0:
                break
            time.sleep(0.05)
        wall = time.perf_counter() - started
        cpu1 = gproc.cpu_times()
        results = metric(text, "sgw_gateway_results_total")
        if results != n:
            raise RuntimeError(f"gateway produced {results} results for {n} windows")
        gw_cpu = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / n * 1e6
        batches = metric(text, "sgw_gateway_batch_size_count")
        infer = metric(text, "sgw_gateway_inference_latency_seconds_sum") / n * 1e6
        return {
            "n": n,
            "bare_paho": bare_res,
            "paho_asyncio_hop": hop_res,
            "sgw_gateway": {"msg_per_s": n / wall, "cpu_us_per_msg": gw_cpu, "windows_per_batch": n / batches,
                            "inference_us_per_window": infer, "start_s": started - t0},
            "gateway_rss_mib": {"at_connect": rss0 / 2**20, "max_draining": rss_max / 2**20},
            "max_unacked_inputs": inflight_max,  # receive_maximum 1024
        }
    finally:
        gw.stop()
        for d in devices:
            d.close()
        broker.stop()


def bench_latency(tmp: Path, rate: float, seconds: float) -> dict[str, Any]:
    """Device publish call -> ResultBatch at an observer, at `rate` windows/s (one clock)."""
    port = free_port()
    prov = provision(tmp / "home", list(DEVICES), broker_port=port)
    add_instance(prov, "gw-lat")
    broker = start_broker(prov.home, tmp / "broker", port=port)
    mport = free_port()
    gw = GatewayProc(gateway_config(prov, "lat.toml", gateway_id="gw-lat", metrics_port=mport), mport,
                     tmp / "gw.log")
    devices: list[Device] = []
    obs = None
    try:
        gw.start()
        obs = observe(prov, port)
        arrived: dict[tuple[str, int, int], int] = {}

        def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            now = time.time_ns()
            for r in pb.ResultBatch.FromString(msg.payload).results:
                arrived[(r.device_id, r.epoch, r.counter)] = now

        obs.client.on_message = on_message
        devices = [Device(prov, d, port) for d in DEVICES]
        for c in (obs.client, *(d.client for d in devices)):  # like the agent and gateway do (no Nagle)
            set_nodelay(c)
        rng = np.random.default_rng(1)
        windows = [encode_window(rng.normal(0, 0.2, size=(128, 3)).astype(np.float32), kind="vibration",
                                 sample_rate_hz=1600.0, start_ns=0, window_seq=i) for i in range(64)]
        sent: dict[tuple[str, int, int], int] = {}
        total = int(rate * seconds)
        period = 1.0 / rate
        gproc = psutil.Process(gw.proc.pid)  # type: ignore[union-attr]
        cpu0 = gproc.cpu_times()
        t0 = time.perf_counter()
        for i in range(total):
            d = devices[i % len(devices)]
            due = t0 + i * period
            while (delay := due - time.perf_counter()) > 0:
                time.sleep(delay)
            key = (d.device_id, d.sealer.epoch, d.sealer.next_counter)
            sealed = d.sealer.seal(pb.Plaintext(sealed_at_ns=time.time_ns(),
                                                window=windows[i % 64]).SerializeToString())
            sent[key] = time.time_ns()
            d.client.publish(d.topic, sealed, qos=1)
        achieved = total / (time.perf_counter() - t0)
        deadline = time.monotonic() + 30
        while len(set(sent) & set(arrived)) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu1 = gproc.cpu_times()
        lat = np.array([arrived[k] - sent[k] for k in sent if k in arrived]) / 1e6
        text = gw.scrape()
        batches = metric(text, "sgw_gateway_batch_size_count")
        cpu = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / total * 1e6
        buckets = {ln.split('le="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("sgw_gateway_processing_latency_seconds_bucket")}
        return {
            "windows": total,
            "devices": len(devices),
            "target_rate": rate,
            "achieved_rate": achieved,
            "results": len(lat),
            "lost": total - len(lat),
            "latency_ms": ({q: float(np.percentile(lat, p)) for q, p in
                            (("p50", 50), ("p99", 99), ("p999", 99.9), ("max", 100))} if len(lat) else None),
            "windows_per_batch": total / batches,
            "gateway_cpu_us_per_window": cpu,
            # received -> published inside the gateway, cumulative counts per `le`
            "gateway_processing_latency_buckets": buckets,
        }
    finally:
        gw.stop()
        for d in devices:
            d.close()
        if obs is not None:
            disconnect(obs.client)
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=2000, 2 s of latency load (a smoke run)")
    ap.add_argument("--n", type=int, help="drain backlog in windows (default 20000)")
    ap.add_argument("--rate", type=float, default=1000.0, help="latency load, windows/s (default 1000)")
    ap.add_argument("--seconds", type=float, help="latency load duration (default 4)")
    ap.add_argument("--only", choices=("drain", "latency"))
    args = ap.parse_args()
    n = args.n or (2000 if args.quick else 20000)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    result: dict[str, Any] = {
        "meta": {"load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
                 "python": platform.python_version(), "payload": "sealed 128x3 windows, QoS 1 over TLS",
                 "quick": args.quick},
    }
    with tempfile.TemporaryDirectory(prefix="sgw-bench-gw-") as d:
        tmp = Path(d)
        if args.only in (None, "drain"):
            (tmp / "drain").mkdir()
            result["drain"] = bench_drain(tmp / "drain", n)
        if args.only in (None, "latency"):
            (tmp / "latency").mkdir()
            result["latency"] = bench_latency(tmp / "latency", args.rate, seconds)
    result["meta"]["load_average_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
