"""`sgw install` into a temporary prefix: files, modes, idempotence, and no system commands."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import run_cli

SGW_BIN = "/opt/sgw/bin/sgw"


@pytest.fixture(autouse=True)
def _no_system_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a prefix other than / nothing may run systemctl, systemd-sysusers or chown.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"subprocess.run called: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_installs_units_configs_and_directories(tmp_path: Path) -> None:
    rc, out, err = run_cli(["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN])
    assert rc == 0, err
    units = tmp_path / "etc/systemd/system"
    for name, sub in (("sgw-gateway.service", "gateway"), ("sgw-agent.service", "agent")):
        text = (units / name).read_text()
        assert f"ExecStart={SGW_BIN} {sub} --config /etc/sgw/{sub}.toml" in text
        assert "/usr/local/bin/sgw" not in text
        assert _mode(units / name) == 0o644
        assert (tmp_path / f"etc/sgw/{sub}.toml").is_file()
    assert (tmp_path / "etc/sysusers.d/sgw.conf").read_text().startswith("u sgw ")
    assert "LimitNOFILE=" in (units / "mosquitto.service.d/sgw.conf").read_text()
    # The daily CRL renewal comes with the gateway, running the same sgw.
    crl = (units / "sgw-crl.service").read_text()
    assert f"ExecStart={SGW_BIN} ca crl --dir /var/lib/sgw" in crl
    assert "/usr/local/bin/sgw" not in crl
    assert "OnCalendar=daily" in (units / "sgw-crl.timer").read_text()
    assert _mode(units / "sgw-crl.service") == _mode(units / "sgw-crl.timer") == 0o644
    assert _mode(tmp_path / "var/lib/sgw") == 0o750
    assert _mode(tmp_path / "etc/sgw/agent") == 0o700
    # The operator is told the next steps, daemon-reload first.
    assert "systemctl daemon-reload" in out
    assert "systemctl enable --now sgw-gateway.service" in out
    assert "systemctl enable --now sgw-agent.service" in out
    assert out.index("daemon-reload") < out.index("enable --now")
    assert "systemctl enable --now sgw-crl.timer" in out


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    args = ["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN, "--json"]
    rc, out, err = run_cli(args)
    assert rc == 0, err
    rc, out, err = run_cli(args)
    assert rc == 0, err
    report = json.loads(out)
    assert {a["action"] for a in report["actions"]} <= {"unchanged", "exists", "skip"}


def test_json_report_lists_actions(tmp_path: Path) -> None:
    args = ["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN, "--json"]
    rc, out, err = run_cli(args)
    assert rc == 0, err
    config = tmp_path / "etc/sgw/gateway.toml"
    config.write_text(config.read_text().replace('id = "gw-1"', 'id = "gw-7"'))
    unit = tmp_path / "etc/systemd/system/sgw-agent.service"
    unit.write_text("stale\n")
    rc, out, err = run_cli(args)
    assert rc == 0, err
    report = json.loads(out)
    by_path = {a["path"]: a["action"] for a in report["actions"]}
    assert by_path[str(config)] == "keep"
    assert 'id = "gw-7"' in config.read_text()
    assert by_path[str(unit)] == "update"
    assert "ExecStart=" in unit.read_text()
    assert by_path[str(tmp_path / "etc/systemd/system/sgw-gateway.service")] == "unchanged"
    assert by_path[str(tmp_path / "var/lib/sgw")] == "exists"
    assert report["dry_run"] is False
    assert any(a["action"] == "skip" and a["path"].startswith("systemd-sysusers") for a in report["actions"])


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    rc, out, err = run_cli(["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN, "--dry-run"])
    assert rc == 0, err
    assert list(tmp_path.iterdir()) == []
    assert "would do" in out
    assert "sgw-gateway.service" in out


def test_dry_run_on_the_live_root_runs_nothing() -> None:
    # --prefix / with --dry-run is how an operator previews a real install; the fixture forbids commands.
    rc, out, err = run_cli(["install", "--dry-run", "--json", "--sgw-bin", SGW_BIN])
    assert rc == 0, err
    report = json.loads(out)
    assert report["prefix"] == "/"
    assert all(a["action"] != "run" for a in report["actions"])


def test_agent_only(tmp_path: Path) -> None:
    rc, _out, err = run_cli(["install", "--prefix", str(tmp_path), "--unit", "agent", "--sgw-bin", SGW_BIN])
    assert rc == 0, err
    assert (tmp_path / "etc/systemd/system/sgw-agent.service").is_file()
    assert not (tmp_path / "etc/systemd/system/sgw-gateway.service").exists()
    assert not (tmp_path / "etc/sysusers.d").exists()
    assert not (tmp_path / "etc/systemd/system/mosquitto.service.d").exists()
    assert not (tmp_path / "var/lib/sgw").exists()
    assert not (tmp_path / "etc/systemd/system/sgw-crl.timer").exists()


def test_default_binary_is_the_running_sgw(tmp_path: Path) -> None:
    rc, _out, err = run_cli(["install", "--prefix", str(tmp_path), "--unit", "gateway"])
    assert rc == 0, err
    text = (tmp_path / "etc/systemd/system/sgw-gateway.service").read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    binary = exec_start.removeprefix("ExecStart=").split()[0]
    assert Path(binary).is_absolute()
    assert Path(binary).name == "sgw"
    assert binary == str(Path(sys.executable).parent / "sgw") or binary == "/usr/local/bin/sgw"


def test_relative_binary_is_a_usage_error(tmp_path: Path) -> None:
    rc, _out, err = run_cli(["install", "--prefix", str(tmp_path), "--sgw-bin", "bin/sgw"])
    assert rc == 2, err
    assert "absolute" in err
    assert list(tmp_path.iterdir()) == []


def test_binary_hidden_by_protecthome_is_warned(tmp_path: Path) -> None:
    rc, _out, err = run_cli(["install", "--prefix", str(tmp_path), "--sgw-bin", "/home/op/.local/bin/sgw"])
    assert rc == 0, err
    assert "warning:" in err


def test_unwritable_prefix_is_a_local_error(tmp_path: Path) -> None:
    blocker = tmp_path / "etc"
    blocker.write_text("a file where a directory must go")
    rc, _out, err = run_cli(["install", "--prefix", str(tmp_path), "--sgw-bin", SGW_BIN])
    assert rc == 2, err
    assert "cannot" in err


def test_live_install_enables_the_crl_timer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real install (--prefix /), with its files redirected into tmp_path and its commands recorded.
    from gateway.cli import install

    calls: list[list[str]] = []

    def record(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(subprocess, "run", record)
    monkeypatch.setattr(install, "_under", lambda _prefix, absolute: tmp_path / absolute.lstrip("/"))
    rc, out, err = run_cli(["install", "--unit", "gateway", "--sgw-bin", SGW_BIN, "--json"])
    assert rc == 0, err
    assert json.loads(out)["prefix"] == "/"
    assert (tmp_path / "etc/systemd/system/sgw-crl.timer").is_file()
    enables = [argv for argv in calls if argv[:2] == ["systemctl", "enable"]]
    assert len(enables) == 1
    assert enables[0][-1] == "sgw-crl.timer"
    booted = Path("/run/systemd/system").is_dir()
    assert ("--now" in enables[0]) == booted  # without a running systemd, enable only links the timer
    if booted:
        assert calls.index(["systemctl", "daemon-reload"]) < calls.index(enables[0])
    assert "sgw-crl.timer" not in " ".join(json.loads(out)["next_steps"])
