"""Load generator process: several device connections (each its own certificate, its own topic), QoS 1.

Run by benchmarks/run.py as `python benchmarks/_load.py --spec JSON`. Protocol on stdio: it prepares
(connects, pre-builds or pre-seals every payload), prints `ready`, waits for `go T0_NS` on stdin, publishes,
waits for every PUBACK and prints one JSON line of stats.

Payloads:
- `raw`: 8 bytes of scheduled send time (Unix ns, little endian) padded to the sealed size; for the
  raw-MQTT ceiling, whose subscribers never open anything.
- `sealed`: a real `Plaintext{TelemetryWindow 128x3 int16}` sealed with `gateway.core.session.Sealer`
  under the device's own keys. The sensor timestamp is the scheduled send time: `sealed_at_ns` = it and
  `start_ns` = it minus the window's duration, so the window's last sample is "now" when it is sent.

No paho thread: publish() writes straight to the socket when no loop thread exists; one select() over
all connections reads the PUBACKs.
"""

from __future__ import annotations

import argparse
import json
import select
import struct
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402

from gateway.common.mqtt import TlsFiles, check, connect_properties, make_client, set_nodelay  # noqa: E402
from gateway.core import keys  # noqa: E402
from gateway.core.codec import encode_window  # noqa: E402
from gateway.core.session import Sealer  # noqa: E402
from gateway.pb import messages_pb2 as pb  # noqa: E402
from gateway.sim import FAULTS, Generator  # noqa: E402

WINDOW = 128
AXES = 3
RATE_HZ = 1600.0
WINDOW_NS = int(WINDOW / RATE_HZ * 1e9)
MAX_OUTSTANDING = 4000  # per connection; paho fails at 65,535 unacknowledged (shared/notes/mqtt-perf.md)


def templates(n: int, seed: int) -> list[pb.Plaintext]:
    """n distinct Plaintexts (128x3 int16 windows from the shared generator), re-stamped per message."""
    gen = Generator(seed, sample_rate_hz=RATE_HZ, window=WINDOW)
    return [
        pb.Plaintext(window=encode_window(
            gen.window(FAULTS[i % len(FAULTS)]), kind="vibration", sample_rate_hz=RATE_HZ, start_ns=0,
            window_seq=0, score=0.9, prefilter_version="bench", reason="anomaly",
        ))
        for i in range(n)
    ]


class SealedSource:
    """Per-device Sealers (each device its own keys, from its bundle); seals a window stamped `sched_ns`."""

    def __init__(self, home: Path, devices: list[str], seed: int) -> None:
        self.templates = templates(32, seed)
        self.sealers = {}
        epoch = time.time_ns() // 1000  # strictly increasing across runs, as a restarted agent's would be
        for dev in devices:
            d = home / "devices" / dev
            e2e = tomllib.loads((d / "agent.toml").read_text())["e2e"]
            self.sealers[dev] = Sealer(
                device_id=dev,
                device_key=keys.private_from_bytes((d / e2e["device_key_file"]).read_bytes()),
                device_key_id=int(e2e["device_key_id"]),
                gateway_public=(d / e2e["gateway_public_key_file"]).read_bytes(),
                gateway_key_id=int(e2e["gateway_key_id"]),
                epoch=epoch,
            )
        self.seq = 0

    def payload(self, dev: str, sched_ns: int) -> bytes:
        pt = self.templates[self.seq % len(self.templates)]
        self.seq += 1
        pt.sealed_at_ns = sched_ns
        pt.window.start_ns = sched_ns - WINDOW_NS
        pt.window.window_seq = self.seq
        return self.sealers[dev].seal(pt.SerializeToString())


class RawSource:
    def __init__(self, size: int) -> None:
        self.pad = b"\x5a" * max(0, size - 8)

    def payload(self, dev: str, sched_ns: int) -> bytes:
        return struct.pack("<Q", sched_ns) + self.pad


def sealed_size(home: Path, device: str) -> int:
    return len(SealedSource(home, [device], 0).payload(device, time.time_ns()))


class Conn:
    def __init__(self, dev: str, client: paho.Client) -> None:
        self.dev = dev
        self.topic = f"sgw/v1/dev/{dev}/up"
        self.client = client
        self.connected = False
        self.failed: str | None = None
        self.acked = 0
        self.sent = 0


def connect_all(home: Path, port: int, devices: list[str]) -> list[Conn]:
    conns = []
    for dev in devices:
        d = home / "devices" / dev
        client = make_client(f"{dev}-load", TlsFiles(d / "ca.crt", d / "device.crt", d / "device.key"))
        client.max_inflight_messages_set(1024)
        conn = Conn(dev, client)

        def on_connect(c: paho.Client, conn: Conn, flags: Any, rc: Any, props: Any = None) -> None:
            if rc.is_failure:
                conn.failed = str(rc)
                return
            set_nodelay(c)
            conn.connected = True

        def on_publish(c: paho.Client, conn: Conn, mid: int, rc: Any, props: Any) -> None:
            conn.acked += 1

        client.user_data_set(conn)
        client.on_connect = on_connect
        client.on_publish = on_publish
        check(client.connect("127.0.0.1", port, keepalive=60, clean_start=True,
                             properties=connect_properties()), f"connect {dev}")
        conns.append(conn)
    deadline = time.monotonic() + 30
    while not all(c.connected for c in conns):
        bad = [c for c in conns if c.failed]
        if bad:
            raise SystemExit(f"connect refused for {bad[0].dev}: {bad[0].failed}")
        if time.monotonic() > deadline:
            raise SystemExit("devices did not connect within 30 s")
        pump(conns, 0.05)
    return conns


def pump(conns: list[Conn], timeout: float) -> None:
    """Read PUBACKs (and flush partial writes) on every connection, waiting at most `timeout`."""
    by_fd = {c.client.socket().fileno(): c for c in conns if c.client.socket() is not None}
    pending = [c for c in conns if _ssl_pending(c)]
    if pending:
        timeout = 0.0
    wl = [fd for fd, c in by_fd.items() if c.client.want_write()]
    r, w, _ = select.select(list(by_fd), wl, [], max(0.0, timeout))
    for fd in w:
        by_fd[fd].client.loop_write()
    seen = set()
    for fd in r:
        by_fd[fd].client.loop_read()
        seen.add(fd)
    for c in pending:
        if c.client.socket().fileno() not in seen:
            c.client.loop_read()


def _ssl_pending(c: Conn) -> bool:
    s = c.client.socket()
    return hasattr(s, "pending") and s.pending() > 0


def misc(conns: list[Conn]) -> None:
    for c in conns:
        c.client.loop_misc()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    home = Path(spec["home"])
    devices: list[str] = spec["devices"]
    rate = float(spec.get("rate", 0.0))  # 0 = as fast as possible
    count = int(spec["count"])
    inline = bool(spec.get("inline", False))
    source: SealedSource | RawSource = (
        SealedSource(home, devices, int(spec.get("seed", 1))) if spec["payload"] == "sealed"
        else RawSource(int(spec["size"]))
    )
    conns = connect_all(home, int(spec["port"]), devices)
    n_dev = len(conns)

    # Pre-build every payload before timing (unless the run is too long to hold: inline).
    t_prep = time.monotonic()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = sys.stdin.readline().split()
    if not line or line[0] != "go":
        raise SystemExit("expected 'go T0_NS'")
    t0 = int(line[1])
    interval = int(1e9 / rate) if rate > 0 else 0
    prebuilt: list[bytes] | None = None
    if not inline:
        prebuilt = [source.payload(conns[i % n_dev].dev, t0 + i * interval) for i in range(count)]
    prep_s = time.monotonic() - t_prep
    late_start_s = max(0.0, (time.time_ns() - t0) / 1e9)

    lag_ns = np.zeros(count, dtype=np.int64) if rate > 0 else None
    # Wait for t0 (the harness picks it after everyone is ready, leaving room for pre-sealing).
    while time.time_ns() < t0:
        pump(conns, min(0.01, max(0.0, (t0 - time.time_ns()) / 1e9)))
    start = time.time_ns()
    last_misc = time.monotonic()
    i = 0
    queue_full = 0
    stop_ns = t0 + int(float(spec["duration"]) * 1e9) if spec.get("duration") else None
    while i < count:
        now = time.time_ns()
        if stop_ns is not None and now >= stop_ns:
            break  # a timed run (overload): what could not be offered in time is not sent
        due = count if rate <= 0 else min(count, (now - t0) // interval + 1)
        while i < due:
            conn = conns[i % n_dev]
            if conn.sent - conn.acked >= MAX_OUTSTANDING:
                break
            sched = t0 + i * interval
            payload = prebuilt[i] if prebuilt is not None else source.payload(conn.dev, sched)
            info = conn.client.publish(conn.topic, payload, qos=1)
            if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
                queue_full += 1
                break
            check(info.rc, f"publish {conn.dev}")
            conn.sent += 1
            if lag_ns is not None:
                lag_ns[i] = time.time_ns() - sched
            i += 1
            if i % 64 == 0:
                break  # read PUBACKs between bursts, also when behind schedule
        if rate > 0:
            nxt = t0 + i * interval
            pump(conns, max(0.0, min(0.002, (nxt - time.time_ns()) / 1e9)))
        else:
            pump(conns, 0.0)
        if time.monotonic() - last_misc > 1.0:
            misc(conns)
            last_misc = time.monotonic()
    end_send = time.time_ns()
    deadline = time.monotonic() + 120
    while sum(c.acked for c in conns) < i and time.monotonic() < deadline:
        pump(conns, 0.01)
        if time.monotonic() - last_misc > 1.0:
            misc(conns)
            last_misc = time.monotonic()
    end_ack = time.time_ns()
    for c in conns:
        c.client.disconnect()
        c.client.loop_write()
    stats: dict[str, Any] = {
        "sent": sum(c.sent for c in conns), "acked": sum(c.acked for c in conns),
        "send_s": (end_send - start) / 1e9, "ack_s": (end_ack - start) / 1e9,
        "prep_s": prep_s, "late_start_s": late_start_s, "queue_full": queue_full,
        "achieved_rate": sum(c.sent for c in conns) / max(1e-9, (end_send - start) / 1e9),
    }
    if lag_ns is not None and count:
        ms = lag_ns / 1e6
        stats["lag_ms"] = {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                           "max": float(ms.max())}
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON: home, port, devices, payload, count, rate, ...")
    args = ap.parse_args()
    stats = run(json.loads(args.spec))
    sys.stdout.write(json.dumps(stats) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
