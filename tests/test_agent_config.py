"""agent.toml problems: one line naming the key, exit 2, before anything starts (no outbox is created)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gateway.agent.config import load_agent_config
from gateway.agent.sources import ReplaySource, load_recording
from gateway.errors import ConfigError
from tests.conftest import SgwEnv
from tests.support.agent import ROOT
from tests.support.provision import run_cli

DEV = "dev-0003"


@pytest.fixture
def bundle(sgw_env: SgwEnv, tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(sgw_env.prov.bundle(DEV), folder)
    return folder


def _edit(bundle: Path, old: str, new: str) -> Path:
    path = bundle / "agent.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


def test_provisioned_bundle_loads_as_written(bundle: Path) -> None:
    cfg = load_agent_config(bundle / "agent.toml")
    assert cfg.device.id == DEV
    assert cfg.mqtt.key_file == bundle / "device.key"
    assert cfg.outbox.path == bundle / "outbox.db"
    assert cfg.topic == f"sgw/v1/dev/{DEV}/up"


CASES = [
    ("unknown key", "keepalive_s = 30", 'keepalive_s = 30\ncolour = "red"', "mqtt.colour: unknown key"),
    ("wrong type", "window = 128", 'window = "128"', "source.window: expected an integer"),
    ("missing key file", 'device_key_file = "e2e.key"', 'device_key_file = "gone.key"',
     "e2e.device_key_file: file not found"),
    ("missing tls file", 'key_file = "device.key"', 'key_file = "nope.key"', "mqtt.key_file: file not found"),
    ("missing required key", 'id = "dev-0003"', "", "device.id: required key is missing"),
    ("bad choice", 'policy = "drop_oldest"', 'policy = "drop_newest"', "outbox.policy: expected one of"),
    ("out of range", "max_bytes = 67108864", "max_bytes = 10", "outbox.max_bytes: must be between"),
    ("bad fault", "faults = []", 'faults = [{ at_s = 1.0, duration_s = 1.0, fault = "fire" }]',
     "source.faults[0].fault: expected one of"),
    ("replay without file", 'type = "simulated"', 'type = "replay"', "source.path: required"),
    ("bad device id", 'id = "dev-0003"', 'id = "sgw-gateway"', "device.id:"),
    # the same rule as `sgw device add` (gateway/registry/ids.py): the reserved prefix in any case
    ("reserved id upper case", 'id = "dev-0003"', 'id = "SGW-gateway"', "device.id:"),
    ("id not a folder name", 'id = "dev-0003"', 'id = ".."', "device.id:"),
]


@pytest.mark.parametrize(("old", "new", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_names_the_key_and_exits_2(bundle: Path, old: str, new: str, expect: str) -> None:
    path = _edit(bundle, old, new)
    rc, _out, err = run_cli(["agent", "--config", str(path)])
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert not (bundle / "outbox.db").exists(), "nothing may start before the config is valid"


@pytest.mark.parametrize(("old", "new", "expect"), [
    ("window = 128", "window = 256", "source.window: the prefilter model expects 128-sample windows"),
    ("sample_rate_hz = 1600.0", "sample_rate_hz = 800.0",
     "source.sample_rate_hz: the prefilter model expects"),
], ids=["window", "rate"])
def test_source_must_fit_the_prefilter(bundle: Path, old: str, new: str, expect: str) -> None:
    rc, _, err = run_cli(["agent", "--config", str(_edit(bundle, old, new))])
    assert rc == 2 and expect in err, err


def test_replay_with_wrong_axes_is_refused(bundle: Path) -> None:
    np.save(bundle / "two_axes.npy", np.zeros((1000, 2), np.float32))
    path = _edit(bundle, 'type = "simulated"', 'type = "replay"')
    path = _edit(bundle, 'path = ""', 'path = "two_axes.npy"')
    rc, _, err = run_cli(["agent", "--config", str(path)])
    assert rc == 2 and "source.path: the prefilter model expects 3 axes, the recording has 2" in err, err


def test_short_e2e_key_is_named_without_showing_it(bundle: Path) -> None:
    (bundle / "e2e.key").write_bytes(b"k" * 31)
    rc, _, err = run_cli(["agent", "--config", str(bundle / "agent.toml")])
    assert rc == 2
    assert "e2e.device_key_file: expected a raw 32-byte X25519 key" in err and "kkkk" not in err


def test_real_process_prints_one_line_on_stderr(bundle: Path) -> None:
    path = _edit(bundle, "port = ", 'port = "x"\n#')
    proc = subprocess.run([sys.executable, "-m", "gateway", "agent", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sgw: error: mqtt.port: expected an integer, got str"]


def test_replay_recordings_csv_and_npy(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    np.save(tmp_path / "r.npy", x)
    (tmp_path / "r.csv").write_text("x,y,z\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in x))
    for name in ("r.npy", "r.csv"):
        data = load_recording(tmp_path / name)
        assert data.shape == (300, 3)
        assert np.allclose(data, x, atol=1e-5)
    src = ReplaySource(path=tmp_path / "r.npy", sample_rate_hz=1600.0, window=128, speed=0.0)
    assert src.total_windows == 2  # the partial tail is not sent
    (tmp_path / "bad.csv").write_text("1,2,3\n4,five,6\n")
    with pytest.raises(ConfigError, match=r"source\.path"):
        load_recording(tmp_path / "bad.csv")
