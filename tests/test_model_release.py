"""Issue 16, the parts without a broker: `sgw model keygen | release | verify`, the trusted key in new device
bundles, the store's atomic switch and its re-verification at every load (a file changed on disk is
refused as tampered, counted, and the next candidate runs), and the gateway's [inference] releases."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from gateway.agent.config import load_agent_config
from gateway.agent.metrics import AgentMetrics
from gateway.agent.models import AgentModels
from gateway.core import release as rel
from gateway.inference.manifest import default_manifest_path
from gateway.inference.releases import ModelStore, load_trust
from gateway.server import releases as gw_releases
from tests.support.agent import dump_toml
from tests.support.cli import run_cli
from tests.support.provision import provision


def sgw(*argv: str) -> tuple[int, Any, str]:
    rc, out, err = run_cli(["model", *argv])
    return rc, (json.loads(out) if out.strip() and "--json" in argv else out), err


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    rc, info, err = sgw("keygen", "--out", str(tmp_path / "keys"), "--json")
    assert rc == 0 and len(info["key_id"]) == 16, err
    return tmp_path / "keys"


def release(keys: Path, out: Path, version: str, *extra: str, model: str = "prefilter",
            role: str = "agent") -> Path:
    rc, info, err = sgw("release", "--model", model, "--version", version, "--role", role, "--key",
                        str(keys / "release.key"), "--out", str(out), "--json", *extra)
    assert rc == 0 and info["version"] == version and info["role"] == role, err
    return out


def test_keygen_release_verify(keys: Path, tmp_path: Path) -> None:
    assert (keys / "release.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "release.pub").stat().st_size == 32
    rc, _out, err = sgw("keygen", "--out", str(keys))
    assert rc == 2 and "refusing to overwrite" in err and err.count("\n") == 1
    path = release(keys, tmp_path / "r.sgwrel", "1.1.0", "--kind", "vibration")
    pub = str(keys / "release.pub")
    rc, info, err = sgw("verify", str(path), "--public-key", pub, "--installed", "1.0.0", "--json")
    assert rc == 0 and info["ok"] and info["files"] == {"prefilter_b1.tflite": 2616}, err
    for argv, reason in ((["--installed", "1.2"], "downgrade"), (["--role", "gateway"], "wrong_target"),
                         (["--kind", "current"], "wrong_target")):
        rc, info, _err = sgw("verify", str(path), "--public-key", pub, "--json", *argv)
        assert rc == 1 and info == {"ok": False, "reason": reason, "error": info["error"]}, argv
    other = tmp_path / "other"
    sgw("keygen", "--out", str(other))
    rc, _info, err = sgw("verify", str(path), "--public-key", str(other / "release.pub"))
    assert rc == 1 and err == "sgw: error: model release refused: unknown_key\n"
    rc, _info, err = sgw("release", "--model", "nope", "--version", "1", "--role", "agent", "--key",
                         str(keys / "release.key"), "--out", str(tmp_path / "x.sgwrel"))
    assert rc == 2 and "no model 'nope'" in err and not (tmp_path / "x.sgwrel").exists()


def test_trusted_key_goes_into_new_bundles(tmp_path: Path) -> None:
    home = tmp_path / "home"
    provision(home, ["dev-old"])
    rc, info, err = sgw("keygen", "--out", str(tmp_path / "k"), "--trust", "--dir", str(home), "--json")
    assert rc == 0 and info["trusted_in_home"] == str(home / "release.pub"), err
    provision(home, ["dev-new"])
    new = tomllib.loads((home / "devices" / "dev-new" / "agent.toml").read_text())
    old = tomllib.loads((home / "devices" / "dev-old" / "agent.toml").read_text())
    assert new["model"]["release_public_key_file"] == "release.pub"
    assert (home / "devices" / "dev-new" / "release.pub").read_bytes() == (home / "release.pub").read_bytes()
    assert old["model"]["release_public_key_file"] == ""  # copy it by hand into bundles made before
    cfg = load_agent_config(home / "devices" / "dev-new" / "agent.toml")
    assert cfg.model.release_public_key_file == home / "devices" / "dev-new" / "release.pub"


def _agent_models(tmp_path: Path, keys: Path) -> tuple[AgentModels, AgentMetrics]:
    home = tmp_path / "home"
    provision(home, ["dev-1"])
    bundle = home / "devices" / "dev-1"
    (bundle / "release.pub").write_bytes((keys / "release.pub").read_bytes())
    doc = tomllib.loads((bundle / "agent.toml").read_text())
    doc["model"]["release_public_key_file"] = "release.pub"
    doc["outbox"]["path"] = str(tmp_path / "outbox.db")
    (bundle / "agent.toml").write_text(dump_toml(doc))
    metrics = AgentMetrics("vibration")
    return AgentModels(load_agent_config(bundle / "agent.toml"), metrics), metrics


def _refused(metrics: AgentMetrics, reason: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(f'sgw_agent_model_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(reason)


def test_agent_runs_its_active_release_and_refuses_one_changed_on_disk(tmp_path: Path, keys: Path) -> None:
    models, metrics = _agent_models(tmp_path, keys)
    assert models.load().model.version == "1.0.0" and models.version == "prefilter-1.0.0"  # packaged
    store = models.store
    assert store.root == tmp_path / "outbox.db.models"
    trust = models.trust
    for version in ("1.1.0", "1.2.0"):
        blob = release(keys, tmp_path / f"{version}.sgwrel", version, "--kind", "vibration").read_bytes()
        r = trust.verify(blob, installed_version=None)
        store.switch("prefilter", store.install(r, blob))
    assert store.version("prefilter") == "1.2.0" and store.version("prefilter", "previous") == "1.1.0"
    assert models.load().model.version == "1.2.0"

    # A model file changed on disk: refused as tampered (counted), the previous release runs instead.
    active = store.folder("prefilter")
    assert active is not None
    tflite = active / "prefilter_b1.tflite"
    tflite.write_bytes(tflite.read_bytes()[:-1] + b"\x00")
    assert models.load().model.version == "1.1.0"
    assert _refused(metrics, "tampered") == 1
    # Its manifest.json edited (say, a looser threshold): refused too; with both gone, the packaged model.
    previous = store.folder("prefilter", "previous")
    assert previous is not None
    manifest = previous / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"threshold"', '"threshold_"', 1))
    assert models.load().model.version == "1.0.0"
    assert _refused(metrics, "tampered") == 3  # each start refuses what it finds, again

    # rollback swaps active and previous; both links move by rename, never half-written
    store.rollback("prefilter")
    assert store.version("prefilter") == "1.1.0" and store.version("prefilter", "previous") == "1.2.0"


def test_gateway_releases_verified_installed_and_refused_by_reason(tmp_path: Path, keys: Path) -> None:
    trust = load_trust(keys / "release.pub", role="gateway", kind="*", key="k")
    store = ModelStore(tmp_path / "registry.db.models")
    good = release(keys, tmp_path / "c.sgwrel", "2.1.0", model="classifier", role="gateway")
    agent_one = release(keys, tmp_path / "p.sgwrel", "1.1.0")
    unrouted = release(keys, tmp_path / "f.sgwrel", "2.1.0", model="classifier_f32", role="gateway")
    older = release(keys, tmp_path / "old.sgwrel", "1.9.0", model="classifier", role="gateway")
    junk = tmp_path / "junk.sgwrel"
    junk.write_bytes(b"junk")
    refused: dict[str, int] = {}
    out = gw_releases.resolve([agent_one, unrouted, older, junk, good], trust, store, manifest=None,
                              models=["classifier"], refused=refused)
    assert refused == {"wrong_target": 2, "downgrade": 1, "malformed": 1}
    assert out == {"classifier": store.folder("classifier") / "manifest.json"}  # type: ignore[operator]
    doc = json.loads(out["classifier"].read_text())
    assert doc["models"]["classifier"]["version"] == "2.1.0"
    assert len(doc["models"]["classifier"]["variants"]) == len(
        json.loads(default_manifest_path().read_text())["models"]["classifier"]["variants"])
    # Next start: a release below the installed 2.1.0 is a downgrade even though the manifest has 2.0.0,
    # and the installed one keeps running.
    again = release(keys, tmp_path / "c2.sgwrel", "2.0.5", model="classifier", role="gateway")
    refused = {}
    out = gw_releases.resolve([again], trust, store, manifest=None, models=["classifier"], refused=refused)
    assert refused == {"downgrade": 1} and json.loads(out["classifier"].read_text())["models"][
        "classifier"]["version"] == "2.1.0"
    # With no trusted key every release is refused as unknown_key, and the installed one is refused at load
    # too: the manifest's model runs.
    refused = {}
    none = load_trust(Path(), role="gateway", kind="*", key="k")
    out = gw_releases.resolve([good], none, store, manifest=None, models=["classifier"], refused=refused)
    assert out == {}
    assert refused == {"unknown_key": 2}
    assert rel.claimed_model(good.read_bytes()) == "classifier"


def test_pq_keygen_release_and_verify(tmp_path: Path) -> None:
    home = tmp_path / "home"
    provision(home, [])
    k = tmp_path / "k"
    rc, info, err = sgw("keygen", "--out", str(k), "--pq", "--trust", "--dir", str(home), "--json")
    assert rc == 0 and info["pq_key_id"], err
    assert (k / "release-mldsa65.key").stat().st_mode & 0o777 == 0o600
    assert (home / "release-mldsa65.pub").stat().st_size == rel.MLDSA65_PUBLIC_KEY_BYTES
    provision(home, ["dev-pq"])
    doc = tomllib.loads((home / "devices" / "dev-pq" / "agent.toml").read_text())
    assert doc["model"]["release_pq_public_key_file"] == "release-mldsa65.pub"
    ed_only = release(k, tmp_path / "ed.sgwrel", "1.1.0")
    both = release(k, tmp_path / "both.sgwrel", "1.1.0", "--pq-key", str(k / "release-mldsa65.key"))
    rc, info, _err = sgw("verify", str(both), "--dir", str(home), "--json")  # the home's keys: both needed
    assert rc == 0 and info["pq_required"], info
    rc, info, _err = sgw("verify", str(ed_only), "--dir", str(home), "--json")
    assert rc == 1 and info["reason"] == "unsigned", info
    rc, info, _err = sgw("verify", str(ed_only), "--public-key", str(k / "release.pub"), "--json")
    assert rc == 0 and not info["pq_required"]


def _chunks(blob: bytes, size: int = 1024) -> list[Any]:
    import hashlib

    from gateway.pb import downlink_pb2 as dpb

    rid = hashlib.sha256(blob).hexdigest()
    out = []
    for i in range(-(-len(blob) // size)):
        data = blob[i * size:(i + 1) * size]
        out.append(dpb.ModelChunk(release_id=rid, total_bytes=len(blob), chunk_bytes=size, index=i, data=data,
                                  sha256=hashlib.sha256(data).digest()))
    return out


def test_agent_stages_chunks_in_order_resumes_after_a_torn_write_and_switches(tmp_path: Path,
                                                                               keys: Path) -> None:
    from gateway.core.downlink import chunk_problem
    from gateway.pb import downlink_pb2 as dpb

    models, metrics = _agent_models(tmp_path, keys)
    models.load()
    blob = release(keys, tmp_path / "r.sgwrel", "1.1.0", "--kind", "vibration").read_bytes()
    chunks = _chunks(blob)
    assert len(chunks) >= 4 and all(chunk_problem(c) is None for c in chunks)
    probe = dpb.ModelChunk(release_id=chunks[0].release_id, total_bytes=len(blob), chunk_bytes=1024, index=0)
    assert chunk_problem(probe) is None

    def send(c: Any) -> Any:
        return models.chunk(c, models.version)

    assert send(probe).values == {"next": "0", "chunks": str(len(chunks))}
    assert send(chunks[0]).values["next"] == "1"
    assert send(chunks[0]).values["next"] == "1" and send(chunks[0]).error is None  # a duplicate: no-op
    r = send(chunks[2])
    assert r.error == "out of order: next is 1" and r.values["next"] == "1"
    bad = dpb.ModelChunk()
    bad.CopyFrom(chunks[1])
    bad.sha256 = b"\0" * 32
    r = send(bad)
    assert r.error and "hash" in r.error and r.values["next"] == "1"
    assert models.staged.endswith(f" 1024/{len(blob)}")
    # A crash in the middle of a write leaves a partial chunk: the next message truncates it away.
    part = models.store.staging / f"{chunks[0].release_id}.part"
    with part.open("ab") as fh:
        fh.write(b"torn")
    assert send(probe).values["next"] == "1" and part.stat().st_size == 1024
    for c in chunks[1:-1]:
        assert send(c).error is None
    assert models.version == "prefilter-1.0.0"  # the old model runs until the last chunk
    done = send(chunks[-1])
    assert done.error is None and done.values["installed"] == "1.1.0" and done.switched is not None
    assert models.version == "prefilter-1.1.0" and models.store.version("prefilter") == "1.1.0"
    assert not part.exists() and models.staged == ""
    again = send(probe)  # it runs it already
    assert again.values["already"] == "1" and again.switched is None

    # Another release arriving discards a half-staged one; a wrong-target one is refused at the end,
    # counted, and nothing switches.
    other = _chunks(release(keys, tmp_path / "t.sgwrel", "1.2.0", "--kind", "current").read_bytes())
    third = _chunks(release(keys, tmp_path / "u.sgwrel", "1.3.0", "--kind", "vibration").read_bytes())
    send(third[0])
    assert (models.store.staging / f"{third[0].release_id}.part").exists()
    for c in other:
        r = send(c)
    assert not (models.store.staging / f"{third[0].release_id}.part").exists()
    assert r.error == "refused: wrong_target" and r.values["refused"] == "wrong_target"
    assert models.version == "prefilter-1.1.0" and _refused(metrics, "wrong_target") == 1


def test_agent_without_a_trusted_key_refuses_at_the_probe(tmp_path: Path, keys: Path) -> None:
    models, metrics = _agent_models(tmp_path, keys)
    bundle = tmp_path / "home" / "devices" / "dev-1"
    doc = tomllib.loads((bundle / "agent.toml").read_text())
    doc["model"]["release_public_key_file"] = ""
    (bundle / "agent.toml").write_text(dump_toml(doc))
    models = AgentModels(load_agent_config(bundle / "agent.toml"), metrics)
    models.load()
    blob = release(keys, tmp_path / "r.sgwrel", "1.1.0").read_bytes()
    r = models.chunk(_chunks(blob)[0], models.version)
    assert r.values["refused"] == "unknown_key" and not list(models.store.staging.iterdir())
    assert _refused(metrics, "unknown_key") == 1
