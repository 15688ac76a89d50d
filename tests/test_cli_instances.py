"""`sgw gateway add-instance`, `sgw gateway instances`, `sgw ca migrate` (issue 14): each gateway instance
has its own identity, mistakes exit non-zero with one line and change nothing, and a home made before
per-instance identities is brought up to date idempotently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.pki.ca import CertificateAuthority, cert_pem, ec_key_pem
from gateway.pki.instances import cert_cn
from tests.support.cli import run_cli


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    rc, _out, err = run_cli(["ca", "init", "--dir", str(h)])
    assert rc == 0, err
    return h


def test_add_instance_issues_its_own_identity_and_config(home: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "broker"
    rc, _o, err = run_cli(["broker", "config", "--dir", str(home), "--out", str(out_dir), "--run-as-root"])
    assert rc == 0, err
    rc, out, err = run_cli(["gateway", "add-instance", "gw-2", "--dir", str(home), "--json"])
    assert rc == 0, err
    info = json.loads(out)
    assert info["cn"] == "sgw-gateway-gw-2" and info["acl_updated"] == [str(out_dir.resolve())]
    assert cert_cn(Path(info["cert"])) == "sgw-gateway-gw-2"
    key = home / "gateway" / "instances" / "gw-2" / "client.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    config = Path(info["config"]).read_text()
    assert 'id = "gw-2"' in config and 'cert_file = "gateway/instances/gw-2/client.crt"' in config
    acl = (out_dir / "acl").read_text()
    assert "user sgw-gateway-gw-1\n" in acl and "user sgw-gateway-gw-2\n" in acl
    rc, out, err = run_cli(["gateway", "instances", "--dir", str(home), "--json"])
    assert rc == 0, err
    assert [r["id"] for r in json.loads(out)] == ["gw-1", "gw-2"]


@pytest.mark.parametrize(("argv", "message"), [
    (["gw-1"], "already exists"),
    (["bad/id"], "invalid gateway id"),
    (["x" * 49], "invalid gateway id"),
    ([".."], "invalid gateway id"),
])
def test_add_instance_mistakes_exit_2_with_one_line_and_change_nothing(home: Path, argv: list[str],
                                                                        message: str) -> None:
    before = _tree(home)
    rc, out, err = run_cli(["gateway", "add-instance", *argv, "--dir", str(home)])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert _tree(home) == before


def test_gateway_without_config_or_action_is_a_one_line_error(home: Path) -> None:
    rc, _out, err = run_cli(["gateway"])
    assert rc == 2 and "needs --config" in err and err.count("\n") == 1


def test_migrate_brings_a_legacy_home_up_to_date_once(home: Path) -> None:
    # A home as `sgw ca init` made it before per-instance identities: CN sgw-gateway, no admin.
    ca = CertificateAuthority.load(home / "ca" / "ca.crt", home / "ca" / "ca.key")
    old = ca.issue("sgw-gateway")
    (home / "gateway" / "client.crt").write_bytes(cert_pem(old.cert))
    (home / "gateway" / "client.key").write_bytes(ec_key_pem(old.key))
    for name in ("client.crt", "client.key"):
        os.remove(home / "admin" / name)
    os.rmdir(home / "admin")

    before = _tree(home)
    rc, out, err = run_cli(["ca", "migrate", "--dir", str(home), "--dry-run", "--json"])
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] and len(plan["steps"]) == 2, plan
    assert _tree(home) == before, "--dry-run changed the home"

    rc, out, err = run_cli(["ca", "migrate", "--dir", str(home)])
    assert rc == 0, err
    assert out.count("did: ") == 2, out
    assert cert_cn(home / "gateway" / "client.crt") == "sgw-gateway-gw-1"
    assert cert_cn(home / "admin" / "client.crt") == "sgw-admin"
    assert oct((home / "gateway" / "client.key").stat().st_mode & 0o777) == "0o600"

    rc, out, err = run_cli(["ca", "migrate", "--dir", str(home)])
    assert rc == 0 and "up to date" in out, (out, err)


def test_migrate_without_a_ca_is_a_one_line_error(tmp_path: Path) -> None:
    rc, out, err = run_cli(["ca", "migrate", "--dir", str(tmp_path / "nothing")])
    assert rc != 0 and out == "" and err.count("\n") == 1, err


def test_add_workers_issues_one_identity_per_worker_once(home: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "broker"
    rc, _o, err = run_cli(["broker", "config", "--dir", str(home), "--out", str(out_dir), "--run-as-root"])
    assert rc == 0, err
    rc, out, err = run_cli(["gateway", "add-workers", "--count", "3", "--dir", str(home), "--json"])
    assert rc == 0, err
    info = json.loads(out)
    assert info["id"] == "gw-1" and [w["id"] for w in info["workers"]] == ["gw-1.w2", "gw-1.w3"]
    assert all(w["issued"] for w in info["workers"])
    w2 = home / "gateway" / "client-w2"
    assert info["load_credentials"][:2] == [f"LoadCredential=client-w2.crt:{w2}.crt",
                                            f"LoadCredential=client-w2.key:{w2}.key"]
    for k in (2, 3):
        cert, key = home / "gateway" / f"client-w{k}.crt", home / "gateway" / f"client-w{k}.key"
        assert cert_cn(cert) == f"sgw-gateway-gw-1.w{k}"
        assert oct(key.stat().st_mode & 0o777) == "0o600"
    acl = (out_dir / "acl").read_text()
    assert "user sgw-gateway-gw-1.w2\n" in acl and "user sgw-gateway-gw-1.w3\n" in acl
    # Again, and one more: the existing identities are kept byte for byte.
    before = (home / "gateway" / "client-w2.crt").read_bytes()
    rc, out, err = run_cli(["gateway", "add-workers", "--count", "4", "--dir", str(home), "--json"])
    assert rc == 0, err
    assert [w["issued"] for w in json.loads(out)["workers"]] == [False, False, True]
    assert (home / "gateway" / "client-w2.crt").read_bytes() == before
    rc, out, err = run_cli(["gateway", "instances", "--dir", str(home), "--json"])
    assert rc == 0, err
    assert json.loads(out)[0]["workers"] == ["gw-1.w2", "gw-1.w3", "gw-1.w4"]


@pytest.mark.parametrize(("argv", "message"), [
    (["gateway", "add-workers", "nope", "--count", "2"], "no gateway instance 'nope'"),
    (["gateway", "add-workers", "--count", "0"], "invalid worker count 0"),
    (["gateway", "add-workers", "--count", "65"], "invalid worker count 65"),
    (["gateway", "add-instance", "gw-1.w2"], "not ending in .w<digits>"),
])
def test_worker_mistakes_exit_2_with_one_line_and_change_nothing(home: Path, argv: list[str],
                                                                  message: str) -> None:
    before = _tree(home)
    rc, out, err = run_cli([*argv, "--dir", str(home)])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert _tree(home) == before
