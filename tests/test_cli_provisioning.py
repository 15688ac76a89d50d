"""`sgw ca/device/broker` through the real CLI: bundles, bad input changes nothing, CSV fleets,
rotation, removal, concurrent processes, and no secret in any output."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway.registry.store import Registry
from tests.support.cli import SGW_ARGV
from tests.support.provision import provision, run_cli

# Every (stdout, stderr) any test here produced; scanned for key material at the end of the module.
OUTPUTS: list[str] = []


def sgw(*argv: str) -> tuple[int, str, str]:
    rc, out, err = run_cli(argv)
    OUTPUTS.append(out + err)
    return rc, out, err


def tree(home: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under the home with mode and content hash; the registry by its rows."""
    result: dict[str, tuple[int, str]] = {}
    if not home.exists():
        return result
    for path in sorted(home.rglob("*")):
        rel = str(path.relative_to(home))
        if rel.startswith("registry.db"):
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        result[rel] = (mode, digest)
    if (home / "registry.db").exists():
        conn = sqlite3.connect(home / "registry.db")
        for table in ("meta", "devices", "keys", "certs", "replay"):
            rows = conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()  # noqa: S608
            result[f"registry:{table}"] = (0, hashlib.sha256(repr(rows).encode()).hexdigest())
        conn.close()
    return result


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return provision(tmp_path / "home", ["dev-1", "dev-2"]).home


def test_ca_init_refuses_to_overwrite(home: Path) -> None:
    before = tree(home)
    rc, _out, err = sgw("ca", "init", "--dir", str(home))
    assert rc == 2
    assert err.count("\n") == 1 and "--force" in err
    assert tree(home) == before


def test_ca_init_force_starts_over(home: Path) -> None:
    old_ca = (home / "ca" / "ca.crt").read_bytes()
    rc, _, err = sgw("ca", "init", "--dir", str(home), "--force")
    assert rc == 0, err
    assert (home / "ca" / "ca.crt").read_bytes() != old_ca
    assert list((home / "devices").iterdir()) == []
    with Registry.open(home / "registry.db") as reg:
        assert reg.list() == []
    assert not [p for p in home.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("argv", [
    ["--san", "bad name"], ["--san", ""], ["--broker-port", "0"], ["--broker-host", "a b"],
])
def test_ca_init_bad_options_create_nothing(tmp_path: Path, argv: list[str]) -> None:
    rc, _, err = sgw("ca", "init", "--dir", str(tmp_path / "new"), *argv)
    assert rc == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()


def test_ca_init_json_and_default_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGW_HOME", str(tmp_path / "envhome"))
    rc, out, _ = sgw("ca", "init", "--json")
    assert rc == 0
    assert json.loads(out)["home"] == str(tmp_path / "envhome")
    assert (tmp_path / "envhome" / "gateway.toml").exists()


def test_device_add_writes_a_complete_bundle(home: Path) -> None:
    rc, _out, err = sgw("device", "add", "pump-7", "--kind", "vibration", "--broker-host", "mqtt.plant",
                       "--broker-port", "9883", "--dir", str(home))
    assert rc == 0, err
    bundle = home / "devices" / "pump-7"
    agent = tomllib.loads((bundle / "agent.toml").read_text())
    assert agent["device"] == {"id": "pump-7", "kind": "vibration"}
    assert (agent["mqtt"]["host"], agent["mqtt"]["port"]) == ("mqtt.plant", 9883)
    assert agent["e2e"]["device_key_id"] == 1
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    with Registry.open(home / "registry.db") as reg:
        rec = reg.get("pump-7")
    assert rec is not None and rec.keys[0].public == (bundle / "e2e.pub").read_bytes()


BAD_IDS = ["", "x" * 65, "a+b", "a#b", "a/b", "a\x07b", "a\nb", "sgw-thing", "SGW-thing", "a b", "..", "ü"]


@pytest.mark.parametrize("device_id", BAD_IDS)
def test_invalid_ids_are_refused_and_change_nothing(home: Path, device_id: str) -> None:
    before = tree(home)
    rc, out, err = sgw("device", "add", device_id, "--dir", str(home))
    assert rc == 2
    assert out == ""
    assert err.startswith("sgw: error: invalid device id") and err.count("\n") == 1
    assert tree(home) == before


def test_64_char_id_is_fine(home: Path) -> None:
    rc, _, err = sgw("device", "add", "x" * 64, "--dir", str(home))
    assert rc == 0, err


@pytest.mark.parametrize("argv", [
    ["device", "add", "dev-1"],
    ["device", "show", "nope"],
    ["device", "revoke", "nope"],
    ["device", "rotate", "nope"],
    ["device", "remove", "nope"],
    ["device", "add", "dev-9", "--broker-port", "70000"],
    ["device", "add", "dev-9", "--kind", "bad kind"],
    ["device", "add"],
])
def test_bad_requests_are_one_line_and_change_nothing(home: Path, argv: list[str]) -> None:
    before = tree(home)
    rc, out, err = sgw(*argv, "--dir", str(home))
    assert rc == 2
    assert out == ""
    assert err.startswith("sgw: error: ") and err.count("\n") == 1, err
    assert tree(home) == before


def test_missing_ca_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    for argv in (["device", "add", "dev-1"], ["device", "list"], ["device", "revoke", "dev-1"],
                 ["broker", "config", "--out", str(tmp_path / "b")]):
        rc, _out, err = sgw(*argv, "--dir", str(tmp_path / "nohome"))
        assert rc == 2
        assert "sgw ca init" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_revoked_device_cannot_be_added_again_or_rotated(home: Path) -> None:
    rc, out, _ = sgw("device", "revoke", "dev-1", "--json", "--dir", str(home))
    assert rc == 0 and json.loads(out)["status"] == "revoked"
    rc, out, _ = sgw("device", "show", "dev-1", "--json", "--dir", str(home))
    assert json.loads(out)["status"] == "revoked" and json.loads(out)["revoked_ns"] > 0
    before = tree(home)
    assert sgw("device", "revoke", "dev-1", "--dir", str(home))[0] == 2
    assert sgw("device", "rotate", "dev-1", "--dir", str(home))[0] == 2
    assert sgw("device", "add", "dev-1", "--dir", str(home))[0] == 2
    assert tree(home) == before


def test_list_and_show(home: Path) -> None:
    rc, out, _ = sgw("device", "list", "--dir", str(home))
    assert rc == 0
    assert "dev-1" in out and "dev-2" in out and "active" in out
    rc, out, _ = sgw("device", "list", "--json", "--dir", str(home))
    data = json.loads(out)
    assert [d["id"] for d in data] == ["dev-1", "dev-2"]
    assert data[0]["keys"][0]["public"] == (home / "devices" / "dev-1" / "e2e.pub").read_bytes().hex()
    rc, out, _ = sgw("device", "show", "dev-2", "--json", "--dir", str(home))
    assert json.loads(out)["status"] == "active"
    rc, out, _ = sgw("device", "show", "dev-2", "--dir", str(home))
    assert "dev-2" in out and "key_id 1" in out


def test_rotate_rewrites_the_bundle(home: Path) -> None:
    bundle = home / "devices" / "dev-1"
    old = {n: (bundle / n).read_bytes() for n in ("device.crt", "device.key", "e2e.key", "e2e.pub")}
    (bundle / "outbox.db").write_bytes(b"agent state")  # an agent running from its bundle keeps its outbox
    rc, out, err = sgw("device", "rotate", "dev-1", "--grace", "600", "--json", "--dir", str(home))
    assert rc == 0, err
    info = json.loads(out)
    assert info["key_id"] == 2
    for name, data in old.items():
        assert (bundle / name).read_bytes() != data, name
    assert (bundle / "outbox.db").read_bytes() == b"agent state"
    assert tomllib.loads((bundle / "agent.toml").read_text())["e2e"]["device_key_id"] == 2
    assert stat.S_IMODE((bundle / "e2e.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((bundle / "device.key").stat().st_mode) == 0o600
    with Registry.open(home / "registry.db") as reg:
        keys = reg.snapshot().get("dev-1")
    assert keys is not None
    assert keys.keys[1].public == old["e2e.pub"] and keys.keys[1].not_after_ns == info["old_valid_until_ns"]
    assert keys.keys[2].public == (bundle / "e2e.pub").read_bytes() and keys.keys[2].not_after_ns is None
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]


def test_rotate_keeps_operator_edits_in_agent_toml(home: Path) -> None:
    agent = home / "devices" / "dev-1" / "agent.toml"
    agent.write_text(agent.read_text().replace('type = "simulated"', 'type = "replay"')
                     .replace('path = ""', 'path = "/data/run.csv"'))
    assert sgw("device", "rotate", "dev-1", "--dir", str(home))[0] == 0
    data = tomllib.loads(agent.read_text())
    assert data["source"]["type"] == "replay" and data["source"]["path"] == "/data/run.csv"
    assert data["e2e"]["device_key_id"] == 2


def test_rotate_failure_while_writing_changes_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.pki import home as home_mod

    calls = {"n": 0}
    real = home_mod.write_new

    def flaky(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("No space left on device")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(home_mod, "write_new", flaky)
    before = tree(home)
    rc, _, err = sgw("device", "rotate", "dev-1", "--dir", str(home))
    assert calls["n"] == 4
    assert rc == 2 and "No space left" in err and err.count("\n") == 1
    assert tree(home) == before


def test_remove_deletes_bundle_and_row(home: Path) -> None:
    rc, out, err = sgw("device", "remove", "dev-1", "--json", "--dir", str(home))
    assert rc == 0, err
    assert json.loads(out)["status"] == "removed"
    assert not (home / "devices" / "dev-1").exists()
    assert not [p for p in (home / "devices").iterdir() if p.name.startswith(".")]
    with Registry.open(home / "registry.db") as reg:
        assert reg.get("dev-1") is None
        assert reg.get("dev-2") is not None
    # The id is free again: a new identity under the old name.
    assert sgw("device", "add", "dev-1", "--dir", str(home))[0] == 0


def test_csv_fleet_with_plain_progress(home: Path, tmp_path: Path) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text("id,kind,broker_port\n# comment lines and blank lines are ignored\n\n"
                   + "".join(f"fleet-{i:04d},vibration,{8000 + i}\n" for i in range(300)))
    rc, out, err = sgw("device", "add", "--from", str(csv), "--dir", str(home))
    assert rc == 0, err
    assert "added 300 devices" in out
    lines = err.splitlines()
    assert lines[-1] == "issued 300/300" and 2 <= len(lines) <= 11
    with Registry.open(home / "registry.db") as reg:
        assert len(reg.list()) == 302
    agent = tomllib.loads((home / "devices" / "fleet-0007" / "agent.toml").read_text())
    assert agent["mqtt"]["port"] == 8007


@pytest.mark.parametrize(("body", "message"), [
    ("id\nok-1\nbad/2\nok-3\n", "row 3: invalid device id"),
    ("id\nok-1\nok-1\n", "listed twice"),
    ("id\nok-1\ndev-2\n", "dev-2 already exists"),
    ("name\nok-1\n", "'id' column"),
    ("id,colour\nok-1,red\n", "unknown column 'colour'"),
    ("id,broker_port\nok-1,abc\n", "row 2: broker_port must be an integer"),
    ("id\n", "no devices"),
])
def test_csv_any_bad_row_aborts_the_whole_file(home: Path, tmp_path: Path, body: str, message: str) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text(body)
    before = tree(home)
    rc, _out, err = sgw("device", "add", "--from", str(csv), "--dir", str(home))
    assert rc == 2
    assert message in err and err.count("\n") == 1, err
    assert tree(home) == before


def test_failure_during_issuance_leaves_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.pki import home as home_mod

    calls = {"n": 0}
    real = home_mod._build_bundle

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("No space left on device")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(home_mod, "_build_bundle", flaky)
    csv = tmp_path / "d.csv"
    csv.write_text("id\n" + "".join(f"n-{i}\n" for i in range(10)))
    before = tree(home)
    rc, _, err = sgw("device", "add", "--from", str(csv), "--dir", str(home))
    assert rc == 2
    assert err.splitlines()[-1] == "sgw: error: No space left on device"
    assert tree(home) == before


def test_concurrent_cli_processes(home: Path) -> None:
    env = {**os.environ, "SGW_HOME": str(home)}
    cmds = [[*SGW_ARGV, "device", "add", f"c-{i}"] for i in range(8)]
    cmds += [[*SGW_ARGV, "device", "add", "same"] for _ in range(3)]
    cmds += [[*SGW_ARGV, "device", "revoke", "dev-2"]]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    OUTPUTS.extend(out + err for _, out, err in results)
    assert all(rc == 0 for rc, _, _ in results[:8]), results[:8]
    same = [rc for rc, _, _ in results[8:11]]
    assert sorted(same) == [0, 2, 2], results[8:11]
    assert results[11][0] == 0
    conn = sqlite3.connect(home / "registry.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with Registry.open(home / "registry.db") as reg:
        ids = {r.device_id for r in reg.list()}
        assert reg.get("dev-2").status == "revoked"  # type: ignore[union-attr]
    # Registry rows and bundles correspond one to one, with no staging leftovers.
    assert ids == {p.name for p in (home / "devices").iterdir()}
    assert ids == {"dev-1", "dev-2", "same", *(f"c-{i}" for i in range(8))}


def test_help_for_every_command() -> None:
    for argv in (["ca", "--help"], ["ca", "init", "--help"], ["device", "add", "--help"],
                 ["device", "rotate", "--help"], ["broker", "config", "--help"]):
        rc, out, _ = sgw(*argv)
        assert rc == 0 and "usage:" in out


def test_zz_no_secret_in_any_output(tmp_path: Path) -> None:
    """Runs last in this module: every key file made above is gone, so scan with fresh keys too."""
    home = provision(tmp_path / "h", ["s-1"]).home
    sgw("device", "add", "s-2", "--dir", str(home))
    sgw("device", "list", "--dir", str(home))
    sgw("device", "show", "s-1", "--json", "--dir", str(home))
    sgw("device", "rotate", "s-1", "--json", "--dir", str(home))
    sgw("broker", "config", "--out", str(tmp_path / "b"), "--run-as-root", "--json", "--dir", str(home))
    text = "\n".join(OUTPUTS)
    assert "PRIVATE KEY" not in text
    secrets: list[bytes] = []
    for path in home.rglob("*.key"):
        data = path.read_bytes()
        if data.startswith(b"-----BEGIN"):
            body = b"".join(data.splitlines()[1:-1])
            secrets += [body[i:i + 24] for i in range(0, len(body) - 24, 24)]
            raw = base64.b64decode(body)
            secrets += [raw[-32:].hex().encode()]
        else:
            secrets += [data.hex().encode(), base64.b64encode(data), base64.b64encode(data).rstrip(b"=")]
    assert secrets
    blob = text.encode()
    leaked = [s for s in secrets if s in blob or s.lower() in blob.lower()]
    assert not leaked
