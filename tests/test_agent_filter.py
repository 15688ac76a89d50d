"""The agent's filter on simulated data, in-process with the real prefilter (LiteRT) and a real outbox.

Healthy machines: at most 5% of windows forwarded beyond the periodic summaries. Injected faults: every
episode produces at least one forwarded anomaly. The figures are printed (run with -s).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.agent.config import AgentConfig, DeviceSection, E2eKeys, E2eSection, MqttSection, OutboxSection
from gateway.agent.metrics import AgentMetrics
from gateway.agent.outbox import Outbox
from gateway.agent.service import Agent
from gateway.agent.sources import SimulatedSource
from gateway.core import keys
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener
from gateway.inference.engine import Prefilter, load_prefilter
from gateway.pb import messages_pb2 as pb
from gateway.sim.generator import FAULTS

SUMMARY_S = 10.0
PERIOD_S = 128 / 1600


@pytest.fixture(scope="module")
def prefilter() -> Prefilter:
    return load_prefilter(accelerator="cpu")


def _agent(tmp_path: Path, prefilter: Prefilter, source: SimulatedSource, name: str,
           gateway: X25519PrivateKey | None = None) -> Agent:
    nowhere = Path("/nonexistent")
    cfg = AgentConfig(
        device=DeviceSection(id="dev-filter"),
        mqtt=MqttSection(host="127.0.0.1", ca_file=nowhere, cert_file=nowhere, key_file=nowhere),
        e2e=E2eSection(device_key_file=nowhere, gateway_public_key_file=nowhere),
        outbox=OutboxSection(path=tmp_path / f"{name}.db"),
    )
    cfg = AgentConfig(**{**cfg.__dict__, "filter": type(cfg.filter)(summary_interval_s=SUMMARY_S)})
    gateway = gateway or keys.generate()
    e2e = E2eKeys(device_key=keys.generate(), gateway_public=keys.public_bytes(gateway))
    outbox = Outbox(cfg.outbox.path, max_bytes=1 << 30, max_age_s=3600, policy="drop_oldest")
    return Agent(cfg, e2e=e2e, scorer=prefilter, source=source, outbox=outbox,
                 metrics=AgentMetrics("vibration"))


def _run(agent: Agent, source: SimulatedSource) -> list[tuple[str | None, str | None]]:
    async def go() -> list[tuple[str | None, str | None]]:
        return [(agent.process(c), c.label) async for c in source.windows()]

    try:
        return asyncio.run(go())
    finally:
        agent.outbox.close()


def test_healthy_data_forwards_at_most_five_percent(tmp_path: Path, prefilter: Prefilter) -> None:
    total = Counter[str]()
    n_per_seed = 1500
    for seed in (1, 2, 3, 4):
        source = SimulatedSource(seed=seed, sample_rate_hz=1600.0, window=128, speed=0.0,
                                 max_windows=n_per_seed)
        out = _run(_agent(tmp_path, prefilter, source, f"healthy{seed}"), source)
        total.update(str(reason) for reason, _ in out)
    n = 4 * n_per_seed
    anomaly_rate = total["anomaly"] / n
    expected_summaries = n / (SUMMARY_S / PERIOD_S)
    print(f"\nhealthy: {n} windows ({n * PERIOD_S / 60:.0f} min of signal), "
          f"anomaly-forwarded {total['anomaly']} "
          f"({anomaly_rate:.2%}), summaries {total['summary']} (~{expected_summaries:.0f} expected), "
          f"kept on device {total['None']}")
    assert anomaly_rate <= 0.05
    assert abs(total["summary"] - expected_summaries) <= 8


def test_every_injected_fault_is_forwarded(tmp_path: Path, prefilter: Prefilter) -> None:
    faults = [f for f in FAULTS if f != "healthy"]
    episode_s, gap_s = 0.5, 4.0
    schedule = [((i + 1) * gap_s, episode_s, f) for i, f in enumerate(faults)]
    windows = int(((len(faults) + 1) * gap_s) / PERIOD_S)
    detected: dict[str, list[str]] = {}
    for seed in (11, 12, 13):
        source = SimulatedSource(seed=seed, sample_rate_hz=1600.0, window=128, speed=0.0, faults=schedule,
                                 max_windows=windows)
        out = _run(_agent(tmp_path, prefilter, source, f"faults{seed}"), source)
        for fault in faults:
            got = [r for r, label in out if label == fault]
            hits = sum(r == "anomaly" for r in got)
            detected.setdefault(fault, []).append(f"{hits}/{len(got)}")
            assert hits >= 1, f"seed {seed}: {fault} episode produced no forwarded window"
    print("\nfaults (forwarded/windows per 0.5 s episode, seeds 11-13): "
          + ", ".join(f"{f} {' '.join(v)}" for f, v in detected.items()))


def test_outbox_holds_sealed_windows_the_gateway_opens(tmp_path: Path, prefilter: Prefilter) -> None:
    """Sealed at accept time: what sits in the outbox opens with the gateway key, in window_seq order."""
    source = SimulatedSource(seed=5, sample_rate_hz=1600.0, window=128, speed=0.0,
                             faults=[(0.0, 1.0, "imbalance")], max_windows=20)
    gateway = keys.generate()
    agent = _agent(tmp_path, prefilter, source, "sealed", gateway)
    device_public = keys.public_bytes(agent._e2e.device_key)
    reasons = [r for r, _ in asyncio.run(_collect(agent, source))]
    assert reasons[:12] == ["anomaly"] * 12
    opener = Opener(gateway_keys={1: gateway},
                    lookup=lambda _id: DeviceKeys("active", {1: KeyEntry(device_public)}))
    rows = agent.outbox.after(0, 100)
    agent.outbox.close()
    assert len(rows) == agent.forwarded >= 12
    seqs = []
    for row in rows:
        opened = opener.open(row.payload, time.time_ns())
        assert isinstance(opened, Opened), opened
        assert (opened.epoch, opened.counter) == (row.epoch, row.counter) == (agent.epoch, opened.counter)
        w = pb.Plaintext.FromString(opened.plaintext).window
        assert w.prefilter_version == "" and w.reason == pb.FORWARD_REASON_ANOMALY
        assert prefilter.is_anomalous(w.prefilter_score)
        seqs.append(w.window_seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def _collect(agent: Agent, source: SimulatedSource) -> list[tuple[str | None, str | None]]:
    return [(agent.process(c), c.label) async for c in source.windows()]


def test_will_is_left_out_while_a_backlog_could_fall_out_of_the_replay_window(
        tmp_path: Path, prefilter: Prefilter) -> None:
    source = SimulatedSource(seed=6, sample_rate_hz=1600.0, window=128, speed=0.0,
                             faults=[(0.0, 1e6, "bearing")], max_windows=1100)
    agent = _agent(tmp_path, prefilter, source, "will")
    try:
        assert agent._will_is_safe()  # empty outbox
        asyncio.run(_collect(agent, source))
        assert agent.outbox.messages == 1100
        assert not agent._will_is_safe()  # a will's counter would be 1100 past the oldest queued one
        for row in agent.outbox.after(0, 200):
            agent.outbox.ack(row.id)
        agent.outbox.commit_acks()
        assert agent._will_is_safe()  # 900 queued: a will published mid-replay keeps them in the window
        agent.outbox.put(b"old session", created_ns=0, epoch=agent.epoch - 1, counter=0)
        assert not agent._will_is_safe()  # an older session must go first
    finally:
        agent.outbox.close()
