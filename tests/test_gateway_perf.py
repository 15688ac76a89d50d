"""Gateway drain throughput against the bare-paho ceiling (opt-in: SGW_PERF=1; prints, asserts no time).

    SGW_PERF=1 SGW_PERF_N=20000 pytest -s -q tests/test_gateway_perf.py

A backlog of N sealed windows is queued in mosquitto for three persistent sessions of the gateway
identity (each its own share group, so each gets every message), then drained one after the other:
  1. bare paho: on_message does nothing, auto-ack (the ceiling: paho's receive path alone);
  2. paho + asyncio hop: on_message hands (topic, payload, mid) to an asyncio loop in another thread
     with call_soon_threadsafe, and the loop hands the ack back to the network thread (paho is not
     thread-safe): the cost of the "queue into asyncio" structure before any pipeline work;
  3. `sgw gateway`: the full pipeline, inference and result publishing in paho's network thread.
CPU seconds per message come from the draining process (psutil), which a loaded machine distorts
less than wall time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.common.mqtt import TlsFiles, set_nodelay, tls_context
from tests.support.mosquitto import disconnect, free_port, start_broker
from tests.support.provision import provision
from tests.test_gateway_service import Device, GatewayProc, gateway_config, metric

pytestmark = pytest.mark.skipif(os.environ.get("SGW_PERF") != "1", reason="set SGW_PERF=1 to measure")

N = int(os.environ.get("SGW_PERF_N", "20000"))
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
    assert done.wait(10)
    c.disconnect()
    c.loop_stop()


def _drain(tls: TlsFiles, client_id: str, port: int, setup: Callable[[mqtt.Client, list[int]], None],
           manual_ack: bool = False,
           pump: Callable[[mqtt.Client], None] | None = None) -> tuple[float, float]:
    """Reconnect the session and time until N messages arrived; returns (msg/s, CPU us per message)."""
    c = _client(tls, client_id, manual_ack)
    count = [0]
    setup(c, count)
    proc = psutil.Process()
    c.connect("127.0.0.1", port, clean_start=False, properties=_props())
    cpu0 = proc.cpu_times()
    t0 = time.perf_counter()
    deadline = t0 + 120
    while count[0] < N and time.perf_counter() < deadline:
        c.loop(0.01 if pump else 0.1)
        if pump:
            pump(c)
    wall = time.perf_counter() - t0
    cpu1 = proc.cpu_times()
    c.disconnect()
    assert count[0] >= N, f"drained {count[0]} of {N}"
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return N / wall, cpu / N * 1e6


def test_drain_throughput(tmp_path: Path) -> None:
    port = free_port()
    prov = provision(tmp_path / "home", list(DEVICES), broker_port=port)
    broker = start_broker(prov.home, tmp_path / "broker", port=port)
    gw_folder = prov.home / "gateway"
    tls = TlsFiles(prov.ca_file, gw_folder / "client.crt", gw_folder / "client.key")
    mport = free_port()
    conf = gateway_config(prov, "perf.toml", gateway_id="gw-perf", metrics_port=mport)
    gw = GatewayProc(conf, mport, tmp_path / "gw.log")
    devices: list[Device] = []
    try:
        gw.start()  # creates the gateway's own persistent session and shared subscription
        assert gw.stop() == 0
        _session(tls, "bench-bare", "bare", port)
        _session(tls, "bench-hop", "hop", port)
        devices = [Device(prov, d, port) for d in DEVICES]
        per = N // len(DEVICES)
        for d in devices:
            for _ in range(per // 500):
                d.publish(500)

        def bare(c: mqtt.Client, count: list[int]) -> None:
            def on_message(_c: object, _u: object, _m: object) -> None:
                count[0] += 1
            c.on_message = on_message

        try:
            bare_rate, bare_cpu = _drain(tls, "bench-bare", port, bare)
        except AssertionError:
            print(broker.log()[-3000:])
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

        hop_rate, hop_cpu = _drain(tls, "bench-hop", port, hop, manual_ack=True, pump=pump)
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
            if done >= N and metric(text, "sgw_gateway_queue_depth") == 0:
                break
            time.sleep(0.05)
        wall = time.perf_counter() - started
        cpu1 = gproc.cpu_times()
        gw_cpu = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / N * 1e6
        assert metric(text, "sgw_gateway_results_total") == N
        batches = metric(text, "sgw_gateway_batch_size_count")
        infer = metric(text, "sgw_gateway_inference_latency_seconds_sum") / N * 1e6
        print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; N={N} sealed 128x3 "
              "windows, QoS 1 over TLS")
        print(f"bare paho drain      : {bare_rate:8.0f} msg/s  {bare_cpu:6.1f} us CPU/msg")
        print(f"paho + asyncio hop   : {hop_rate:8.0f} msg/s  {hop_cpu:6.1f} us CPU/msg (no pipeline work)")
        print(f"sgw gateway (full)   : {N / wall:8.0f} msg/s  {gw_cpu:6.1f} us CPU/msg "
              f"({N / batches:.1f} windows/batch, inference {infer:.1f} us/window; "
              f"start {started - t0:.1f} s)")
        print(f"gateway RSS {rss0 / 2**20:.1f} MiB at connect, at most {rss_max / 2**20:.1f} MiB while "
              f"draining; at most {inflight_max:.0f} unacked inputs seen (receive_maximum 1024)")
    finally:
        gw.stop()
        for d in devices:
            d.close()
        broker.stop()


RATE = float(os.environ.get("SGW_PERF_RATE", "1000"))
SECONDS = float(os.environ.get("SGW_PERF_SECONDS", "4"))


def test_latency_at_a_fixed_rate(tmp_path: Path) -> None:
    """Device publish call -> ResultBatch at an observer, at SGW_PERF_RATE windows/s (one clock)."""
    import numpy as np

    from gateway.core.codec import encode_window
    from gateway.pb import messages_pb2 as pb
    from tests.test_gateway_service import observe

    port = free_port()
    prov = provision(tmp_path / "home", list(DEVICES), broker_port=port)
    broker = start_broker(prov.home, tmp_path / "broker", port=port)
    mport = free_port()
    gw = GatewayProc(gateway_config(prov, "lat.toml", gateway_id="gw-lat", metrics_port=mport), mport,
                     tmp_path / "gw.log")
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
        total = int(RATE * SECONDS)
        period = 1.0 / RATE
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
        print(f"\nload average {os.getloadavg()[0]:.1f}; {total} windows at {achieved:.0f}/s from "
              f"{len(devices)} devices: results {len(lat)}, latency ms p50 {np.percentile(lat, 50):.2f} "
              f"p99 {np.percentile(lat, 99):.2f} p99.9 {np.percentile(lat, 99.9):.2f} max {lat.max():.2f}; "
              f"{total / batches:.1f} windows/batch; gateway {cpu:.0f} us CPU/window")
        print("gateway processing latency (received -> published) buckets:",
              {ln.split('le="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("sgw_gateway_processing_latency_seconds_bucket")})
        assert len(lat) == total
    finally:
        gw.stop()
        for d in devices:
            d.close()
        if obs is not None:
            disconnect(obs.client)
        broker.stop()
