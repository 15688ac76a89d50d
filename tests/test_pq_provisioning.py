"""Provisioning for crypto agility and suite 3: the gateway's ML-KEM-768 key (`sgw ca init`, `sgw ca
migrate`), `sgw device add --suite` (registry minimum, bundle, agent.toml), the registry's schema 1 -> 2
migration, and the gateway's and agent's configuration of suites."""

from __future__ import annotations

import json
import sqlite3
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from gateway.agent.config import load_agent_config, load_e2e_keys
from gateway.core import keys, suites
from gateway.core.session import Opened, Opener, Sealer
from gateway.errors import ConfigError
from gateway.registry.store import Registry
from gateway.server.config import load_config
from tests.support.provision import provision, run_cli


def test_ca_init_makes_the_gateway_kem_key_and_bundles_carry_its_public_half(tmp_path: Path) -> None:
    env = provision(tmp_path / "h", ["dev-1"])
    private = env.home / "gateway" / "e2e_mlkem.key"
    public = env.home / "gateway" / "e2e_mlkem.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert len(private.read_bytes()) == 64 and len(public.read_bytes()) == 1184
    derived = keys.kem_public_bytes(MLKEM768PrivateKey.from_seed_bytes(private.read_bytes()))
    assert derived == public.read_bytes()
    assert (env.bundle("dev-1") / "gateway_e2e_mlkem.pub").read_bytes() == public.read_bytes()
    conf = load_config(env.gateway_toml)
    assert conf.e2e.allowed_suites() == {suites.X25519, suites.HYBRID}
    # A device added without --suite seals suite 1 and may use either.
    agent = tomllib.loads((env.bundle("dev-1") / "agent.toml").read_text())
    assert agent["e2e"]["suite"] == "x25519"
    with Registry.open(env.home / "registry.db") as reg:
        assert reg.snapshot().get("dev-1").min_suite == suites.X25519  # type: ignore[union-attr]


def test_device_add_suite_records_the_minimum_and_the_bundle_seals_with_it(tmp_path: Path) -> None:
    env = provision(tmp_path / "h", ["pq-1"], suite="x25519-mlkem768")
    cfg = load_agent_config(env.bundle("pq-1") / "agent.toml")
    assert cfg.e2e.suite == "x25519-mlkem768" and cfg.e2e.suite_number == suites.HYBRID
    e2e = load_e2e_keys(cfg.e2e)
    assert e2e.gateway_kem_public == (env.home / "gateway" / "e2e_mlkem.pub").read_bytes()
    with Registry.open(env.home / "registry.db") as reg:
        record = reg.snapshot().get("pq-1")
        assert record is not None and record.min_suite == suites.HYBRID
        assert reg.get("pq-1").to_json()["min_suite"] == "x25519-mlkem768"  # type: ignore[union-attr]
        lookup = reg.snapshot()
    # What the bundle seals, the home's gateway key opens.
    sealer = Sealer(device_id="pq-1", device_key=e2e.device_key, device_key_id=1,
                    gateway_public=e2e.gateway_public, gateway_key_id=1, epoch=1,
                    suite=cfg.e2e.suite_number, gateway_kem_public=e2e.gateway_kem_public)
    conf = load_config(env.gateway_toml)
    kem = keys.kem_private_from_bytes(conf.e2e.mlkem_private_key_file.read_bytes())
    opener = Opener(gateway_keys={1: keys.private_from_bytes(conf.e2e.private_key_file.read_bytes())},
                    gateway_kem_keys={1: kem}, lookup=lookup.get)
    assert isinstance(opener.open(sealer.seal(b"x"), 0, "pq-1"), Opened)
    rc, out, _ = run_cli(["device", "show", "pq-1", "--dir", str(env.home)])
    assert rc == 0 and "min suite:   x25519-mlkem768" in out


def test_device_add_suite_from_csv_and_refusals_change_nothing(tmp_path: Path) -> None:
    env = provision(tmp_path / "h", [])
    csv = tmp_path / "d.csv"
    csv.write_text("id,suite\na-1,x25519-mlkem768\na-2,\n")
    rc, out, err = run_cli(["device", "add", "--from", str(csv), "--dir", str(env.home), "--json"])
    assert rc == 0, err
    assert json.loads(out)["suites"] == {"a-1": "x25519-mlkem768", "a-2": "x25519"}
    before = sorted(p.name for p in (env.home / "devices").iterdir())
    csv.write_text("id,suite\nb-1,x25519\nb-2,kyber512\n")
    rc, _, err = run_cli(["device", "add", "--from", str(csv), "--dir", str(env.home)])
    assert rc != 0 and "row 3: suite must be one of" in err and err.count("\n") == 1
    rc, _, err = run_cli(["device", "add", "c-1", "--suite", "kyber512", "--dir", str(env.home)])
    assert rc != 0
    assert sorted(p.name for p in (env.home / "devices").iterdir()) == before
    rc, out, _ = run_cli(["device", "add", "--help"])
    assert rc == 0 and "--suite" in out


def _make_old_home(tmp_path: Path) -> Path:
    """A home as an sgw before issue 17 left it: no ML-KEM key, no mlkem line, registry schema 1."""
    env = provision(tmp_path / "h", ["old-1"])
    home = env.home
    (home / "gateway" / "e2e_mlkem.key").unlink()
    (home / "gateway" / "e2e_mlkem.pub").unlink()
    (env.bundle("old-1") / "gateway_e2e_mlkem.pub").unlink()
    text = env.gateway_toml.read_text()
    lines = [ln for ln in text.splitlines(keepends=True)
             if not ln.startswith(("mlkem_private_key_file", "suites"))]
    env.gateway_toml.write_text("".join(lines))
    conn = sqlite3.connect(home / "registry.db")
    conn.executescript("""
        ALTER TABLE devices DROP COLUMN min_suite;
        UPDATE meta SET value = 1 WHERE name = 'schema';
    """)
    conn.close()
    return home


def test_an_old_home_keeps_working_and_migrates(tmp_path: Path) -> None:
    home = _make_old_home(tmp_path)
    # The old gateway.toml still loads: suite 1 only, nothing to migrate by hand first.
    conf = load_config(home / "gateway.toml")
    assert conf.e2e.allowed_suites() == {suites.X25519}
    # The registry migrates on open (additive): existing devices keep suite 1.
    with Registry.open(home / "registry.db") as reg:
        assert reg.snapshot().get("old-1").min_suite == suites.X25519  # type: ignore[union-attr]
    # A suite-3 device needs the ML-KEM key first: refused with the fix, nothing written.
    rc, _, err = run_cli(["device", "add", "new-1", "--suite", "x25519-mlkem768", "--dir", str(home)])
    assert rc != 0 and "sgw ca migrate" in err
    assert not (home / "devices" / "new-1").exists()
    rc, out, _ = run_cli(["ca", "migrate", "--dry-run", "--dir", str(home)])
    assert rc == 0 and "ML-KEM-768" in out and "mlkem_private_key_file" in out
    assert not (home / "gateway" / "e2e_mlkem.key").exists()
    rc, _, err = run_cli(["ca", "migrate", "--dir", str(home)])
    assert rc == 0, err
    assert stat.S_IMODE((home / "gateway" / "e2e_mlkem.key").stat().st_mode) == 0o600
    conf = load_config(home / "gateway.toml")
    assert conf.e2e.allowed_suites() == {suites.X25519, suites.HYBRID}
    rc, out, _ = run_cli(["ca", "migrate", "--dry-run", "--dir", str(home)])
    assert "nothing to migrate" in out
    rc, _, err = run_cli(["device", "add", "new-1", "--suite", "x25519-mlkem768", "--dir", str(home)])
    assert rc == 0, err


def test_gateway_suites_config(tmp_path: Path) -> None:
    env = provision(tmp_path / "h", [])
    text = env.gateway_toml.read_text()
    only_pq = text.replace('suites = ["x25519", "x25519-mlkem768"]', 'suites = ["x25519-mlkem768"]')
    assert only_pq != text
    env.gateway_toml.write_text(only_pq)
    assert load_config(env.gateway_toml).e2e.allowed_suites() == {suites.HYBRID}
    env.gateway_toml.write_text(text.replace('suites = ["x25519", "x25519-mlkem768"]', 'suites = ["rsa"]'))
    with pytest.raises(ConfigError, match=r"e2e\.suites: unknown suite 'rsa'"):
        load_config(env.gateway_toml)
    no_key = text.replace('mlkem_private_key_file = "gateway/e2e_mlkem.key"', 'mlkem_private_key_file = ""')
    env.gateway_toml.write_text(no_key)
    with pytest.raises(ConfigError, match=r"x25519-mlkem768 needs e2e\.mlkem_private_key_file"):
        load_config(env.gateway_toml)
    (env.home / "gateway" / "short.key").write_bytes(b"x" * 32)
    env.gateway_toml.write_text(text.replace("gateway/e2e_mlkem.key", "gateway/short.key"))
    with pytest.raises(ConfigError, match="64-byte ML-KEM-768 seed"):
        load_config(env.gateway_toml)


def test_agent_suite_config_errors(tmp_path: Path) -> None:
    env = provision(tmp_path / "h", ["a-1"])
    path = env.bundle("a-1") / "agent.toml"
    text = path.read_text()
    path.write_text(text.replace('suite = "x25519"', 'suite = "x25519-mlkem768"')
                    .replace('gateway_mlkem_public_key_file = "gateway_e2e_mlkem.pub"',
                             'gateway_mlkem_public_key_file = ""'))
    with pytest.raises(ConfigError, match="gateway_mlkem_public_key_file: required"):
        load_agent_config(path)
    path.write_text(text.replace('suite = "x25519"', 'suite = "x448"'))
    with pytest.raises(ConfigError, match=r"e2e\.suite: unknown suite"):
        load_agent_config(path)
    (env.bundle("a-1") / "gateway_e2e_mlkem.pub").write_bytes(b"k" * 100)
    path.write_text(text.replace('suite = "x25519"', 'suite = "x25519-mlkem768"'))
    with pytest.raises(ConfigError, match="gateway_mlkem_public_key_file: an ML-KEM-768 public key is 1184"):
        load_e2e_keys(load_agent_config(path).e2e)


def test_set_suite_moves_a_device_up_in_two_steps_and_refuses_a_silent_downgrade(tmp_path: Path) -> None:
    env = provision(tmp_path / "h", ["up-1"])
    home, config = str(env.home), env.bundle("up-1") / "agent.toml"

    def floor() -> int:
        with Registry.open(env.home / "registry.db") as reg:
            return reg.snapshot().get("up-1").min_suite  # type: ignore[union-attr]

    with Registry.open(env.home / "registry.db") as reg:
        generation = reg.generation()
    rc, out, err = run_cli(["device", "set-suite", "up-1", "x25519-mlkem768", "--bundle-only", "--dir", home,
                            "--json"])
    assert rc == 0, err
    assert json.loads(out)["min_suite"] == "x25519" and floor() == suites.X25519
    assert load_agent_config(config).e2e.suite == "x25519-mlkem768"
    rc, out, err = run_cli(["device", "set-suite", "up-1", "x25519-mlkem768", "--dir", home])
    assert rc == 0, err
    assert "registry minimum x25519-mlkem768 (was x25519)" in out and floor() == suites.HYBRID
    with Registry.open(env.home / "registry.db") as reg:
        assert reg.generation() > generation  # running gateways reload it
    # Lowering the floor is a downgrade: refused unless asked for, and nothing changes.
    before = config.read_text()
    rc, _, err = run_cli(["device", "set-suite", "up-1", "x25519", "--dir", home])
    assert rc != 0 and "--lower" in err and err.count("\n") == 1
    assert floor() == suites.HYBRID and config.read_text() == before
    rc, _, err = run_cli(["device", "set-suite", "up-1", "x25519", "--lower", "--dir", home])
    assert rc == 0, err
    assert floor() == suites.X25519 and load_agent_config(config).e2e.suite == "x25519"
    rc, _, err = run_cli(["device", "set-suite", "nobody", "x25519", "--dir", home])
    assert rc != 0 and "unknown device" in err
    rc, out, _ = run_cli(["device", "set-suite", "--help"])
    assert rc == 0 and "--bundle-only" in out


def test_set_suite_on_a_bundle_from_before_suites(tmp_path: Path) -> None:
    env = provision(tmp_path / "h", ["old-2"])
    config = env.bundle("old-2") / "agent.toml"
    lines = [ln for ln in config.read_text().splitlines(keepends=True)
             if not ln.startswith(("suite", "gateway_mlkem_public_key_file"))]
    config.write_text("".join(lines))
    (env.bundle("old-2") / "gateway_e2e_mlkem.pub").unlink()
    assert load_agent_config(config).e2e.suite == "x25519"  # the default for an older agent.toml
    rc, _, err = run_cli(["device", "set-suite", "old-2", "x25519-mlkem768", "--dir", str(env.home)])
    assert rc == 0, err
    cfg = load_agent_config(config)
    assert cfg.e2e.suite == "x25519-mlkem768"
    assert load_e2e_keys(cfg.e2e).gateway_kem_public == (env.home / "gateway" / "e2e_mlkem.pub").read_bytes()
