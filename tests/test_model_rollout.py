"""Issue 16 with the real broker, gateway and agents: an agent SIGKILLed right after switching to a release
that fails its self-test comes back on the previous model, counted and reported; `sgw model rollout`
takes a good release to a canary and then to all, and rolls a release that forwards everything back off
its canary by itself."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import scrape
from tests.support.cli import run_cli
from tests.support.ledger import running_system
from tests.support.mosquitto import free_port
from tests.test_model_probation import forward_everything_manifest

pytestmark = pytest.mark.slow  # live agents and gateway

HEALTHY = {"faults": []}  # a healthy machine: the agents forward (almost) nothing


def sgw(*argv: str) -> tuple[int, Any, str]:
    rc, out, err = run_cli(["model", *argv])
    return rc, (json.loads(out) if out.strip() and "--json" in argv else out), err


def make_release(keys: Path, out: Path, version: str, *extra: str) -> Path:
    rc, _info, err = sgw("release", "--model", "prefilter", "--version", version, "--role", "agent",
                        "--kind", "vibration", "--key", str(keys / "release.key"), "--out", str(out), *extra)
    assert rc == 0, err
    return out


def metric(port: int, name: str) -> float:
    try:
        return scrape(port).get(name, -1.0)
    except (urllib.error.URLError, ConnectionError):
        return -1.0  # not up yet


def test_agent_killed_after_a_switch_that_fails_its_selftest_comes_back_on_the_previous_model(
        tmp_path: Path) -> None:
    with running_system(tmp_path, ("dev-k1",)) as system:
        home = system.prov.home
        keys = tmp_path / "keys"
        assert sgw("keygen", "--out", str(keys), "--trust", "--dir", str(home))[0] == 0
        loose = make_release(keys, tmp_path / "loose.sgwrel", "1.1.0", "--manifest",
                             str(forward_everything_manifest(tmp_path)))
        port = free_port()
        # a probation longer than the test: only the restart judges the switch
        model = {"release_public_key_file": str(home / "release.pub"), "probation_windows": 1_000_000}
        system.start_agent("dev-k1", windows=None, speed=2.0, metrics_port=port, model=model, source=HEALTHY)
        system.wait_for(lambda: metric(port, "sgw_agent_windows_seen_total") >= 80, 60,
                        "healthy windows kept")
        rc, rows, err = sgw("deploy", str(loose), "--to", "dev-k1", "--dir", str(home), "--chunk-size",
                            "1024", "--wait", "20", "--json")
        assert rc == 0 and rows[0]["outcome"] == "installed" and rows[0]["version"] == "1.1.0", (rows, err)
        assert metric(port, 'sgw_agent_model_info{model="prefilter",version="1.1.0"}') == 1
        assert metric(port, "sgw_agent_model_probation") == 1
        rc, rows, err = sgw("status", "--to", "dev-k1", "--dir", str(home), "--json")
        assert rc == 0 and rows[0]["model_probation"].endswith("/1000000"), (rows, err)

        system.agents["dev-k1"].kill()  # SIGKILL: no clean stop, the switch unconfirmed on disk
        system.start_agent("dev-k1", windows=None, speed=2.0, metrics_port=port, model=model, source=HEALTHY,
                           run=1)
        system.wait_for(lambda: metric(port, 'sgw_agent_model_info{model="prefilter",version="1.0.0"}') == 1,
                        60, "dev-k1 back on the packaged model")
        m = scrape(port)
        assert m['sgw_agent_model_rollbacks_total{reason="selftest"}'] == 1
        assert m['sgw_agent_model_rollbacks_total{reason="crash_loop"}'] == 0
        assert m["sgw_agent_model_probation"] == 0
        log = system.agents["dev-k1"].log()
        assert "model rolled back by itself" in log and "selftest" in log
        rc, rows, err = sgw("status", "--to", "dev-k1", "--dir", str(home), "--json")
        assert rc == 0, err
        assert rows[0]["model_version"] == "prefilter-1.0.0" and rows[0]["model_probation"] is None
        assert rows[0]["model_rolled_back_from"] == "prefilter-1.1.0"
        assert rows[0]["model_rollback_reason"] == "selftest"


FLEET = ("dev-s1", "dev-s2", "dev-s3", "dev-s4")


def test_rollout_canary_then_all_and_a_bad_release_rolled_back_by_itself(tmp_path: Path) -> None:
    with running_system(tmp_path, FLEET) as system:
        home = system.prov.home
        keys = tmp_path / "keys"
        assert sgw("keygen", "--out", str(keys), "--trust", "--dir", str(home))[0] == 0
        good = make_release(keys, tmp_path / "good.sgwrel", "1.1.0")
        loose = make_release(keys, tmp_path / "loose.sgwrel", "1.2.0", "--manifest",
                             str(forward_everything_manifest(tmp_path)))
        ports = {d: free_port() for d in FLEET}
        # the agents' own probation outlasts the watch: here the rollout's forward-rate check must act
        model = {"release_public_key_file": str(home / "release.pub"), "probation_windows": 1_000_000}
        for d in FLEET:
            system.start_agent(d, windows=None, speed=1.0, metrics_port=ports[d], model=model, source=HEALTHY)
        system.wait_for(lambda: all(metric(ports[d], "sgw_agent_windows_seen_total") >= 20 for d in FLEET),
                        60, "agents up")

        def rollout(release: Path) -> tuple[int, dict[str, Any], str]:
            rc, state, err = sgw("rollout", str(release), "--canary", "25", "--watch", "8", "--min-windows",
                                 "50", "--dir", str(home), "--chunk-size", "1024", "--wait", "20", "--json")
            return rc, state or {}, err

        rc, state, err = rollout(good)
        assert rc == 0 and state["phase"] == "done", (state, err)
        assert len(state["canary"]) == 1 and sorted(state["canary"] + state["rest"]) == list(FLEET)
        health = state["health"]
        assert health["decision"] == "proceed" and health["baseline_from"] == "control", health
        assert health["canary_windows"] >= 50 and health["canary_rate"] <= health["limit"]
        assert set(state["deploy"].values()) == {"installed"}
        for d in FLEET:
            assert metric(ports[d], 'sgw_agent_model_info{model="prefilter",version="1.1.0"}') == 1, d
        rc, rows, err = sgw("status", "--all", "--dir", str(home), "--json")
        assert rc == 0 and {r["model_version"] for r in rows} == {"prefilter-1.1.0"}, (rows, err)
        assert {r["device"]: r["rollout"]["group"] for r in rows} == {
            d: "canary" if d in state["canary"] else "rest" for d in FLEET}
        assert {r["rollout"]["phase"] for r in rows} == {"done"}

        # A release that forwards every window: the canary's forward rate over the watch is far above the
        # rest's on 1.1.0, so the canary is rolled back, and nothing reaches the rest.
        rc, state, err = rollout(loose)
        assert rc == 1 and state["phase"] == "rolled_back", (state, err)
        health = state["health"]
        assert health["decision"] == "rollback" and health["reason"] == "forward_rate", health
        assert health["canary_rate"] > 0.9 and health["baseline_rate"] < 0.05
        canary = state["canary"][0]
        assert state["deploy"] == {canary: "installed"}
        assert state["rollback"] == {canary: "rolled back to 1.1.0"}
        for d in FLEET:
            assert metric(ports[d], 'sgw_agent_model_info{model="prefilter",version="1.1.0"}') == 1, d
        rc, rows, err = sgw("status", "--all", "--dir", str(home), "--json")
        assert rc == 0 and {r["model_version"] for r in rows} == {"prefilter-1.1.0"}, (rows, err)
        assert {r["rollout"]["phase"] for r in rows} == {"rolled_back"}
        assert (home / "rollouts").stat().st_mode & 0o777 == 0o700


DEMO_FLEET = tuple(f"dev-f{i:02d}" for i in range(1, 21))


def test_rollout_reaches_twenty_devices_canary_ten_percent_first(tmp_path: Path) -> None:
    """The issue's acceptance: 20 simulated devices, 10 % canary (2 devices) watched, then the other 18."""
    with running_system(tmp_path, DEMO_FLEET) as system:
        home = system.prov.home
        keys = tmp_path / "keys"
        assert sgw("keygen", "--out", str(keys), "--trust", "--dir", str(home))[0] == 0
        good = make_release(keys, tmp_path / "good.sgwrel", "1.1.0")
        ports = {d: free_port() for d in DEMO_FLEET}
        model = {"release_public_key_file": str(home / "release.pub")}
        for d in DEMO_FLEET:
            system.start_agent(d, windows=None, speed=1.0, metrics_port=ports[d], model=model, source=HEALTHY)
        system.wait_for(lambda: all(metric(ports[d], "sgw_agent_windows_seen_total") >= 10
                                    for d in DEMO_FLEET), 180, "agents up")
        rc, state, err = sgw("rollout", str(good), "--canary", "10", "--watch", "6", "--dir", str(home),
                             "--chunk-size", "4096", "--wait", "30", "--json")
        assert rc == 0 and state["phase"] == "done", (state, err)
        assert len(state["canary"]) == 2 and len(state["rest"]) == 18
        assert state["health"]["decision"] == "proceed" and state["health"]["canary_windows"] >= 50
        assert set(state["deploy"].values()) == {"installed"} and len(state["deploy"]) == 20
        for d in DEMO_FLEET:
            assert metric(ports[d], 'sgw_agent_model_info{model="prefilter",version="1.1.0"}') == 1, d

        # With the agents' default probation (64 windows, ~5 s here) a release that forwards everything is
        # undone by each canary device itself within the watch; the rollout sees that and stops.
        loose = make_release(keys, tmp_path / "loose.sgwrel", "1.2.0", "--manifest",
                             str(forward_everything_manifest(tmp_path)))
        rc, state, err = sgw("rollout", str(loose), "--canary", "10", "--watch", "10", "--dir", str(home),
                             "--chunk-size", "4096", "--wait", "30", "--json")
        assert rc == 1 and state["phase"] == "rolled_back", (state, err)
        assert state["health"]["reason"] == "selftest", state["health"]
        assert set(state["health"]["devices"]) == set(state["canary"])
        assert state["rollback"] == {}  # they went back by themselves: nothing left to tell them
        for d in DEMO_FLEET:
            m = scrape(ports[d])
            assert m['sgw_agent_model_info{model="prefilter",version="1.1.0"}'] == 1, d
            assert m['sgw_agent_model_rollbacks_total{reason="selftest"}'] == (d in state["canary"]), d
