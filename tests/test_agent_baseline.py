"""Commissioning on the agent (gateway/agent/baseline.py): learn, persist atomically, refuse damage, survive
SIGKILL, and gate the real filter loop with the learned baseline."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.agent import baseline
from gateway.agent.baseline import BaselineFileError, CommissioningScorer
from gateway.agent.config import (
    AgentConfig,
    CommissionSection,
    DeviceSection,
    E2eKeys,
    E2eSection,
    FilterSection,
    MqttSection,
    OutboxSection,
)
from gateway.agent.metrics import AgentMetrics
from gateway.agent.outbox import Outbox
from gateway.agent.service import Agent
from gateway.agent.sources import Captured
from gateway.core import keys
from gateway.pb import messages_pb2 as pb
from gateway.sim.physical import Fleet

N = 120  # commissioning windows: enough for the 74-feature baseline, small enough for a fast test


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet(4321, 2)


def _commissioned(path: Path, fleet: Fleet) -> CommissioningScorer:
    s = CommissioningScorer(path, windows=N)
    for w in fleet.windows(0, "healthy", N):
        assert s.commissioning and not s.is_anomalous(s.score(w))
    return s


def test_commissions_then_gates_and_reloads(tmp_path: Path, fleet: Fleet) -> None:
    path = tmp_path / "outbox.db.baseline"
    s = CommissioningScorer(path, windows=N)
    assert s.progress == 0.0 and not path.exists()
    for i, w in enumerate(fleet.windows(0, "healthy", N)):
        assert not s.is_anomalous(s.score(w))  # no anomaly forwarded while learning
        assert s.progress == pytest.approx(1.0 if i == N - 1 else (i + 1) / N)
    assert not s.commissioning and path.is_file()
    faulty = [s.is_anomalous(s.score(w)) for w in fleet.windows(0, "imbalance", 30, stream=1)]
    assert np.mean(faulty) >= 0.9
    again = CommissioningScorer(path, windows=N)
    assert not again.commissioning and again.baseline is not None
    assert again.baseline.threshold == s.baseline.threshold  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "huge"])
def test_damaged_file_is_refused_naming_it_and_recommissioned(tmp_path: Path, fleet: Fleet, damage: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "b.baseline"
    _commissioned(path, fleet)
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-3] ^= 1
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "huge":
        blob = blob + bytearray(baseline.MAX_BYTES)
    else:
        blob = bytearray(b"not a baseline")
    path.write_bytes(bytes(blob))
    with pytest.raises(BaselineFileError, match=re.escape(str(path))):
        baseline.load(path)
    with caplog.at_level(logging.WARNING, logger="sgw.agent.baseline"):
        s = CommissioningScorer(path, windows=N)
    assert s.commissioning
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and str(path) in lines[0] and "\n" not in lines[0], lines


def test_recommission_forgets_the_baseline(tmp_path: Path, fleet: Fleet) -> None:
    path = tmp_path / "b.baseline"
    s = _commissioned(path, fleet)
    s.recommission()
    assert s.commissioning and s.progress == 0.0 and not path.exists()


_KILL_ME = """
import sys
from pathlib import Path
from gateway.agent.baseline import CommissioningScorer
from gateway.sim.physical import Fleet
ws = Fleet(4321, 1).windows(0, "healthy", 60)
s = CommissioningScorer(Path(sys.argv[1]), windows=60)
print("ready", flush=True)
while True:  # commission over and over: a kill lands in collection, fitting or writing
    s.recommission()
    for w in ws:
        s.score(w)
"""


def test_sigkill_midway_never_leaves_half_a_baseline(tmp_path: Path) -> None:
    path = tmp_path / "k.baseline"
    for delay in (0.3, 0.9, 1.7):
        p = subprocess.Popen([sys.executable, "-c", _KILL_ME, str(path)], stdout=subprocess.PIPE)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
            time.sleep(delay)
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        # either no baseline (start over) or a whole one; never a refused, half-written file
        b = baseline.load(path)
        assert b is None or b.n_windows == 60
        assert not CommissioningScorer(path, windows=60).commissioning or b is None


class _Windows:
    kind = "vibration"
    sample_rate_hz = 1600.0
    window = 128

    def __init__(self, x: np.ndarray, labels: list[str]) -> None:
        self._x, self._labels = x, labels

    async def windows(self):  # type: ignore[no-untyped-def]
        for i, (w, lab) in enumerate(zip(self._x, self._labels, strict=True)):
            yield Captured(i * 80_000_000, w, lab)


def test_agent_forwards_no_anomaly_while_commissioning_then_only_faults(tmp_path: Path, fleet: Fleet) -> None:
    nowhere = Path("/nonexistent")
    mqtt = MqttSection(host="127.0.0.1", ca_file=nowhere, cert_file=nowhere, key_file=nowhere)
    cfg = AgentConfig(device=DeviceSection(id="dev-commission"), mqtt=mqtt,
                      e2e=E2eSection(device_key_file=nowhere, gateway_public_key_file=nowhere),
                      outbox=OutboxSection(path=tmp_path / "o.db"),
                      # a summary every ~12 windows: some are forwarded while it commissions
                      filter=FilterSection(summary_interval_s=1.0),
                      commission=CommissionSection(enabled=True, windows=N))
    assert cfg.baseline_path == tmp_path / "o.db.baseline"
    x = np.concatenate([fleet.windows(0, "healthy", N, stream=3), fleet.windows(0, "bearing", N, stream=4),
                        fleet.windows(0, "healthy", 100, stream=5), fleet.windows(0, "gear", 20, stream=6)])
    labels = ["healthy"] * N + ["bearing"] * N + ["healthy"] * 100 + ["gear"] * 20
    source = _Windows(x, labels)
    gw: X25519PrivateKey = keys.generate()
    scorer = CommissioningScorer(cfg.baseline_path, windows=N)
    agent = Agent(cfg, e2e=E2eKeys(device_key=keys.generate(), gateway_public=keys.public_bytes(gw)),
                  scorer=scorer, source=source,  # type: ignore[arg-type]
                  outbox=Outbox(cfg.outbox.path, max_bytes=1 << 30, max_age_s=3600, policy="drop_oldest"),
                  metrics=AgentMetrics("vibration"))

    st = agent._status(pb.DeviceStatus.STATE_HEARTBEAT).status
    assert st.commissioning and st.commissioning_progress == 0.0
    sealed: list[pb.TelemetryWindow] = []  # what the agent seals, in order (then stored as usual)
    store = agent._seal_store

    def spy(plain: pb.Plaintext) -> int | None:
        sealed.append(plain.window)
        return store(plain)
    agent._seal_store = spy  # type: ignore[method-assign]

    async def go() -> list[str | None]:
        out = []
        async for c in source.windows():
            out.append(agent.process(c))
            if len(out) == N // 2:
                half = agent._status(pb.DeviceStatus.STATE_HEARTBEAT).status
                assert half.commissioning and half.commissioning_progress == pytest.approx(0.5)
        return out

    try:
        reasons = asyncio.run(go())
    finally:
        agent.outbox.close()
    done = agent._status(pb.DeviceStatus.STATE_HEARTBEAT).status
    assert not done.commissioning and done.commissioning_progress == 1.0
    assert "anomaly" not in reasons[:N]  # commissioning: summaries only
    # bearing windows right after commissioning (the learned normal is the first N healthy windows)
    assert reasons[N:2 * N].count("anomaly") >= 0.9 * N
    assert reasons[2 * N:2 * N + 100].count("anomaly") <= 5
    assert reasons[-20:].count("anomaly") >= 18
    # every forwarded window carries the baseline's threshold beside its distance, once there is one
    seqs = [w.window_seq for w in sealed]
    assert seqs == [i for i, r in enumerate(reasons) if r is not None]
    before = [w for w in sealed if w.window_seq < N]
    after = [w for w in sealed if w.window_seq >= N]
    assert before and all(w.baseline_threshold == 0.0 and w.prefilter_score == 0.0 for w in before)
    t = scorer.baseline.threshold if scorer.baseline else 0.0
    assert after and t > 0 and all(w.baseline_threshold == pytest.approx(t) for w in after)
    assert all((w.prefilter_score > t) == (w.reason == pb.FORWARD_REASON_ANOMALY) for w in after)


def test_commission_section_is_checked() -> None:
    from gateway.errors import ConfigError
    with pytest.raises(ConfigError, match=r"commission\.windows"):
        CommissionSection(windows=5)
    with pytest.raises(ConfigError, match=r"commission\.target_false_forward"):
        CommissionSection(target_false_forward=0.9)
