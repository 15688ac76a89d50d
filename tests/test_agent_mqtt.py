"""The agent end to end with a real mosquitto: normal run, broker outage, SIGKILL and restart.

The subscriber is the gateway's identity opening messages with the core Opener and the gateway's e2e
key, so "arrived" means "authenticated and fresh", exactly what the gateway would accept.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gateway.core.codec import decode_samples
from gateway.pb import messages_pb2 as pb
from gateway.sim.generator import Machine
from tests.conftest import SgwEnv
from tests.support.agent import (
    agent_toml,
    check_delivery,
    collecting,
    read_ledger,
    running_agent,
    wait_for,
)

DEV = "dev-0001"
ALL_BEARING = [{"at_s": 0.0, "duration_s": 1e6, "fault": "bearing"}]

# The collector stands in for the gateway here and sends no receipts: these agents delete on PUBACK, the
# rule they had before receipts (the receipt path is tested against the real gateway, test_receipts.py).
NO_GATEWAY = {"delete_on": "puback"}


def test_normal_run_every_forwarded_window_opens(sgw_env: SgwEnv, tmp_path: Path) -> None:
    """A healthy stream with two fault episodes: summaries and anomalies arrive, open, decode; SIGTERM
    flushes, publishes DEATH and exits 0."""
    device = "dev-0002"
    faults = [{"at_s": 4.0, "duration_s": 1.0, "fault": "imbalance"},
              {"at_s": 12.0, "duration_s": 0.5, "fault": "bearing"}]
    cfg = agent_toml(sgw_env.prov, device, tmp_path, outbox=NO_GATEWAY,
                     source={"speed": 0.0, "faults": faults}, filter={"summary_interval_s": 1.0})
    ledger = tmp_path / "ledger.jsonl"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.2)
    notes: list[str] = []
    stop_reading = threading.Event()

    def read_notes() -> None:
        # Read continuously, as systemd does: a full socket queue would block the agent's sd_notify.
        while not stop_reading.is_set():
            with contextlib.suppress(TimeoutError):
                notes.append(notify.recv(4096).decode())

    reader = threading.Thread(target=read_notes, daemon=True)
    reader.start()
    systemd_env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    with notify, _joined(reader, stop_reading), collecting(sgw_env.prov, sgw_env.port) as col, \
            running_agent(cfg, tmp_path / "agent.log", "--ledger", str(ledger), "--max-windows", "250",
                          "--keep-running", env=systemd_env) as agent:
        wait_for(lambda: len(read_ledger(ledger)) >= 1 and "source ended" in agent.log(), 60, "source end",
                 agent=agent)
        entries = read_ledger(ledger)
        wait_for(lambda: len(col.windows()) >= len(entries), 30, "all windows")
        assert agent.stop() == 0, agent.log()[-2000:]
        wait_for(lambda: any(s.plaintext.status.state == pb.DeviceStatus.STATE_DEATH
                             for s in col.statuses()), 10, "DEATH")
        entries = read_ledger(ledger)
        got = [r for r in col.windows() if r.device_id == device]
        check_delivery(entries, got)
        reasons = {e["reason"] for e in entries}
        assert reasons == {"anomaly", "summary"}, reasons
        anomalies = {e["label"] for e in entries if e["reason"] == "anomaly"}
        assert {"imbalance", "bearing"} <= anomalies
        for r in got:
            x = decode_samples(r.plaintext.window)
            assert x.shape == (128, 3) and np.isfinite(x).all()
        states = [s.plaintext.status.state for s in col.statuses() if s.device_id == device]
        assert states[0] == pb.DeviceStatus.STATE_BIRTH and states[-1] == pb.DeviceStatus.STATE_DEATH
        assert states.count(pb.DeviceStatus.STATE_DEATH) == 1, "a clean DISCONNECT must discard the will"
        assert not col.reject_reasons(), col.reject_reasons()
        wait_for(lambda: "STOPPING=1" in notes, 5, "STOPPING=1")
        assert notes[0].startswith("READY=1") and "STOPPING=1" in notes and "WATCHDOG=1" in notes, notes
        for line in agent.log().splitlines():
            if line.startswith("INFO: Created TensorFlow Lite"):  # LiteRT's own C++ log line
                continue
            event = json.loads(line)  # --log-format json: one JSON event per line, nothing else
            assert {"ts", "level", "logger", "msg"} <= set(event)
        print(f"\nnormal run: {len(entries)} forwarded of 250 windows, all opened; statuses {len(states)}")


@contextlib.contextmanager
def _joined(thread: threading.Thread, stop: threading.Event) -> Iterator[None]:
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


OUTAGE_S = 10.0  # issue 5: the broker is down for 10 s


def test_broker_outage_replays_everything_in_order(make_env, tmp_path: Path) -> None:
    """The broker is down for 10 s of wall-clock time while the agent keeps forwarding (~100 windows/s):
    every window forwarded before, during and after the outage arrives, none twice once the opener has
    dropped replays, in order per device."""
    env: SgwEnv = make_env([DEV])
    cfg = agent_toml(env.prov, DEV, tmp_path, outbox=NO_GATEWAY,
                     source={"speed": 8.0, "faults": ALL_BEARING})
    ledger = tmp_path / "ledger.jsonl"
    # 2400 windows at ~100/s: the source is still producing when the broker comes back after 10 s.
    with collecting(env.prov, env.port) as col, \
            running_agent(cfg, tmp_path / "agent.log", "--ledger", str(ledger), "--max-windows", "2400",
                          "--max-publish-rate", "1000", "--flush-timeout-s", "60") as agent:
        wait_for(lambda: len(col.windows()) >= 100, 60, "first windows", agent=agent)
        env.broker.stop()
        down_at = time.monotonic()
        before = len(read_ledger(ledger))
        # The outage is bounded by time, not by a window count.
        while (left := OUTAGE_S - (time.monotonic() - down_at)) > 0:
            time.sleep(left)
        during = len(read_ledger(ledger)) - before
        assert agent.proc.poll() is None, "the agent exited during the outage:\n" + agent.log()[-3000:]
        env.broker.start()
        outage_s = time.monotonic() - down_at
        assert during > 0, "no window was forwarded while the broker was down"
        assert agent.wait(180) == 0, agent.log()[-3000:]
        entries = read_ledger(ledger)
        assert len(entries) > before + during, "no window was forwarded after the broker came back"
        wait_for(lambda: len(col.windows()) >= len(entries), 60, "backlog delivered")
        check_delivery(entries, col.windows())
        rejected = col.reject_reasons()
        assert set(rejected) <= {"replay"}, rejected
        print(f"\noutage: {outage_s:.1f} s, {during}+ windows forwarded while the broker was down; "
              f"{len(entries)} total, "
              f"all delivered once; {len(rejected)} duplicate replays dropped by the opener")


def test_sigkill_and_restart_loses_nothing_and_reuses_no_nonce(make_env, tmp_path: Path) -> None:
    env: SgwEnv = make_env([DEV])
    cfg = agent_toml(env.prov, DEV, tmp_path, outbox=NO_GATEWAY,
                     source={"speed": 8.0, "faults": ALL_BEARING})
    ledger = tmp_path / "ledger.jsonl"
    with collecting(env.prov, env.port) as col:
        with running_agent(cfg, tmp_path / "agent1.log", "--ledger", str(ledger),
                           "--max-publish-rate", "1000") as first:
            wait_for(lambda: len(col.windows()) >= 150, 60, "first windows", agent=first)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
        killed_at = len(read_ledger(ledger))
        with sqlite3.connect(tmp_path / f"{DEV}-outbox.db") as db:
            queued = set(db.execute("SELECT epoch, counter FROM messages"))
        with running_agent(cfg, tmp_path / "agent2.log", "--ledger", str(ledger), "--max-windows", "200",
                           "--max-publish-rate", "1000", "--flush-timeout-s", "60") as second:
            assert second.wait(120) == 0, second.log()[-3000:]
        entries = read_ledger(ledger)
        wait_for(lambda: len(col.windows()) >= len(entries), 60, "everything delivered")
        got = col.windows()
        check_delivery(entries, got)
        with col._lock:
            opened = {(r.epoch, r.counter) for r in col.accepted}
        assert queued and queued <= opened, f"{len(queued - opened)} messages queued at SIGKILL never arrived"
        epochs = sorted({r.epoch for r in got})
        assert len(epochs) == 2, epochs
        wills = [r for r in col.statuses()
                 if r.epoch == epochs[0] and r.plaintext.status.state == pb.DeviceStatus.STATE_DEATH]
        assert len(wills) == 1, "the killed session's sealed will must arrive and open"
        rejected = col.reject_reasons()
        assert set(rejected) <= {"replay"}, rejected
        print(f"\ncrash: {len(queued)} messages queued and {killed_at} ledger lines at SIGKILL; "
              f"{len(entries)} ledger lines after restart, "
              f"{len(got)} accepted once each over epochs {epochs}; {len(rejected)} duplicates dropped")


def test_replay_recording_forwards_its_fault(sgw_env: SgwEnv, tmp_path: Path) -> None:
    """A .npy recording (healthy, then a bearing fault) replayed at full speed through the real agent."""
    device = "dev-0004"
    healthy = Machine(21)
    faulty = Machine(21, schedule=[(0.0, 1e6, "bearing")])
    windows = [healthy.next_window(i * 0.08)[0] for i in range(60)]
    windows += [faulty.next_window(i * 0.08)[0] for i in range(20)]
    np.save(tmp_path / "rec.npy", np.concatenate(windows))
    cfg = agent_toml(sgw_env.prov, device, tmp_path, outbox=NO_GATEWAY,
                     source={"type": "replay", "path": str(tmp_path / "rec.npy"), "speed": 0.0})
    ledger = tmp_path / "ledger.jsonl"
    with collecting(sgw_env.prov, sgw_env.port) as col, \
            running_agent(cfg, tmp_path / "agent.log", "--ledger", str(ledger)) as agent:
        assert agent.wait(60) == 0, agent.log()[-2000:]
        entries = read_ledger(ledger)
        wait_for(lambda: len([r for r in col.windows() if r.device_id == device]) >= len(entries), 30,
                 "replayed windows")
        check_delivery(entries, [r for r in col.windows() if r.device_id == device])
    assert all(e["label"] is None for e in entries)  # a recording carries no truth
    # A fresh outbox numbers windows from 0, so the recording's faulty tail is window_seq 60-79.
    anomalies = [e["window_seq"] for e in entries if e["reason"] == "anomaly"]
    in_fault = [q for q in anomalies if q >= 60]
    assert len(in_fault) >= 15 and len(anomalies) - len(in_fault) <= 3, entries
    print(f"\nreplay: 80 windows, anomalies forwarded: {len(in_fault)} of the 20 faulty, "
          f"{len(anomalies) - len(in_fault)} of the 60 healthy")


def test_windows_nobody_received_are_kept_until_a_subscriber_appears(make_env, tmp_path: Path) -> None:
    """PUBACK 0x10 (no matching subscribers: the gateway is down or not yet resubscribed) is not delivery:
    the windows stay in the outbox and are replayed once someone listens."""
    env: SgwEnv = make_env([DEV])
    cfg = agent_toml(env.prov, DEV, tmp_path, outbox=NO_GATEWAY,
                     source={"speed": 8.0, "faults": ALL_BEARING})
    ledger = tmp_path / "ledger.jsonl"
    with running_agent(cfg, tmp_path / "agent.log", "--ledger", str(ledger), "--max-windows", "300",
                       "--max-publish-rate", "1000", "--flush-timeout-s", "60") as agent:
        wait_for(lambda: "no subscriber on the device topic" in agent.log(), 60, "an unheard PUBACK",
                 agent=agent)
        with collecting(env.prov, env.port) as col:
            assert agent.wait(120) == 0, agent.log()[-3000:]
            entries = read_ledger(ledger)
            wait_for(lambda: len(col.windows()) >= len(entries), 60, "the kept windows")
            check_delivery(entries, col.windows())
    assert len(entries) == 300
    print(f"\nunheard: {len(entries)} windows forwarded before and after the subscriber came, all delivered")
