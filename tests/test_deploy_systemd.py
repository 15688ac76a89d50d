"""deploy/systemd units, checked with the real systemd-analyze (works without systemd as PID 1).

`verify` fails when ExecStart's binary is missing, so the units are checked as `sgw install --prefix`
writes them, pointing at this venv's sgw; nothing else in them differs from the committed files.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from sgw_metrics_contract import DEPLOY, contract_toml

from tests.support.cli import run_cli

UNITS = ["sgw-gateway.service", "sgw-agent.service"]
CRL_UNITS = ["sgw-crl.service", "sgw-crl.timer"]
MAX_EXPOSURE = 2.0
SGW_BIN = str(Path(sys.executable).parent / "sgw")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("root")
    assert Path(SGW_BIN).is_file()
    rc, _, err = run_cli(["install", "--prefix", str(prefix), "--sgw-bin", SGW_BIN])
    assert rc == 0, err
    return prefix / "etc" / "systemd" / "system"


def _directives(unit: str, root: Path = DEPLOY / "systemd") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in (root / unit).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def _assert_verify_clean(path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on warnings; any line on stderr is a finding.
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 0


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_is_clean(installed: Path, unit: str) -> None:
    path = installed / unit
    assert f"ExecStart={SGW_BIN} " in path.read_text(encoding="utf-8")
    _assert_verify_clean(path)


@pytest.mark.parametrize("unit", CRL_UNITS)
def test_crl_units_verify_clean(installed: Path, unit: str) -> None:
    # Each file alone: verify of the timer also loads the service it triggers from the same folder.
    _assert_verify_clean(installed / unit)


def _exposure(path: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1))


@pytest.mark.parametrize("unit", [*UNITS, "sgw-crl.service"])
def test_security_exposure_at_most_2(installed: Path, unit: str) -> None:
    exposure = _exposure(installed / unit)
    assert exposure <= MAX_EXPOSURE, f"{unit}: exposure {exposure}"


def test_exposure_parser_sees_a_weak_unit(tmp_path: Path) -> None:
    # Guards the regex and the threshold: an unhardened unit must score far above 2.0.
    weak = tmp_path / "weak.service"
    weak.write_text(f"[Service]\nExecStart={SGW_BIN} gateway\n", encoding="utf-8")
    assert _exposure(weak) > 5.0


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_the_required_hardening(unit: str) -> None:
    d = _directives(unit)
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"][0]
    assert d["Restart"] == ["on-failure"]
    assert d.get("DynamicUser") == ["yes"] or d.get("User") not in (None, ["root"])
    assert d["StateDirectory"][0]
    assert d["LoadCredential"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]
    assert "@system-service" in d["SystemCallFilter"]
    # AF_UNIX must stay: sd_notify (READY/WATCHDOG) is a datagram to an AF_UNIX socket.
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "DeviceAllow" not in d, "device access only through the documented NPU/sensor drop-in"
    assert d["ExecStart"][0].startswith("/usr/local/bin/sgw ")


def test_crl_service_renews_as_sgw_and_reloads_the_broker_as_root() -> None:
    d = _directives("sgw-crl.service")
    gateway = _directives("sgw-gateway.service")
    assert d["Type"] == ["oneshot"]
    assert d["ExecStart"] == ["/usr/local/bin/sgw ca crl --dir /var/lib/sgw"]
    # Only the reload escapes the sandbox ('+'); it must reload, never stop, the broker when it can.
    privileged = [c for c in d["ExecStartPost"] if c.startswith("+")]
    assert privileged == ["+/bin/systemctl try-reload-or-restart mosquitto.service"]
    assert d["ExecStartPost"][-1] == "/usr/local/bin/sgw ca crl --dir /var/lib/sgw --check --days 30"
    assert "ExecStartPre" not in d
    # The same identity and state folder as the gateway (it owns the CA key and the registry).
    for key in ("User", "Group", "StateDirectory", "StateDirectoryMode", "UMask"):
        assert d[key] == gateway[key], key
    # The gateway's hardening, every line of it, plus no network at all.
    hardening = (
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateUsers", "PrivateMounts",
        "ProtectHostname", "ProtectClock", "ProtectKernelTunables", "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "NoNewPrivileges",
        "CapabilityBoundingSet", "AmbientCapabilities", "RestrictNamespaces", "RestrictRealtime",
        "RestrictSUIDSGID", "LockPersonality", "RemoveIPC", "KeyringMode", "SystemCallArchitectures",
        "SystemCallFilter", "SystemCallErrorNumber",
    )
    for key in hardening:
        assert d[key] == gateway[key], key
    assert d["PrivateNetwork"] == ["yes"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert d["ReadWritePaths"] == ["-/var/lib/mosquitto/sgw/crl"]
    assert "[Install]" not in (DEPLOY / "systemd" / "sgw-crl.service").read_text()  # the timer starts it


def test_crl_timer_runs_daily_and_catches_up() -> None:
    d = _directives("sgw-crl.timer")
    assert d["OnCalendar"] == ["daily"]
    assert d["Persistent"] == ["true"]
    assert d["RandomizedDelaySec"][0]
    assert d["WantedBy"] == ["timers.target"]
    assert "Unit" not in d  # triggers sgw-crl.service by name


def _crl_commands(installed: Path, home: Path) -> list[list[str]]:
    """The sgw command lines of the installed sgw-crl.service, pointed at `home`."""
    d = _directives("sgw-crl.service", installed)
    lines = d["ExecStart"] + [c for c in d["ExecStartPost"] if not c.startswith(("+", "-", "!", "@"))]
    assert all(line.startswith(f"{SGW_BIN} ") for line in lines)
    return [line.replace("/var/lib/sgw", str(home)).split()[1:] for line in lines]


def test_crl_service_commands_renew_and_check(installed: Path, tmp_path: Path) -> None:
    from gateway.pki.home import Home, add_crl_target

    home = tmp_path / "home"
    rc, _, err = run_cli(["ca", "init", "--dir", str(home)])
    assert rc == 0, err
    # A broker folder whose CRL copy is 10 days from expiry (the timer stopped a year ago).
    broker = tmp_path / "broker"
    (broker / "crl").mkdir(parents=True)
    stale = broker / "crl" / "crl.pem"
    stale.write_bytes(Home(home).require_ca().crl([], days=10))
    add_crl_target(Home(home), broker)
    renew, check = _crl_commands(installed, home)
    assert check[-3:] == ["--check", "--days", "30"]

    rc, _, err = run_cli(check)
    assert rc == 1
    assert str(stale) in err
    assert str(home / "ca" / "crl.pem") not in err  # the home's CRL (from ca init) is a year away

    rc, _, err = run_cli(renew)
    assert rc == 0, err
    rc, out, err = run_cli(check)
    assert rc == 0, err
    assert str(stale) in out
    # A CRL that cannot cover the asked margin, or cannot be read, fails the check too.
    assert run_cli([*check[:-1], "400"])[0] == 1
    stale.write_text("not a CRL")
    rc, _, err = run_cli(check)
    assert rc == 1
    assert "unreadable" in err


@pytest.mark.parametrize(
    ("unit", "config"), [("sgw-gateway.service", "gateway"), ("sgw-agent.service", "agent")]
)
def test_config_template_reads_keys_from_this_units_credentials(unit: str, config: str) -> None:
    d = _directives(unit)
    credentials = {entry.split(":", 1)[0] for entry in d["LoadCredential"]}
    text = (DEPLOY / "config" / f"{config}.toml").read_text(encoding="utf-8")
    used = set(re.findall(rf"/run/credentials/{re.escape(unit)}/([\w.]+)", text))
    assert used == credentials, f"config uses {sorted(used)}, unit loads {sorted(credentials)}"
    assert f"--config /etc/sgw/{config}.toml" in d["ExecStart"][0]
    # Every other absolute path the service writes must be inside its StateDirectory (ProtectSystem=strict).
    state = f"/var/lib/{d['StateDirectory'][0]}/"
    for path in re.findall(r'"(/[^"]+)"', text):
        assert path.startswith((f"/run/credentials/{unit}/", state)), path


@pytest.mark.parametrize("config", ["gateway", "agent"])
def test_config_template_has_exactly_the_contract_keys(config: str) -> None:
    def keys(doc: dict[str, object], where: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in doc.items():
            out.add(f"{where}{k}")
            if isinstance(v, dict):
                out |= keys(v, f"{where}{k}.")
        return out

    template = tomllib.loads((DEPLOY / "config" / f"{config}.toml").read_text(encoding="utf-8"))
    contract = tomllib.loads(contract_toml(f"{config}.toml"))
    assert keys(template) == keys(contract)


@pytest.mark.parametrize(
    ("unit", "config", "loader"),
    [
        ("sgw-gateway.service", "gateway", "gateway.server.config:load_config"),
        ("sgw-agent.service", "agent", "gateway.agent.config:load_agent_config"),
    ],
)
def test_config_template_loads_with_the_services_strict_loader(
    tmp_path: Path, unit: str, config: str, loader: str
) -> None:
    # The templates' absolute paths are mapped into tmp_path: credential files (the loaders check key
    # files are readable) and the state directory; everything else is loaded exactly as the unit would.
    module_name, func_name = loader.split(":")
    module = importlib.import_module(module_name)
    text = (DEPLOY / "config" / f"{config}.toml").read_text(encoding="utf-8")
    creds = tmp_path / "credentials"
    creds.mkdir()
    sizes = {"e2e_mlkem.key": 64}  # the ML-KEM-768 seed; every other key file here is 32 raw bytes
    for name in re.findall(rf"/run/credentials/{re.escape(unit)}/([\w.]+)", text):
        (creds / name).write_bytes(b"\x01" * sizes.get(name, 32))
    state = tmp_path / "state"
    state.mkdir()
    (state / "registry.db").write_bytes(b"")
    state_dir = f"/var/lib/{_directives(unit)['StateDirectory'][0]}"
    text = text.replace(f"/run/credentials/{unit}", str(creds)).replace(state_dir, str(state))
    path = tmp_path / f"{config}.toml"
    path.write_text(text, encoding="utf-8")
    cfg = getattr(module, func_name)(path)
    assert str(cfg.mqtt.key_file).startswith(str(creds))


MOSQUITTO_UNIT = Path("/usr/lib/systemd/system/mosquitto.service")
needs_mosquitto_unit = pytest.mark.skipif(
    not MOSQUITTO_UNIT.is_file(), reason="Debian mosquitto not installed"
)


@needs_mosquitto_unit
def test_mosquitto_dropin_verifies_clean(installed: Path, tmp_path: Path) -> None:
    # verify cannot apply a drop-in to a unit outside the live system; a drop-in's [Service] lines appended
    # to the unit are the same assignments in the same order, which is what systemd merges them into.
    dropin = installed / "mosquitto.service.d" / "sgw.conf"
    merged = tmp_path / "mosquitto.service"
    merged.write_text(MOSQUITTO_UNIT.read_text() + "\n" + dropin.read_text(), encoding="utf-8")
    _assert_verify_clean(merged)


@needs_mosquitto_unit
def test_mosquitto_dropin_lowers_exposure(tmp_path: Path) -> None:
    # security --root= reads the unit and its drop-ins from an image tree, as on the real host.
    (tmp_path / "usr/lib/systemd/system").mkdir(parents=True)
    shutil.copy(MOSQUITTO_UNIT, tmp_path / "usr/lib/systemd/system/mosquitto.service")

    def exposure() -> float:
        proc = subprocess.run(
            [
                "systemd-analyze",
                "security",
                "--offline=yes",
                "--no-pager",
                f"--root={tmp_path}",
                "mosquitto.service",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
        assert m, proc.stdout + proc.stderr
        return float(m.group(1))

    stock = exposure()
    rc, _, err = run_cli(["install", "--prefix", str(tmp_path), "--unit", "gateway", "--sgw-bin", SGW_BIN])
    assert rc == 0, err
    hardened = exposure()
    # mosquitto must start as root to drop to its own user, so it cannot reach the sgw units' 2.0.
    assert hardened <= 3.0 < stock, (stock, hardened)
