"""`sgw install` into a temporary prefix: files, modes, idempotence, and no system commands."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli.main import main

SGW_BIN = "/opt/sgw/bin/sgw"


@pytest.fixture(autouse=True)
def _no_system_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a prefix other than / nothing may run systemctl, systemd-sysusers or chown.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"subprocess.run called: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_installs_units_configs_and_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN]) == 0
    out = capsys.readouterr().out
    units = tmp_path / "etc/systemd/system"
    for name, sub in (("sgw-gateway.service", "gateway"), ("sgw-agent.service", "agent")):
        text = (units / name).read_text()
        assert f"ExecStart={SGW_BIN} {sub} --config /etc/sgw/{sub}.toml" in text
        assert "/usr/local/bin/sgw" not in text
        assert _mode(units / name) == 0o644
        assert (tmp_path / f"etc/sgw/{sub}.toml").is_file()
    assert (tmp_path / "etc/sysusers.d/sgw.conf").read_text().startswith("u sgw ")
    assert _mode(tmp_path / "var/lib/sgw") == 0o750
    assert _mode(tmp_path / "etc/sgw/agent") == 0o700
    # The operator is told the next steps, daemon-reload first.
    assert "systemctl daemon-reload" in out
    assert "systemctl enable --now sgw-gateway.service" in out
    assert "systemctl enable --now sgw-agent.service" in out
    assert out.index("daemon-reload") < out.index("enable --now")


def test_second_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN, "--json"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert {a["action"] for a in report["actions"]} <= {"unchanged", "exists", "skip"}


def test_json_report_lists_actions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN, "--json"]
    assert main(args) == 0
    capsys.readouterr()
    config = tmp_path / "etc/sgw/gateway.toml"
    config.write_text(config.read_text().replace('id = "gw-1"', 'id = "gw-7"'))
    unit = tmp_path / "etc/systemd/system/sgw-agent.service"
    unit.write_text("stale\n")
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    by_path = {a["path"]: a["action"] for a in report["actions"]}
    assert by_path[str(config)] == "keep"
    assert 'id = "gw-7"' in config.read_text()
    assert by_path[str(unit)] == "update"
    assert "ExecStart=" in unit.read_text()
    assert by_path[str(tmp_path / "etc/systemd/system/sgw-gateway.service")] == "unchanged"
    assert by_path[str(tmp_path / "var/lib/sgw")] == "exists"
    assert report["dry_run"] is False
    assert any(a["action"] == "skip" and a["path"].startswith("systemd-sysusers") for a in report["actions"])


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN, "--dry-run"]) == 0
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    assert "would do" in out
    assert "sgw-gateway.service" in out


def test_dry_run_on_the_live_root_runs_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    # --prefix / with --dry-run is how an operator previews a real install; the fixture forbids commands.
    assert main(["install", "--dry-run", "--json", "--sgw-bin", SGW_BIN]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefix"] == "/"
    assert all(a["action"] != "run" for a in report["actions"])


def test_agent_only(tmp_path: Path) -> None:
    assert main(["install", "--prefix", str(tmp_path), "--unit", "agent", "--sgw-bin", SGW_BIN]) == 0
    assert (tmp_path / "etc/systemd/system/sgw-agent.service").is_file()
    assert not (tmp_path / "etc/systemd/system/sgw-gateway.service").exists()
    assert not (tmp_path / "etc/sysusers.d").exists()
    assert not (tmp_path / "var/lib/sgw").exists()


def test_default_binary_is_the_running_sgw(tmp_path: Path) -> None:
    assert main(["install", "--prefix", str(tmp_path), "--unit", "gateway"]) == 0
    text = (tmp_path / "etc/systemd/system/sgw-gateway.service").read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    binary = exec_start.removeprefix("ExecStart=").split()[0]
    assert Path(binary).is_absolute()
    assert Path(binary).name == "sgw"
    assert binary == str(Path(sys.executable).parent / "sgw") or binary == "/usr/local/bin/sgw"


def test_relative_binary_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--prefix", str(tmp_path), "--sgw-bin", "bin/sgw"]) == 2
    assert "absolute" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_binary_hidden_by_protecthome_is_warned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--prefix", str(tmp_path), "--sgw-bin", "/home/op/.local/bin/sgw"]) == 0
    assert "warning:" in capsys.readouterr().err


def test_unwritable_prefix_is_a_local_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "etc"
    blocker.write_text("a file where a directory must go")
    assert main(["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN]) == 2
    assert "cannot" in capsys.readouterr().err
