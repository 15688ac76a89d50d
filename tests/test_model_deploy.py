"""Issue 16: signed model releases through the real broker to real agents: `sgw model deploy` sends them in
hashed chunks over the sealed downlink; an agent refuses a tampered, unsigned, downgraded or wrong-target
release (counted by reason), resumes a transfer after a SIGKILL, switches to a good one while the old
model serves, and comes back on it after another SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.core import release as rel
from tests.support.agent import scrape
from tests.support.cli import run_cli
from tests.support.ledger import running_system
from tests.support.mosquitto import free_port

pytestmark = pytest.mark.slow  # live agents and gateway

DEVICES = ("dev-r1", "dev-r2")


def sgw(*argv: str) -> tuple[int, Any, str]:
    rc, out, err = run_cli(["model", *argv])
    return rc, (json.loads(out) if out.strip() and "--json" in argv else out), err


def make_release(home: Path, keydir: Path, out: Path, version: str, *extra: str) -> Path:
    rc, _info, err = sgw("release", "--model", "prefilter", "--version", version, "--role", "agent",
                        "--key", str(keydir / "release.key"), "--out", str(out), "--json", *extra)
    assert rc == 0, err
    return out


def deploy(home: Path, release: Path, *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    rc, rows, err = sgw("deploy", str(release), "--dir", str(home), "--chunk-size", "1024", "--wait", "20",
                        "--json", *argv)
    return rc, rows or [], err


def refused_count(port: int, reason: str) -> float:
    return scrape(port).get(f'sgw_agent_model_refused_total{{reason="{reason}"}}', 0.0)


def test_releases_reach_live_agents_bad_ones_refused_and_a_killed_download_resumes(tmp_path: Path) -> None:
    with running_system(tmp_path, DEVICES) as system:
        home = system.prov.home
        keys = tmp_path / "keys"
        rc, _info, err = sgw("keygen", "--out", str(keys), "--trust", "--dir", str(home), "--json")
        assert rc == 0 and (keys / "release.key").stat().st_mode & 0o777 == 0o600, err
        good = make_release(home, keys, tmp_path / "p-1.1.0.sgwrel", "1.1.0", "--kind", "vibration")
        ports = {d: free_port() for d in DEVICES}
        model = {"release_public_key_file": str(home / "release.pub")}
        for d in DEVICES:
            system.start_agent(d, windows=None, speed=1.0, metrics_port=ports[d], model=model)
        system.wait_for(lambda: all(system.results_for(d) >= 3 for d in DEVICES), 60, "live agents")

        # Bad releases: the CLI refuses them before sending (one line, nothing sent) ...
        blob = bytearray(good.read_bytes())
        blob[-100] ^= 0x01
        tampered = tmp_path / "tampered.sgwrel"
        tampered.write_bytes(bytes(blob))
        rc, rows, err = deploy(home, tampered, "--to", "dev-r1")
        assert rc == 1 and rows == [] and "tampered" in err and err.count("\n") == 1, err
        # ... and with --unchecked the agent refuses each for its own reason, counted, logged, not run.
        entry = json.loads((Path(rel.__file__).parents[2] / "edge_models" / "manifest.json").read_text())
        files = {"prefilter_b1.tflite": (Path(rel.__file__).parents[2] / "edge_models"
                                         / "prefilter_b1.tflite").read_bytes()}
        unsigned, stranger = tmp_path / "unsigned.sgwrel", tmp_path / "stranger.sgwrel"
        for path, signers in ((unsigned, []), (stranger, [Ed25519PrivateKey.generate()])):
            path.write_bytes(rel.build(model="prefilter", version="1.2.0", role="agent", kind="vibration",
                                       allow_downgrade=False, created_ms=1,
                                       entry=entry["models"]["prefilter"], files=files, signers=signers))
        older = make_release(home, keys, tmp_path / "p-0.9.0.sgwrel", "0.9.0")
        other_kind = make_release(home, keys, tmp_path / "p-temp.sgwrel", "1.3.0", "--kind", "temperature")
        for path, reason in ((tampered, "tampered"), (unsigned, "unsigned"), (stranger, "unknown_key"),
                             (older, "downgrade"), (other_kind, "wrong_target")):
            rc, rows, err = deploy(home, path, "--to", "dev-r1", "--unchecked")
            assert rc == 1 and rows[0]["outcome"] == "refused" and rows[0]["reason"] == reason, (reason, rows)
            assert refused_count(ports["dev-r1"], reason) == 1
        assert "model release refused" in system.agents["dev-r1"].log()

        # A transfer stopped after 3 of its chunks, the agent SIGKILLed with them staged, started again:
        # the next deploy resumes at chunk 3. The old model served windows meanwhile.
        rc, rows, err = deploy(home, good, "--to", "dev-r1", "--max-chunks", "3")
        assert rc == 1 and rows[0]["outcome"] == "partial" and rows[0]["next"] == 3, (rows, err)
        chunks = rows[0]["chunks"]
        assert chunks > 3
        system.agents["dev-r1"].kill()
        before = system.results_for("dev-r1")
        system.start_agent("dev-r1", windows=None, speed=1.0, metrics_port=ports["dev-r1"], model=model,
                           run=1)
        system.wait_for(lambda: system.results_for("dev-r1") >= before + 2, 60, "dev-r1 on its old model")
        assert scrape(ports["dev-r1"])['sgw_agent_model_info{model="prefilter",version="1.0.0"}'] == 1
        rc, rows, err = deploy(home, good, "--to", "dev-r1")
        assert rc == 0, (rows, err)
        assert rows[0]["outcome"] == "installed" and rows[0]["version"] == "1.1.0"
        assert rows[0]["resumed_from"] == 3 and rows[0]["chunks_sent"] == chunks - 3, rows
        m = scrape(ports["dev-r1"])
        assert m['sgw_agent_model_info{model="prefilter",version="1.1.0"}'] == 1
        assert m["sgw_agent_model_switches_total"] == 1
        rc, status, err = run_cli(["device", "cmd", "dev-r1", "status", "--dir", str(home), "--json"])
        assert rc == 0 and json.loads(status)[0]["status"]["model_version"] == "prefilter-1.1.0", status

        # Killed right after the switch: it comes back on the new release, still serving.
        system.agents["dev-r1"].kill()
        before = system.results_for("dev-r1")
        system.start_agent("dev-r1", windows=None, speed=1.0, metrics_port=ports["dev-r1"], model=model,
                           run=2)
        system.wait_for(lambda: system.results_for("dev-r1") >= before + 2, 60, "dev-r1 on 1.1.0")
        assert scrape(ports["dev-r1"])['sgw_agent_model_info{model="prefilter",version="1.1.0"}'] == 1

        # status: what runs where; rollback: dev-r1 back to what ran before its switch (the packaged model),
        # and rolled back again, forward to 1.1.0 (each re-verified on the device).
        rc, rows, err = sgw("status", "--to", ",".join(DEVICES), "--dir", str(home), "--json")
        assert rc == 0, err
        assert {r["device"]: r["model_version"] for r in rows} == {"dev-r1": "prefilter-1.1.0",
                                                                   "dev-r2": "prefilter-1.0.0"}, rows
        rc, rows, err = sgw("rollback", "--to", "dev-r1", "--dir", str(home), "--json")
        assert rc == 0 and rows[0]["model_version"] == "prefilter-1.0.0", (rows, err)
        assert rows[0]["rolled_back_from"] == "prefilter-1.1.0"
        assert scrape(ports["dev-r1"])['sgw_agent_model_info{model="prefilter",version="1.0.0"}'] == 1
        rc, rows, err = sgw("rollback", "--to", "dev-r1", "--dir", str(home), "--json")
        assert rc == 0 and rows[0]["model_version"] == "prefilter-1.1.0", (rows, err)
        rc, rows, err = sgw("rollback", "--to", "dev-r2", "--dir", str(home), "--json")
        assert rc == 1 and rows[0]["outcome"] == "error" and "nothing to roll back" in rows[0]["error"], rows

        # --percent 50 of two vibration devices: one, the same one for the same release every time. dev-r1
        # runs it already: its probe says so and nothing more is sent.
        rc, rows, err = deploy(home, good, "--percent", "50")
        assert rc == 0 and len(rows) == 1 and rows[0]["outcome"] == "installed", (rows, err)
        assert rows[0]["already_running"] == (rows[0]["device"] == "dev-r1")
        rc, again, _err = deploy(home, good, "--percent", "50")
        assert [r["device"] for r in again] == [r["device"] for r in rows]
        assert again[0]["already_running"] and again[0]["chunks_sent"] == 0


def test_gateway_runs_its_signed_release_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    with running_system(tmp_path, ("dev-g1",)) as system:
        home = system.prov.home
        keys = tmp_path / "keys"
        assert sgw("keygen", "--out", str(keys), "--trust", "--dir", str(home))[0] == 0
        good = tmp_path / "classifier-2.1.0.sgwrel"
        rc, _info, err = sgw("release", "--model", "classifier", "--version", "2.1.0", "--role", "gateway",
                             "--key", str(keys / "release.key"), "--out", str(good), "--json")
        assert rc == 0, err
        bad = tmp_path / "classifier-2.2.0-tampered.sgwrel"
        assert sgw("release", "--model", "classifier", "--version", "2.2.0", "--role", "gateway", "--key",
                   str(keys / "release.key"), "--out", str(bad))[0] == 0
        blob = bytearray(bad.read_bytes())
        blob[-50] ^= 0x01
        bad.write_bytes(bytes(blob))
        system.start_agent("dev-g1", windows=None, speed=1.0)
        system.wait_for(lambda: system.results_for("dev-g1") >= 2, 60, "results from the manifest's model")
        assert system.sink is not None
        assert {pb_version(s.raw) for s in system.sink.seen()} == {"2.0.0"}

        conf = system._gateway_args[0]  # the test's own gateway.toml
        text = conf.read_text().replace('release_public_key_file = ""',
                                        'release_public_key_file = "release.pub"')
        conf.write_text(text.replace("releases = []", f'releases = ["{bad}", "{good}"]'))
        system.gateway.stop()
        seen = len(system.sink.seen())
        system.start_gateway()
        system.wait_for(lambda: len(system.sink.seen()) >= seen + 2, 60, "results from the release")
        text = system.scrape()
        assert 'sgw_gateway_model_info{model="classifier",version="2.1.0"} 1.0' in text
        assert 'sgw_gateway_model_refused_total{reason="tampered"} 1.0' in text
        assert "model release refused" in system.gateway.log()
        assert {pb_version(s.raw) for s in system.sink.seen()[seen:]} == {"2.1.0"}


def pb_version(raw: bytes) -> str:
    from gateway.pb import messages_pb2 as pb

    return pb.InferenceResult.FromString(raw).model_version
