"""Backpressure, against a real mosquitto and a real gateway process: a broker backlog far larger than the
gateway's queue is processed without one `overloaded` drop, and the gateway's memory stays bounded.

The backlog is published while the gateway is stopped (its persistent session exists: it ran once), so
the restarted gateway gets it as fast as the broker can push, which mosquitto 2.0.11 does past the
gateway's receive maximum. `queue_max` is set below `max_batch`, so batches never fill by themselves:
before the fix every window past the queue bound was acked and dropped as `overloaded`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import Env, Key, assert_one_result_per_window, metric, running_env

DEVICES = ("dev-1", "dev-2", "dev-3", "dev-4")
PER_DEVICE = 2500
QUEUE_MAX = 32  # below max_batch (64): the queue, not the batch size, decides when a batch goes
RSS_GROWTH_MB = 200  # generous: a held backlog of 10,000 windows would be far less; this catches unbounded


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with running_env(tmp_path, DEVICES) as e:
        yield e


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_broker_backlog_past_the_queue_bound_loses_nothing_and_memory_stays_bounded(env: Env) -> None:
    obs = env.observer()
    gw = env.gateway()  # creates the gateway's persistent session (and its shared subscription)
    assert gw.stop() == 0
    env.gateways.remove(gw)

    devices = [env.device(d) for d in DEVICES]
    sent: set[Key] = set()
    for d in devices:
        sent.update(d.publish(PER_DEVICE))
    assert len(sent) == len(DEVICES) * PER_DEVICE

    gw = env.gateway(start=False)
    conf = gw.config.read_text().replace("queue_max = 8192", f"queue_max = {QUEUE_MAX}")
    assert f"queue_max = {QUEUE_MAX}" in conf
    gw.config.write_text(conf)
    gw.start()
    assert gw.proc is not None
    pid = gw.proc.pid
    base = _rss_mb(pid)
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        missing = obs.wait_for(sent, timeout=45)
    finally:
        done.set()
        sampler.join(5)
    text = gw.scrape()
    overloaded = metric(text, "sgw_gateway_rejections_total", reason="overloaded")
    assert not missing, f"{len(missing)} without a result; overloaded={overloaded}\n{gw.log()[-2000:]}"
    assert assert_one_result_per_window(obs, sent) == 0
    assert overloaded == 0, overloaded
    assert metric(text, "sgw_gateway_results_total") == len(sent)
    assert peak[0] - base < RSS_GROWTH_MB, f"RSS {base:.0f} -> {peak[0]:.0f} MB"
    print(f"\nbackpressure: {len(sent)} windows backlogged, queue_max {QUEUE_MAX}, all answered once, "
          f"0 overloaded, RSS {base:.0f} -> peak {peak[0]:.0f} MB")
