"""Issue 16: a model switch on probation (gateway/agent/probation.py), without a broker: the agent's own
store, releases delivered as ModelChunks, and "restarts" as fresh AgentModels over the same files (what a
SIGKILLed agent finds). A release that fails its self-test is undone live and at start; an agent that
keeps starting on an unconfirmed release goes back (crash_loop); a good one is confirmed and stays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from gateway.agent.config import load_agent_config
from gateway.agent.metrics import AgentMetrics
from gateway.agent.models import AgentModels
from gateway.agent.probation import selftest
from gateway.inference.engine import load_prefilter
from gateway.inference.manifest import default_manifest_path
from gateway.sim.generator import Machine
from tests.support.cli import run_cli
from tests.test_model_release import _agent_models, _chunks, release

PROBATION = 64  # the default [model] probation_windows


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    assert run_cli(["model", "keygen", "--out", str(tmp_path / "keys")])[0] == 0
    return tmp_path / "keys"


def forward_everything_manifest(tmp_path: Path) -> Path:
    """The shipped prefilter with a threshold under every score: a release that forwards every window."""
    src = default_manifest_path()
    out = tmp_path / "loose"
    out.mkdir()
    doc = json.loads(src.read_text())
    doc["models"]["prefilter"]["threshold"] = -1e9
    for variant in doc["models"]["prefilter"]["variants"]:
        shutil.copy(src.parent / variant["file"], out / variant["file"])
    (out / "manifest.json").write_text(json.dumps(doc))
    return out / "manifest.json"


def healthy_windows(n: int, seed: int = 7) -> list[np.ndarray]:
    machine = Machine(seed, 1600.0, 128, schedule=())
    return [machine.next_window(i * 0.08)[0] for i in range(n)]


def counter(metrics: AgentMetrics, name: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.split()[0] == name:
            return float(line.split()[-1])
    return 0.0


def rollbacks(metrics: AgentMetrics, reason: str) -> float:
    return counter(metrics, f'sgw_agent_model_rollbacks_total{{reason="{reason}"}}')


def restarted(tmp_path: Path) -> tuple[AgentModels, AgentMetrics]:
    metrics = AgentMetrics("vibration")
    cfg = load_agent_config(tmp_path / "home" / "devices" / "dev-1" / "agent.toml")
    return AgentModels(cfg, metrics), metrics


def deliver(models: AgentModels, blob: bytes) -> dict[str, str]:
    for c in _chunks(blob):
        r = models.chunk(c, models.version)
        assert r.error is None, r.error
    return r.values


def run_windows(models: AgentModels, windows: list[np.ndarray]) -> list[object]:
    """What the agent's filter does for each window: score it, then tell the models (observe)."""
    swapped = []
    for w in windows:
        p = models.current
        assert p is not None
        out = models.observe(w, p.is_anomalous(p.score(w)))
        if out is not None:
            swapped.append(out)
    return swapped


def test_selftest_limit_separates_a_sensitive_model_from_one_that_forwards_everything(tmp_path: Path) -> None:
    """The measurement behind selftest_max_forward = 0.25 (gateway/agent/probation.py)."""
    shipped = load_prefilter(manifest=None, accelerator="cpu", num_threads=1)
    kept = np.stack([w for w in healthy_windows(400) if not shipped.is_anomalous(shipped.score(w))][:64])
    assert selftest(shipped, kept, 0.25).forwarded == 0
    loose = load_prefilter(manifest=forward_everything_manifest(tmp_path), accelerator="cpu", num_threads=1)
    test = selftest(loose, kept, 0.25)
    assert test.judged and not test.ok and test.forwarded == 64
    assert selftest(loose, kept[:8], 0.25).ok  # too few kept windows: not judged
    assert "not judged" in selftest(loose, kept[:8], 0.25).describe()


def test_a_switch_that_fails_its_selftest_is_undone_at_start_after_a_kill(tmp_path: Path, keys: Path) -> None:
    models, _metrics = _agent_models(tmp_path, keys)
    models.load()
    run_windows(models, healthy_windows(100))  # the packaged model keeps its healthy windows
    loose = release(keys, tmp_path / "loose.sgwrel", "1.1.0", "--manifest",
                    str(forward_everything_manifest(tmp_path))).read_bytes()
    values = deliver(models, loose)
    assert values["installed"] == "1.1.0" and values["probation"] == str(PROBATION)
    assert models.version == "prefilter-1.1.0" and models.probation_text == "0/64"
    assert models.probation.healthy_path.is_file() and models.probation.pending_path.is_file()

    # SIGKILLed here: the next start finds the switch unconfirmed, self-tests it and goes back.
    again, metrics = restarted(tmp_path)
    prefilter = again.load()
    assert prefilter.model.version == "1.0.0" and again.version == "prefilter-1.0.0"
    assert rollbacks(metrics, "selftest") == 1 and rollbacks(metrics, "crash_loop") == 0
    assert again.rolled_back is not None and again.rolled_back.from_version == "prefilter-1.1.0"
    assert again.rolled_back.reason == "selftest" and "64 of 64" in again.rolled_back.detail
    assert again.pending is None and not again.probation.pending_path.exists()
    # and it stays back: the next start runs the old model without judging anything again
    third, metrics = restarted(tmp_path)
    assert third.load().model.version == "1.0.0" and rollbacks(metrics, "selftest") == 0
    assert third.rolled_back is not None  # still reported until the next switch


def test_a_switch_that_fails_its_selftest_is_undone_live(tmp_path: Path, keys: Path) -> None:
    models, metrics = _agent_models(tmp_path, keys)
    models.load()
    run_windows(models, healthy_windows(100))
    loose = release(keys, tmp_path / "loose.sgwrel", "1.1.0", "--manifest",
                    str(forward_everything_manifest(tmp_path))).read_bytes()
    deliver(models, loose)
    swapped = run_windows(models, healthy_windows(PROBATION - 1, seed=8))
    assert swapped == [] and models.version == "prefilter-1.1.0"  # still on probation
    swapped = run_windows(models, healthy_windows(1, seed=9))
    assert len(swapped) == 1 and models.version == "prefilter-1.0.0" and models.current is swapped[0]
    assert rollbacks(metrics, "selftest") == 1 and counter(metrics, "sgw_agent_model_probation") == 0


def test_a_good_switch_is_confirmed_and_a_crash_loop_goes_back(tmp_path: Path, keys: Path) -> None:
    models, metrics = _agent_models(tmp_path, keys)
    models.load()
    run_windows(models, healthy_windows(100))
    deliver(models, release(keys, tmp_path / "a.sgwrel", "1.1.0").read_bytes())
    assert counter(metrics, "sgw_agent_model_probation") == 1
    assert run_windows(models, healthy_windows(PROBATION, seed=8)) == []
    assert models.pending is None and not models.probation.pending_path.exists()
    assert models.probation_text == ""
    again, metrics = restarted(tmp_path)
    assert again.load().model.version == "1.1.0" and again.pending is None

    # 1.2.0 passes its self-test but the agent never lives long enough to confirm it: three starts on
    # probation, the fourth goes back to 1.1.0.
    run_windows(again, healthy_windows(100, seed=10))
    deliver(again, release(keys, tmp_path / "b.sgwrel", "1.2.0").read_bytes())
    for start in (1, 2, 3):
        crashed, metrics = restarted(tmp_path)
        assert crashed.load().model.version == "1.2.0" and crashed.pending is not None
        assert crashed.pending.starts == start
        run_windows(crashed, healthy_windows(10))  # ... and dies before the probation ends
    last, metrics = restarted(tmp_path)
    assert last.load().model.version == "1.1.0"
    assert rollbacks(metrics, "crash_loop") == 1
    assert last.rolled_back is not None and last.rolled_back.reason == "crash_loop"
    assert last.store.version("prefilter") == "1.1.0"
    assert last.store.version("prefilter", "previous") == "1.2.0"


def test_no_probation_while_a_baseline_scores_the_windows(tmp_path: Path, keys: Path) -> None:
    """With [commission] on, the prefilter judges nothing: a switch to a release of it is installed but
    not put on probation, so restarts never count towards a crash loop."""
    models, _metrics = _agent_models(tmp_path, keys)
    models.judges = False
    models.load()
    values = deliver(models, release(keys, tmp_path / "a.sgwrel", "1.1.0").read_bytes())
    assert values["installed"] == "1.1.0" and "probation" not in values
    assert models.pending is None and not models.probation.pending_path.exists()
    for _ in range(5):
        again, metrics = restarted(tmp_path)
        again.judges = False
        assert again.load().model.version == "1.1.0" and rollbacks(metrics, "crash_loop") == 0


def test_rollout_refuses_bad_options_and_releases_in_one_line_changing_nothing(tmp_path: Path,
                                                                                keys: Path) -> None:
    from tests.support.provision import provision

    home = tmp_path / "home"
    provision(home, ["dev-1"])
    good = release(keys, tmp_path / "r.sgwrel", "1.1.0")
    for argv, says in ((["--canary", "0"], "--canary"), (["--watch", "-1"], "--watch"),
                       (["--max-forward-ratio", "0.5"], "--max-forward-ratio")):
        rc, _out, err = run_cli(["model", "rollout", str(good), "--dir", str(home), *argv])
        assert rc != 0 and says in err and err.count("\n") == 1, (argv, err)
    # a release the home's key does not verify (no trusted key yet): refused before anything is sent
    rc, _out, err = run_cli(["model", "rollout", str(good), "--dir", str(home)])
    assert rc != 0 and "no trusted release key" in err and err.count("\n") == 1, err
    assert not (home / "rollouts").exists()
