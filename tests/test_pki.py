"""PKI: the CA, service and device certificates, the CRL, key files, atomic writes. Checked with openssl."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.pki import files
from gateway.pki.ca import CertificateAuthority
from tests.support.provision import provision, run_cli

ROOT = Path(__file__).resolve().parent.parent


def _openssl_verify(home: Path, cert: Path, *, crl: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["openssl", "verify", "-CAfile", str(home / "ca" / "ca.crt")]
    if crl:
        argv += ["-crl_check", "-CRLfile", str(home / "ca" / "crl.pem")]
    return subprocess.run([*argv, str(cert)], capture_output=True, text=True, check=False)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _contract_block(name: str) -> str:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    m = re.search(rf"## {re.escape(name)}.*?```toml\n(.*?)```", text, re.S)
    assert m, f"no {name} block in ARCHITECTURE.md"
    return m.group(1)


def _shape(data: dict[str, object]) -> dict[str, object]:
    return {k: _shape(v) if isinstance(v, dict) else type(v).__name__ for k, v in data.items()}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision(tmp_path_factory.mktemp("pki") / "home", ["dev-1", "dev-2"]).home


def test_ca_is_p256_root_and_self_signed(home: Path) -> None:
    ca = _cert(home / "ca" / "ca.crt")
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.issuer == ca.subject
    assert _openssl_verify(home, home / "ca" / "ca.crt").returncode == 0


def test_service_certificates(home: Path) -> None:
    server = _cert(home / "broker" / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert _cn(_cert(home / "gateway" / "client.crt")) == "sgw-gateway-gw-1"
    assert _cn(_cert(home / "admin" / "client.crt")) == "sgw-admin"
    assert _cn(_cert(home / "observer" / "client.crt")) == "sgw-observer"
    for rel in ("broker/server.crt", "gateway/client.crt", "observer/client.crt"):
        assert _openssl_verify(home, home / rel).returncode == 0, rel


def test_custom_sans(tmp_path: Path) -> None:
    rc, _, err = run_cli(["ca", "init", "--dir", str(tmp_path / "h"), "--san", "broker.example",
                          "--san", "10.0.0.7", "--san", "::1"])
    assert rc == 0, err
    sans = _cert(tmp_path / "h" / "broker" / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert sorted(str(i) for i in sans.get_values_for_type(x509.IPAddress)) == ["10.0.0.7", "::1"]


def test_gateway_e2e_identity(home: Path) -> None:
    private = (home / "gateway" / "e2e.key").read_bytes()
    public = (home / "gateway" / "e2e.pub").read_bytes()
    assert len(private) == 32 and len(public) == 32
    derived = x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert derived == public
    assert (home / "devices" / "dev-1" / "gateway_e2e.pub").read_bytes() == public


def test_device_bundle_and_keys(home: Path) -> None:
    bundle = home / "devices" / "dev-1"
    assert sorted(p.name for p in bundle.iterdir()) == [
        "agent.toml", "ca.crt", "device.crt", "device.key", "e2e.key", "e2e.pub", "gateway_e2e.pub",
        "gateway_e2e_mlkem.pub"]
    cert = _cert(bundle / "device.crt")
    assert _cn(cert) == "dev-1"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    private = (bundle / "e2e.key").read_bytes()
    assert x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw() == (
        bundle / "e2e.pub").read_bytes()
    assert (home / "devices" / "dev-1" / "e2e.pub").read_bytes() != (home / "devices" / "dev-2" / "e2e.pub"
                                                                      ).read_bytes()


def test_private_key_files_are_0600(home: Path) -> None:
    private = ["ca/ca.key", "broker/server.key", "gateway/client.key", "gateway/e2e.key",
               "gateway/e2e_mlkem.key", "observer/client.key", "devices/dev-1/device.key",
               "devices/dev-1/e2e.key"]
    for rel in private:
        assert stat.S_IMODE((home / rel).stat().st_mode) == 0o600, rel
    # And no other file in the home is private-looking but world-readable.
    for path in home.rglob("*.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_openssl_verify_then_crl_check_after_revoke(tmp_path: Path) -> None:
    home = provision(tmp_path / "h", ["dev-1", "dev-2"]).home
    device = home / "devices" / "dev-1" / "device.crt"
    assert _openssl_verify(home, device).returncode == 0
    assert _openssl_verify(home, device, crl=True).returncode == 0
    rc, _, err = run_cli(["device", "revoke", "dev-1", "--dir", str(home)])
    assert rc == 0, err
    result = _openssl_verify(home, device, crl=True)
    assert result.returncode != 0
    assert "revoked" in (result.stdout + result.stderr)
    # The other device is unaffected.
    assert _openssl_verify(home, home / "devices" / "dev-2" / "device.crt", crl=True).returncode == 0


def test_rotation_revokes_the_old_certificate_after_grace(tmp_path: Path) -> None:
    home = provision(tmp_path / "h", ["dev-1"]).home
    old = tmp_path / "old.crt"
    old.write_bytes((home / "devices" / "dev-1" / "device.crt").read_bytes())
    rc, _, err = run_cli(["device", "rotate", "dev-1", "--grace", "3600", "--dir", str(home)])
    assert rc == 0, err
    # Within the grace period the old certificate still works, so a device can switch over.
    assert _openssl_verify(home, old, crl=True).returncode == 0
    rc, _, err = run_cli(["device", "rotate", "dev-1", "--grace", "0", "--dir", str(home)])
    assert rc == 0, err
    assert _openssl_verify(home, old, crl=True).returncode != 0
    assert _openssl_verify(home, home / "devices" / "dev-1" / "device.crt", crl=True).returncode == 0


def test_config_files_match_the_contract(home: Path) -> None:
    gateway = tomllib.loads((home / "gateway.toml").read_text())
    assert _shape(gateway) == _shape(tomllib.loads(_contract_block("gateway.toml")))
    agent = tomllib.loads((home / "devices" / "dev-1" / "agent.toml").read_text())
    assert _shape(agent) == _shape(tomllib.loads(_contract_block("agent.toml")))
    assert agent["device"]["id"] == "dev-1"
    # Every path in gateway.toml resolves relative to the home.
    for section, key in (("mqtt", "ca_file"), ("mqtt", "cert_file"), ("mqtt", "key_file"),
                         ("e2e", "private_key_file"), ("registry", "path")):
        assert (home / gateway[section][key]).exists(), key
    bundle = home / "devices" / "dev-1"
    for section, key in (("mqtt", "ca_file"), ("mqtt", "cert_file"), ("mqtt", "key_file"),
                         ("e2e", "device_key_file"), ("e2e", "gateway_public_key_file")):
        assert (bundle / agent[section][key]).exists(), key


def test_leaf_validity_never_exceeds_the_ca(home: Path) -> None:
    ca = _cert(home / "ca" / "ca.crt")
    leaf = _cert(home / "devices" / "dev-1" / "device.crt")
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert leaf.issuer == ca.subject


def test_atomic_write_failure_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "key"
    files.write_atomic(target, b"old", mode=files.PRIVATE)

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(target, b"new", mode=files.PRIVATE)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_private_file_is_never_group_readable_while_written(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files.write_atomic(tmp_path / "k", b"x", mode=files.PRIVATE)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_crl_lists_given_serials() -> None:
    ca = CertificateAuthority.create()
    issued = ca.issue("dev-x")
    crl = x509.load_pem_x509_crl(ca.crl([(issued.serial, 1_700_000_000_000_000_000)]))
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(issued.cert.serial_number) is not None
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc
