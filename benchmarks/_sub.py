"""Subscriber processes for the benchmark: the raw-MQTT ceiling and the observers.

`python benchmarks/_sub.py --spec JSON`, modes:
- `setup`: create a persistent session (session expiry > 0) subscribed to `filter` at QoS 1, disconnect.
- `drain`: reconnect to that session with clean_start False, count `expect` messages, report first->last
  time and this process's CPU time, then drop the session (DISCONNECT with session expiry 0).
- `observe`: subscribe, print `ready`; parse `raw` payloads (8-byte scheduled time) or sgw `ResultBatch`es;
  record latency = receive time - sensor timestamp; stdin `expect N` ends it at N distinct messages (or
  when nothing arrives for `idle_s`), `stop` ends it now. Prints one JSON line.
- `echo`: the raw second hop: republish every message on `out_topic` at QoS 1 until `stop`.
- `cdrain`: like `drain`, but the subscriber is the C client `mosquitto_sub` (the physical ceiling: what
  the broker can hand out over one connection); see `mode_cdrain`.
All paho clients: MQTT 5, mutual TLS, TCP_NODELAY (gateway.common.mqtt), paho callbacks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from gateway.common.mqtt import TlsFiles, check, connect_properties, make_client, set_nodelay  # noqa: E402
from gateway.pb import messages_pb2 as pb  # noqa: E402

WINDOW_NS = int(128 / 1600.0 * 1e9)


def tls_for(home: Path, who: str) -> TlsFiles:
    if who in ("gateway", "observer"):
        return TlsFiles(home / "ca" / "ca.crt", home / who / "client.crt", home / who / "client.key")
    d = home / "devices" / who
    return TlsFiles(d / "ca.crt", d / "device.crt", d / "device.key")


class State:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.failed: str | None = None
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        self.sched: list[int] = []
        self.lat: list[int] = []
        self.seen: dict[tuple[str, int], bytearray] = {}
        self.distinct = 0
        self.dups = 0
        self.batches = 0
        self.first_batch = 1


def client_for(spec: dict[str, Any], state: State) -> paho.Client:
    home = Path(spec["home"])
    client = make_client(spec["client_id"], tls_for(home, spec["who"]), userdata=state)

    def on_connect(c: paho.Client, st: State, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            st.failed = str(rc)
        else:
            set_nodelay(c)
        st.connected.set()

    def on_subscribe(c: paho.Client, st: State, mid: int, rcs: Any, props: Any) -> None:
        if any(r.is_failure for r in rcs):
            st.failed = f"subscribe refused: {rcs}"
        st.subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.max_inflight_messages_set(1024)
    return client


def connect(client: paho.Client, spec: dict[str, Any], *, clean: bool, expiry: int) -> None:
    props = connect_properties(session_expiry_s=expiry, receive_maximum=int(spec.get("receive_maximum", 0)))
    check(client.connect("127.0.0.1", int(spec["port"]), keepalive=60, clean_start=clean, properties=props),
          "connect")


def wait(ev: threading.Event, state: State, what: str, client: paho.Client | None = None,
         timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ev.is_set():
        if client is not None:
            client.loop(0.05)
        else:
            ev.wait(0.05)
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: timed out")
    if state.failed:
        raise SystemExit(f"{what}: {state.failed}")


def drop_session(client: paho.Client) -> None:
    props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.disconnect(properties=props)
    client.loop(0.1)


def mode_setup(spec: dict[str, Any]) -> dict[str, Any]:
    st = State()
    c = client_for(spec, st)
    connect(c, spec, clean=True, expiry=int(spec.get("session_expiry", 600)))
    wait(st.connected, st, "connect", c)
    check(c.subscribe(spec["filter"], qos=1)[0], "subscribe")
    wait(st.subscribed, st, "subscribe", c)
    c.disconnect()
    c.loop(0.1)
    return {"ok": True}


def mode_drain(spec: dict[str, Any]) -> dict[str, Any]:
    st = State()
    expect = int(spec["expect"])
    c = client_for(spec, st)

    def on_message(client: paho.Client, s: State, msg: paho.MQTTMessage) -> None:
        s.count += 1
        if s.count == 1:
            s.first_ns = time.time_ns()
            s.cpu_first = time.process_time()
        s.last_ns = time.time_ns()

    c.on_message = on_message
    t_connect = time.time_ns()
    connect(c, spec, clean=False, expiry=int(spec.get("session_expiry", 600)))
    wait(st.connected, st, "connect", c)
    idle_s = float(spec.get("idle_s", 5.0))
    deadline = time.monotonic() + float(spec.get("timeout_s", 300.0))
    last_count, last_change = 0, time.monotonic()
    while st.count < expect and time.monotonic() < deadline:
        c.loop(0.2)
        if st.count != last_count:
            last_count, last_change = st.count, time.monotonic()
        elif time.monotonic() - last_change > idle_s and (st.count or time.monotonic() - last_change > 30):
            break
    st.cpu_last = time.process_time()
    for _ in range(5):  # let the last PUBACKs out
        c.loop(0.02)
    drop_session(c)
    dur = (st.last_ns - st.first_ns) / 1e9
    return {"count": st.count, "expect": expect, "first_ns": st.first_ns, "last_ns": st.last_ns,
            "connect_ns": t_connect, "drain_s": dur, "cpu_s": st.cpu_last - st.cpu_first,
            "rate": (st.count - 1) / dur if dur > 0 else 0.0}


def mark(st: State, dev: str, epoch: int, counter: int) -> None:
    bm = st.seen.get((dev, epoch))
    if bm is None:
        bm = st.seen[(dev, epoch)] = bytearray(4096)
    if counter >= len(bm):
        bm.extend(bytes(max(counter + 1 - len(bm), len(bm))))
    if bm[counter]:
        st.dups += 1
    else:
        bm[counter] = 1
        st.distinct += 1


def mode_observe(spec: dict[str, Any]) -> dict[str, Any]:
    st = State()
    parse = spec["parse"]
    keep_latency = bool(spec.get("latency", True))
    c = client_for(spec, st)
    if parse == "raw":
        unpack = struct.Struct("<Q").unpack_from

        def on_message(client: paho.Client, s: State, msg: paho.MQTTMessage) -> None:
            now = time.time_ns()
            s.count += 1
            s.distinct += 1
            if s.count == 1:
                s.first_ns = now
            s.last_ns = now
            if keep_latency:
                sched = unpack(msg.payload)[0]
                s.sched.append(sched)
                s.lat.append(now - sched)
    else:
        parse_batch = pb.ResultBatch.FromString

        def on_message(client: paho.Client, s: State, msg: paho.MQTTMessage) -> None:
            now = time.time_ns()
            batch = parse_batch(msg.payload)
            s.batches += 1
            if s.count == 0:
                s.first_ns = now
                s.first_batch = len(batch.results)
            s.last_ns = now
            for r in batch.results:
                s.count += 1
                mark(s, r.device_id, r.epoch, r.counter)
                if keep_latency:
                    sched = r.window_start_ns + WINDOW_NS
                    s.sched.append(sched)
                    s.lat.append(now - sched)

    c.on_message = on_message
    connect(c, spec, clean=True, expiry=0)
    c.loop_start()
    wait(st.connected, st, "connect")
    check(c.subscribe(spec["filter"], qos=1)[0], "subscribe")
    wait(st.subscribed, st, "subscribe")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    expect: int | None = None
    idle_s = float(spec.get("idle_s", 10.0))
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "stop":
            break
        if words[0] == "expect":
            expect = int(words[1])
            last, last_change = -1, time.monotonic()
            while st.distinct < expect:
                time.sleep(0.05)
                if st.distinct != last:
                    last, last_change = st.distinct, time.monotonic()
                elif time.monotonic() - last_change > idle_s:
                    break
            break
    c.loop_stop()
    c.disconnect()
    out: dict[str, Any] = {
        "count": st.count, "distinct": st.distinct, "dups": st.dups, "batches": st.batches,
        "first_ns": st.first_ns, "last_ns": st.last_ns, "expect": expect, "first_batch": st.first_batch,
    }
    if keep_latency and st.lat:
        out["latency_ms"] = percentiles(st.sched, st.lat, float(spec.get("warmup_s", 0.0)))
    return out


def percentiles(sched: list[int], lat: list[int], warmup_s: float) -> dict[str, float]:
    s = np.asarray(sched, dtype=np.int64)
    lt = np.asarray(lat, dtype=np.int64) / 1e6
    keep = s >= s.min() + int(warmup_s * 1e9)
    if keep.sum() >= 100:
        lt = lt[keep]
    return {"n": int(lt.size), "p50": float(np.percentile(lt, 50)), "p99": float(np.percentile(lt, 99)),
            "p999": float(np.percentile(lt, 99.9)), "max": float(lt.max()), "mean": float(lt.mean())}


def mode_echo(spec: dict[str, Any]) -> dict[str, Any]:
    """Like the gateway's network thread: one paho loop, the republish queued from on_message."""
    st = State()
    c = client_for(spec, st)
    out_topic = spec["out_topic"]

    def on_message(client: paho.Client, s: State, msg: paho.MQTTMessage) -> None:
        s.count += 1
        client.publish(out_topic, msg.payload, qos=1)

    c.on_message = on_message
    c.max_inflight_messages_set(1000)
    connect(c, spec, clean=True, expiry=0)
    wait(st.connected, st, "connect", c)
    check(c.subscribe(spec["filter"], qos=1)[0], "subscribe")
    wait(st.subscribed, st, "subscribe", c)
    stop = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.split()[:1] == ["stop"]:
                break
        stop.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while not stop.is_set():
        c.loop(0.05)
    for _ in range(10):
        c.loop(0.02)
    c.disconnect()
    return {"count": st.count}


def mosquitto_sub_argv(spec: dict[str, Any], *, expiry: int, extra: list[str]) -> list[str]:
    """`mosquitto_sub` with the paho clients' settings: MQTT 5, mutual TLS, QoS 1, TCP_NODELAY, the same
    receive maximum, resuming the persistent session `client_id` (-c: clean start false)."""
    exe = shutil.which("mosquitto_sub")
    if exe is None:
        raise SystemExit("mosquitto_sub not found (apt install mosquitto-clients; scripts/bootstrap.sh does)")
    tls = tls_for(Path(spec["home"]), spec["who"])
    argv = [exe, "-h", "127.0.0.1", "-p", str(spec["port"]), "-V", "mqttv5", "-q", "1", "-c",
            "-x", str(expiry), "-i", spec["client_id"], "-t", spec["filter"], "--nodelay",
            "--cafile", str(tls.ca_file), "--cert", str(tls.cert_file), "--key", str(tls.key_file)]
    if spec.get("receive_maximum"):
        argv += ["-D", "connect", "receive-maximum", str(int(spec["receive_maximum"]))]
    return argv + extra


# One byte per message: -F prints the format for each message (no payload: the binary payload could
# hold newlines) and -N leaves out the newline, so the byte count read from the pipe is the message count.
_ONE_BYTE = ["-F", "x", "-N"]
ACK_GRACE_S = 0.5


def mode_cdrain(spec: dict[str, Any]) -> dict[str, Any]:
    """Drain the session's backlog with `mosquitto_sub`, counting one byte per message.

    Not `-C N`: mosquitto_sub exits right after the Nth message, and mosquitto 2.0.11 runs far past the
    receive maximum (7,190 unacked were seen), so the PUBACKs libmosquitto still had queued were lost
    with the connection and came back as redeliveries. Instead, once N messages are counted the client
    gets ACK_GRACE_S with nothing left to read (its queued PUBACKs go out), then SIGINT (a clean
    DISCONNECT). Then a second connection to the same session counts what the broker still holds for it
    for `verify_s` and ends the session (-x 0): `redelivered` 0 proves every message was acked; bytes
    beyond N (duplicates) are reported as `extra`. Timing: this process reads the pipe about every
    millisecond (mosquitto_sub flushes each message); the rate runs from the first read to the read that
    reached N and leaves out the messages of the first read (like the observer's first batch)."""
    expect = int(spec["expect"])
    timeout_s = float(spec.get("timeout_s", 300.0))
    idle_s = float(spec.get("idle_s", 10.0))
    argv = mosquitto_sub_argv(spec, expiry=int(spec.get("session_expiry", 600)), extra=_ONE_BYTE)
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t_connect = time.time_ns()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    count, first_read, first_ns, last_ns = 0, 0, 0, 0
    deadline = time.monotonic() + timeout_s
    last_change = time.monotonic()
    while count < expect and time.monotonic() < deadline and time.monotonic() - last_change < idle_s:
        if not select.select([fd], [], [], 0.5)[0]:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break  # it exited (refused, or a TLS error: see stderr)
        now = time.time_ns()
        if not count:
            first_ns, first_read = now, len(chunk)
        count += len(chunk)
        last_ns, last_change = now, time.monotonic()
        # mosquitto_sub flushes after every message: reading each one would put this process on the
        # CPUs the broker and the C client share. Let the pipe (64 KiB) collect ~1 ms of them.
        time.sleep(0.001)
    counted = count
    time.sleep(ACK_GRACE_S)
    proc.send_signal(signal.SIGINT)
    try:
        rest, err_b = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, err_b = proc.communicate()
    count += len(rest)
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    # The same session again: anything the broker still holds for it was not acked.
    verify = subprocess.run(
        mosquitto_sub_argv(spec, expiry=0, extra=["-W", str(int(spec.get("verify_s", 1))), *_ONE_BYTE]),
        capture_output=True, timeout=60, check=False)
    dur = (last_ns - first_ns) / 1e9
    return {"count": min(count, expect), "extra": max(0, count - expect), "expect": expect,
            "first_ns": first_ns, "last_ns": last_ns, "connect_ns": t_connect, "drain_s": dur, "cpu_s": cpu,
            "first_read": first_read, "rc": proc.returncode, "stderr": err_b.decode(errors="replace")[-500:],
            "redelivered": len(verify.stdout), "rate": (counted - first_read) / dur if dur > 0 else 0.0}


MODES = {"setup": mode_setup, "drain": mode_drain, "observe": mode_observe, "echo": mode_echo,
         "cdrain": mode_cdrain}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    spec = json.loads(args.spec)
    out = MODES[spec["mode"]](spec)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
