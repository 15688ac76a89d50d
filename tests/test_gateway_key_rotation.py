"""Issue 17, the gateway's static key rotated: the core's grace (both directions), the home's rotation
(files, every gateway*.toml, the commit point), and the agent's install of a new gateway key (atomic,
finished after a crash). The live path (real broker, gateway, agents) is in test_gateway_key_live.py."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from gateway.agent import gateway_key as agk
from gateway.agent.config import load_agent_config
from gateway.core import keys, suites
from gateway.core.downlink import DownlinkOpener, DownlinkRefusedError, DownlinkSealer, body_problem
from gateway.core.reasons import DownlinkReason, Reason
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Rejected, Sealer
from gateway.core.topics import cmd_topic_for
from gateway.errors import ConfigError, ProvisioningError
from gateway.pb import downlink_pb2 as dpb
from gateway.pki import gateway_keys as gk
from gateway.pki.home import Home
from gateway.server.config import load_config
from tests.support.cli import run_cli
from tests.support.provision import provision

NOW = 1_800_000_000_000_000_000
OLD = keys.private_from_bytes(bytes(range(32)))
NEW = keys.private_from_bytes(bytes(range(1, 33)))
DEV = keys.private_from_bytes(bytes(range(32, 64)))


def _sealed(gateway: object, key_id: int, epoch: int = 1) -> bytes:
    s = Sealer(device_id="dev-1", device_key=DEV, device_key_id=1,
               gateway_public=keys.public_bytes(gateway), gateway_key_id=key_id, epoch=epoch)  # type: ignore[arg-type]
    return s.seal(b"x")


def _opener(ends_ns: int) -> Opener:
    lookup = {"dev-1": DeviceKeys("active", {1: KeyEntry(keys.public_bytes(DEV))})}.get
    return Opener(gateway_keys={1: OLD, 2: NEW}, lookup=lookup, gateway_key_not_after_ns={1: ends_ns})


def test_old_gateway_key_opens_during_the_grace_and_is_refused_typed_after() -> None:
    o = _opener(NOW + 10)
    assert isinstance(o.open(_sealed(OLD, 1), NOW, "dev-1"), Opened)
    assert isinstance(o.open(_sealed(NEW, 2, epoch=2), NOW, "dev-1"), Opened)
    late = o.open(_sealed(OLD, 1, epoch=3), NOW + 11, "dev-1")
    assert isinstance(late, Rejected) and late.reason is Reason.GATEWAY_KEY_RETIRED
    # The new key has no end; an ended key's refusal moved no state: the next new-key message opens.
    assert isinstance(o.open(_sealed(NEW, 2, epoch=3), NOW + 11, "dev-1"), Opened)


def test_opener_refuses_a_grace_for_every_key_or_an_unknown_one() -> None:
    lookup = {}.get
    with pytest.raises(ConfigError, match="no end"):
        Opener(gateway_keys={1: OLD}, lookup=lookup, gateway_key_not_after_ns={1: NOW})
    with pytest.raises(ConfigError, match="does not hold"):
        Opener(gateway_keys={1: OLD}, lookup=lookup, gateway_key_not_after_ns={7: NOW})


def _command(**fields: object) -> dpb.Downlink:
    return dpb.Downlink(command=dpb.Command(id="c1", expires_at_ms=NOW // 1_000_000 + 60_000, **fields))


def test_downlink_trusts_the_old_key_until_its_end_then_refuses_retired_key() -> None:
    opener = DownlinkOpener(device_id="dev-1", device_keys={1: DEV},
                            trusted_gateways={1: keys.public_bytes(OLD), 2: keys.public_bytes(NEW)},
                            trusted_until_ns={1: NOW + 10})
    topic = cmd_topic_for("dev-1")
    for n, (gateway, kid) in enumerate(((OLD, 1), (NEW, 2))):
        sealer = DownlinkSealer(sender=f"gw-{n}", gateway_key=gateway, gateway_key_id=kid, epoch=1)
        raw = sealer.seal(_command(kind=dpb.COMMAND_KIND_PING), device_id="dev-1",
                          device_public=keys.public_bytes(DEV), device_key_id=1)
        assert opener.open(raw, topic=topic, now_ns=NOW).gateway_key_id == kid
    sealer = DownlinkSealer(sender="gw-0", gateway_key=OLD, gateway_key_id=1, epoch=2)
    raw = sealer.seal(_command(kind=dpb.COMMAND_KIND_PING), device_id="dev-1",
                      device_public=keys.public_bytes(DEV), device_key_id=1)
    with pytest.raises(DownlinkRefusedError) as err:
        opener.open(raw, topic=topic, now_ns=NOW + 11)
    assert err.value.reason is DownlinkReason.RETIRED_KEY


def test_command_bodies_for_key_update_and_suite_are_bounded() -> None:
    good = _command(kind=dpb.COMMAND_KIND_UPDATE_GATEWAY_KEY, gateway_key_id=2, gateway_public=b"k" * 32,
                    previous_until_ms=5)
    assert body_problem(good) is None
    for bad in (
        _command(kind=dpb.COMMAND_KIND_UPDATE_GATEWAY_KEY, gateway_key_id=2, gateway_public=b"k" * 31,
                 previous_until_ms=5),
        _command(kind=dpb.COMMAND_KIND_UPDATE_GATEWAY_KEY, gateway_key_id=2, gateway_public=b"k" * 32),
        _command(kind=dpb.COMMAND_KIND_UPDATE_GATEWAY_KEY, gateway_key_id=2, gateway_public=b"k" * 32,
                 gateway_mlkem_public=b"m" * 100, previous_until_ms=5),
        _command(kind=dpb.COMMAND_KIND_PING, gateway_public=b"k" * 32),
        _command(kind=dpb.COMMAND_KIND_SET_SUITE),
        _command(kind=dpb.COMMAND_KIND_SET_SUITE, suite=suites.DOWNLINK),
        _command(kind=dpb.COMMAND_KIND_PING, suite=suites.X25519),
    ):
        assert body_problem(bad) is not None, bad
    assert body_problem(_command(kind=dpb.COMMAND_KIND_SET_SUITE, suite=suites.HYBRID)) is None


def test_rotate_key_in_the_home_rewrites_every_config_and_loads(tmp_path: Path) -> None:
    prov = provision(tmp_path / "home", ["dev-1"])
    home = Home(prov.home)
    old_pub = home.gateway_e2e_pub.read_bytes()
    before = home.gateway_toml.read_text()
    r = gk.rotate_gateway_key(home, grace_s=600, now_ms=1000)
    assert (r.old_key_id, r.key_id, r.accept_until_ms, r.mlkem) == (1, 2, 601_000, True)
    conf = load_config(home.gateway_toml)
    assert conf.e2e.key_id == 2 and [p.key_id for p in conf.e2e.previous] == [1]
    assert conf.e2e.previous[0].accept_until_ms == 601_000
    assert conf.e2e.suites == tomllib.loads(before)["e2e"]["suites"]
    assert conf.metrics.port == tomllib.loads(before)["metrics"]["port"]  # other sections untouched
    assert home.gateway_e2e_pub.read_bytes() != old_pub  # new bundles take the new key
    assert (home.gateway_dir / "e2e.1.key").stat().st_mode & 0o777 == 0o600
    loaded = gk.load_keys(home)
    assert set(loaded.x25519) == set(loaded.mlkem) == {1, 2}
    assert loaded.downlink_key(1000) == 1 and loaded.downlink_key(700_000) == 2
    # Again, after the first grace ended: key 1 is dropped from the config and its files deleted.
    r2 = gk.rotate_gateway_key(home, grace_s=600, now_ms=700_000)
    assert (r2.key_id, r2.dropped) == (3, (1,))
    assert [p.key_id for p in load_config(home.gateway_toml).e2e.previous] == [2]
    assert not (home.gateway_dir / "e2e.1.key").exists()
    assert gk.retire_gateway_keys(home, now_ms=800_000) == (2,)
    assert load_config(home.gateway_toml).e2e.previous[0].accept_until_ms == 800_000


def test_rotate_key_cli_json_and_refusals(tmp_path: Path) -> None:
    prov = provision(tmp_path / "home", [])
    rc, out, err = run_cli(["gateway", "rotate-key", "--dir", str(prov.home), "--grace", "60", "--json"])
    assert rc == 0, err
    assert json.loads(out)["key_id"] == 2
    before = prov.gateway_toml.read_text()
    rc, out, err = run_cli(["gateway", "rotate-key", "--dir", str(prov.home), "--grace", "-1"])
    assert rc != 0 and err.count("\n") == 1 and prov.gateway_toml.read_text() == before
    rc, out, err = run_cli(["gateway", "retire-key", "--dir", str(prov.home), "--key-id", "9"])
    assert rc != 0 and "not being rotated out" in err and prov.gateway_toml.read_text() == before


def test_agent_installs_a_new_gateway_key_in_its_state_folder(tmp_path: Path) -> None:
    """The installed config and key files are never written (read-only credentials under systemd): the
    state beside the outbox is laid over [e2e] at the next start, committed by one rename."""
    prov = provision(tmp_path / "home", ["dev-1"])
    device = tmp_path / "device"
    shutil.copytree(prov.bundle("dev-1"), device)
    config = device / "agent.toml"
    outbox = tmp_path / "state" / "o.db"
    config.write_text(config.read_text().replace('path = "outbox.db"', f'path = "{outbox}"'))
    (tmp_path / "state").mkdir()
    before = {p.name: p.read_bytes() for p in device.iterdir()}
    cfg = load_agent_config(config)
    assert agk.apply(cfg) == cfg  # nothing installed yet
    old = (device / "gateway_e2e.pub").read_bytes()
    new = keys.public_bytes(NEW)
    trusted = [agk.Trusted(1, old, 0)]
    with pytest.raises(ProvisioningError, match="unusable"):
        agk.install(cfg, key_id=2, public=b"\x00" * 31, mlkem_public=b"", trusted=trusted, until_ms=99)
    assert not agk.state_path(cfg).exists()

    agk.install(cfg, key_id=2, public=new, mlkem_public=b"", trusted=trusted, until_ms=99)
    after = agk.apply(cfg)
    assert after.e2e.gateway_key_id == 2 and after.e2e.gateway_public_key_file.read_bytes() == new
    assert after.e2e.gateway_mlkem_public_key_file == cfg.e2e.gateway_mlkem_public_key_file  # kept
    assert agk.load_previous(cfg, 50) == [agk.Trusted(1, old, 99)]
    assert agk.load_previous(cfg, 99) == []  # past its end: no longer trusted
    assert {p.name: p.read_bytes() for p in device.iterdir()} == before  # the installed files: untouched

    agk.set_suite(cfg, suites.HYBRID)
    assert agk.apply(cfg).e2e.suite == "x25519-mlkem768" and agk.apply(cfg).e2e.gateway_key_id == 2
    agk.state_path(cfg).write_text("{not json")
    with pytest.raises(ConfigError, match="gateway key state"):
        agk.apply(cfg)
    with pytest.raises(ConfigError, match="gateway key state"):
        agk.load_previous(cfg, 50)


def test_bundles_made_after_a_gateway_rotation_name_the_new_key(tmp_path: Path) -> None:
    """New and rotated bundles take the home's current gateway_e2e.pub: their gateway_key_id must match."""
    prov = provision(tmp_path / "home", ["dev-1"])
    home = Home(prov.home)
    gk.rotate_gateway_key(home, grace_s=600, now_ms=1000)
    rc, _out, err = run_cli(["device", "rotate", "dev-1", "--dir", str(prov.home)])
    assert rc == 0, err
    provision(prov.home, ["dev-2"])
    current = (home.gateway_dir / "e2e.2.pub").read_bytes()
    for dev in ("dev-1", "dev-2"):
        cfg = load_agent_config(prov.bundle(dev) / "agent.toml")
        assert cfg.e2e.gateway_key_id == 2, dev
        assert (prov.bundle(dev) / "gateway_e2e.pub").read_bytes() == current
