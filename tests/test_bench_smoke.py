"""Smoke run of the end-to-end benchmark: `python benchmarks/run.py --quick` runs and its JSON is sane.

Never a time threshold: the machine is shared. Rates and latencies only have to be positive, ratios to the
ceiling in (0, 2], and nothing may be lost (every window sent to the gateway gets a result, also under
overload).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                       reason="needs mosquitto"),
]


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _latency_ok(lat: dict[str, float] | None) -> bool:
    return bool(lat) and all(_positive(lat[q]) for q in ("p50", "p99", "p999")) and \
        lat["p50"] <= lat["p99"] <= lat["p999"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    argv = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--scale", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: run.py stops its broker, gateways and helpers by pid
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"benchmark --quick did not finish in 400 s: {stdout[-2000:]} {stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert (out / "results.png").stat().st_size > 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.timeout(480)
def test_ceiling_is_measured(results: dict) -> None:
    c = results["ceiling"]
    assert results["meta"]["payload_bytes"] > 800  # a sealed 128x3 int16 window
    assert _positive(c["drain"]["rate"]) and c["drain"]["lost"] == 0
    # The physical ceiling: mosquitto_sub counted exactly the backlog, and acked all of it (a second
    # connection to its session got nothing redelivered).
    cd = c["drain_c"]
    assert cd["client"] == "c" and cd["exit_code"] == 0, cd
    assert _positive(cd["rate"]) and cd["received"] == cd["n"] and cd["redelivered"] == cd["extra"] == 0, cd
    for hops in ("one_hop", "two_hop"):
        for rate in ("1000", "5000"):
            assert c[hops][rate]["lost"] == 0
            assert _latency_ok(c[hops][rate]["latency_ms"])


@pytest.mark.timeout(480)
def test_gateway_path_is_measured(results: dict) -> None:
    s = results["sgw"]
    assert _positive(s["drain"]["rate"]) and s["drain"]["lost"] == 0
    assert _positive(s["drain"]["gateway_cpu_s_per_1000"])
    for key in ("1000", "5000", "80pct"):
        assert s["latency"][key]["lost"] == 0, s["latency"][key]
        assert _latency_ok(s["latency"][key]["latency_ms"])
    assert _latency_ok(results["ceiling"]["two_hop"]["80pct"]["latency_ms"])
    assert results["rss"], "gateway RSS was sampled"


@pytest.mark.timeout(480)
def test_scale_phases_are_measured(results: dict) -> None:
    raw2 = results["ceiling"]["drain_x2"]
    two, w2 = results["sgw"]["drain_x2"], results["sgw"]["drain_workers2"]
    assert raw2["lost"] == 0 and two["lost"] == 0 and w2["lost"] == 0, (raw2, two, w2)
    assert all(n > 0 for n in raw2["per_subscriber"]), raw2["per_subscriber"]
    (per_worker,) = w2["messages_per_worker"]
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker), "both workers got a share"
    assert _positive(w2["rate"]) and _positive(w2["gateway_cpu_s_per_1000"])
    for name in ("workers2_over_one_worker", "workers2_over_two_raw", "scale_two_gateways_over_two_raw"):
        assert name in results["ratios"], name


@pytest.mark.timeout(480)
def test_postgresql_phases_are_measured(results: dict) -> None:
    """One and three instances on a durable PostgreSQL (the fleet moved there by `sgw store copy`): each
    window one result, latency measured, and the store's own CPU and commits counted."""
    from tests.support.postgres import missing_reason

    if missing_reason() is not None:
        assert any("PostgreSQL" in m for m in results["missing"])  # said, not silently absent
        pytest.skip(missing_reason() or "")
    pg = results["sgw"]["postgres"]
    for k in (1, 3):
        d = pg[f"drain_x{k}"]
        assert d["lost"] == 0 and d["dups"] == 0 and _positive(d["rate"]), d
        assert _positive(d["db_cpu_s_per_1000"]), d
        for rate in ("1000", "5000"):
            run = pg[f"latency_x{k}"][rate]
            assert run["lost"] == 0 and _latency_ok(run["latency_ms"]), run
            assert run["db"]["commits"] > 0 and run["db"]["wal_bytes"] > 0, run["db"]
        assert f"postgres_x{k}_over_sqlite_one" in results["ratios"]


@pytest.mark.timeout(480)
def test_overload_loses_nothing(results: dict) -> None:
    o = results["sgw"]["overload"]
    assert o["sent"] > 0
    assert _positive(o["gateway_rss_mb"]["max"])
    # Every window offered above capacity still gets its result: the gateway paces its reads and the
    # broker keeps the backlog (it shed `overloaded` before 0323a59; docs/PERFORMANCE.md).
    assert o["lost"] == 0, f"lost {o['lost']} of {o['sent']}; gateway rejections {o.get('rejections')}"


@pytest.mark.timeout(480)
def test_ratios_are_sane(results: dict) -> None:
    ratios = results["ratios"]
    assert "throughput_sgw_over_raw_drain" in ratios and "throughput_sgw_over_c_drain" in ratios
    for name, value in ratios.items():
        # The overload phase aims at 2x the measured capacity, so its ratio sits near 2 either side; every
        # other ratio compares sgw with a ceiling (or one instance) measured in the same run.
        # Three instances on one PostgreSQL against one SQLite instance may reach 3.
        bound = 3.0 if name in ("overload_offered_over_capacity", "postgres_x3_over_sqlite_one") else 2.0
        assert _positive(value) and value <= bound, (name, value)
    assert results["latency_ratios"]  # raw two-hop / sgw at the same rate: unbounded, only positive
    assert all(_positive(v) for v in results["latency_ratios"].values())
    assert results["targets"], "every target from the issue is reported"
    for t in results["targets"]:
        assert isinstance(t["met"], bool) and _positive(t["limit"])
