"""Issue 16: the gateway swaps its classifier to a new signed release on SIGHUP under steady traffic. No
window is lost or inferred twice, every result names the version that made it, and the versions change
at one point: everything before it from 2.0.0, everything after from 2.1.0."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.gateway import Device, Key, assert_one_result_per_window, metric, running_env

pytestmark = pytest.mark.slow  # a live broker and gateway

DEVICES = ("dev-h1", "dev-h2")
PER_DEVICE = 2500  # 5,000 windows at up to ~1,000/s across the two publishers
PACE_S = 0.002


def test_gateway_hot_swaps_its_model_without_losing_or_repeating_a_window(tmp_path: Path) -> None:
    with running_env(tmp_path, DEVICES) as e:
        home = e.prov.home
        keys = tmp_path / "keys"
        assert run_cli(["model", "keygen", "--out", str(keys), "--trust", "--dir", str(home)])[0] == 0
        new = tmp_path / "classifier-2.1.0.sgwrel"
        rc, _out, err = run_cli(["model", "release", "--model", "classifier", "--version", "2.1.0", "--role",
                                 "gateway", "--key", str(keys / "release.key"), "--out", str(new)])
        assert rc == 0, err
        gw = e.gateway(start=False)
        gw.config.write_text(gw.config.read_text().replace('release_public_key_file = ""',
                                                           'release_public_key_file = "release.pub"'))
        gw.start()
        obs = e.observer()
        devices = [e.device(d) for d in DEVICES]
        sent: list[Key] = []
        lock = threading.Lock()

        def publish(dev: Device) -> None:
            keys_sent = dev.publish(PER_DEVICE, pace_s=PACE_S)
            with lock:
                sent.extend(keys_sent)

        threads = [threading.Thread(target=publish, args=(d,)) for d in devices]
        for t in threads:
            t.start()
        # a third of the way in, under traffic: the release into the config, then SIGHUP
        deadline_results = PER_DEVICE * len(DEVICES) // 3
        for _ in range(600):
            if len(obs.results()) >= deadline_results:
                break
            threads[0].join(0.1)
        assert len(obs.results()) >= deadline_results, "traffic did not start"
        # As an operator would: the release into this gateway's config, then a reload (SIGHUP).
        rc, out, err = run_cli(["model", "deploy", str(new), "--gateway", "--gateway-config", str(gw.config),
                                "--dir", str(home), "--json"])
        assert rc == 0 and '"version": "2.1.0"' in out, err
        assert 'releases = ["releases/classifier-2.1.0.sgwrel"]' in gw.config.read_text()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        for t in threads:
            t.join(120)
        assert len(sent) == PER_DEVICE * len(DEVICES)
        assert obs.wait_for(set(sent), 60) == set()
        assert assert_one_result_per_window(obs, set(sent)) == 0  # lost = 0 (checked inside), duplicates = 0

        results = obs.results()
        versions = [r.model_version for r in sorted(results, key=lambda r: (r.published_ns, r.device_id,
                                                                            r.counter))]
        assert set(versions) == {"2.0.0", "2.1.0"}, set(versions)
        switch = versions.index("2.1.0")
        assert all(v == "2.0.0" for v in versions[:switch]) and all(v == "2.1.0" for v in versions[switch:])
        for d in DEVICES:  # per device in the order it sent: one change too
            mine = [r.model_version for r in sorted((r for r in results if r.device_id == d),
                                                    key=lambda r: r.counter)]
            assert mine == sorted(mine), d
        text = gw.scrape()
        assert metric(text, "sgw_gateway_model_swaps_total", model="classifier") == 1
        assert metric(text, "sgw_gateway_model_info", model="classifier", version="2.1.0") == 1
        assert metric(text, "sgw_gateway_model_info", model="classifier", version="2.0.0") != 1
        assert "model swapped" in gw.log()


def test_deploy_to_the_gateway_replaces_its_release_and_refuses_an_agent_one(tmp_path: Path) -> None:
    from tests.support.provision import provision

    prov = provision(tmp_path / "home", ["dev-h1"])
    home, keys = prov.home, tmp_path / "keys"
    assert run_cli(["model", "keygen", "--out", str(keys), "--trust", "--dir", str(home)])[0] == 0
    made = {}
    for model, version, role in (("classifier", "2.1.0", "gateway"), ("classifier", "2.2.0", "gateway"),
                                 ("prefilter", "2.1.0", "agent")):
        out = tmp_path / f"{model}-{version}-{role}.sgwrel"
        rc, _o, err = run_cli(["model", "release", "--model", model, "--version", version, "--role", role,
                               "--key", str(keys / "release.key"), "--out", str(out)])
        assert rc == 0, err
        made[model, version] = out
    config = home / "gateway.toml"
    for version in ("2.1.0", "2.2.0"):
        rc, _o, err = run_cli(["model", "deploy", str(made["classifier", version]), "--gateway",
                               "--dir", str(home)])
        assert rc == 0, err
    assert 'releases = ["releases/classifier-2.2.0.sgwrel"]' in config.read_text()  # 2.1.0 replaced
    before = config.read_bytes()
    rc, _o, err = run_cli(["model", "deploy", str(made["prefilter", "2.1.0"]), "--gateway",
                           "--dir", str(home)])
    assert rc != 0 and "wrong_target" in err and err.count("\n") == 1, err
    assert config.read_bytes() == before  # a refusal changes nothing
