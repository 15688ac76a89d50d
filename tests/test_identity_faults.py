"""Identity faults on the real path (mosquitto + `sgw gateway`): revoked, unknown, rotated-out,
expired and foreign-CA identities are refused by the broker's TLS or by the gateway under the right
reason, while an honest device next to them loses nothing.

| identity                                              | refused by       | reason / outcome      |
|-------------------------------------------------------|------------------|-----------------------|
| revoked, still connected (mosquitto keeps it)         | gateway          | `revoked`             |
| revoked, new connection (CRL, after broker SIGHUP)    | broker TLS       | handshake fails       |
| certificate from our CA for an id not in the registry | gateway          | `unknown_device`      |
| e2e key rotated out (`rotate --grace 0`), connected   | gateway          | `bad_auth`            |
| expired certificate (not_after in the past)           | broker TLS       | handshake fails       |
| certificate from another CA, same device id           | broker TLS       | handshake fails       |
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.core import keys
from gateway.pki.ca import CertificateAuthority, cert_pem, ec_key_pem, new_ec_key
from tests.support.cli import run_cli
from tests.support.hostile import HostileDevice
from tests.support.ledger import System, running_system
from tests.support.mosquitto import TLSIdentity, disconnect, try_connect

pytestmark = pytest.mark.slow  # whole-path processes: bounded, but tens of seconds

HONEST = "dev-ok"
REVOKED = "dev-revoked"
ROTATED = "dev-rotated"
EXPIRED = "dev-expired"


def write_identity(folder: Path, name: str, ca_file: Path, cert: x509.Certificate,
                   key: object) -> TLSIdentity:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client.crt").write_bytes(cert_pem(cert))
    (folder / "client.key").write_bytes(ec_key_pem(key))  # type: ignore[arg-type]
    return TLSIdentity(name, ca_file, folder / "client.crt", folder / "client.key")


def expired_certificate(ca: CertificateAuthority, common_name: str) -> tuple[x509.Certificate, object]:
    """Signed by our CA, valid from 10 days ago until yesterday."""
    key = new_ec_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sgw"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


VERIFY_FAILED = "certificate verify failed"


def refused_by_tls(system: System, identity: TLSIdentity) -> str:
    """The broker refuses the handshake and logs why (OpenSSL's verify error)."""
    before = system.broker.log().count(VERIFY_FAILED)
    result = try_connect(identity, system.port, timeout=10)
    if result.client is not None:
        disconnect(result.client)
    assert not result.ok, f"{identity.name}: the broker accepted {identity.cert_file}"
    system.wait_for(lambda: system.broker.log().count(VERIFY_FAILED) > before, 10, "broker's verify error")
    return VERIFY_FAILED


def test_identity_faults_are_refused_with_the_right_reason(tmp_path: Path) -> None:
    with running_system(tmp_path, [], extra=(HONEST, REVOKED, ROTATED, EXPIRED)) as system:
        prov = system.prov
        home = prov.home
        ca = CertificateAuthority.load(home / "ca" / "ca.crt", home / "ca" / "ca.key")
        honest = HostileDevice(prov.bundle(HONEST), prov.identity(HONEST), system.port, seed=1)
        revoked = HostileDevice(prov.bundle(REVOKED), prov.identity(REVOKED), system.port, seed=2)
        rotated = HostileDevice(prov.bundle(ROTATED), prov.identity(ROTATED), system.port, seed=3)
        clients = [honest, revoked, rotated]
        try:
            sent = 0

            def honest_round() -> None:
                nonlocal sent
                honest.valid(5)
                sent += 5

            for d in (revoked, rotated):  # each device is known to work before its identity goes bad
                d.valid(2)
            honest_round()
            system.wait_for(lambda: system.results_for(REVOKED) == 2 and system.results_for(ROTATED) == 2,
                            20, "first results")
            base = system.rejections()

            def counted(reason: str, n: int) -> None:
                system.wait_for(lambda: system.rejections().get(reason, 0) - base.get(reason, 0) >= n, 15,
                                f"{n} x {reason}")

            # Revoked while connected: mosquitto keeps the connection; the gateway refuses the messages.
            rc, _out, err = run_cli(["device", "revoke", REVOKED, "--dir", str(home), "--no-broker"])
            assert rc == 0, err
            time.sleep(1.0)  # the gateway polls the registry every 0.25 s
            revoked.valid(3)
            counted("revoked", 3)
            system.broker.reload()  # the broker reads the new CRL: a new connection is refused
            why_revoked = refused_by_tls(system, prov.identity(REVOKED))
            honest_round()

            # A certificate from our CA for an id the registry does not know: the broker's ACL lets it
            # publish on its own topic (it is a valid identity); the gateway refuses it.
            ghost_id = "dev-ghost"
            issued = ca.issue(ghost_id)
            ghost_dir = tmp_path / "ghost"
            ghost_dir.mkdir()
            for name in ("ca.crt", "gateway_e2e.pub", "agent.toml"):
                text = (prov.bundle(HONEST) / name).read_bytes()
                if name == "agent.toml":
                    text = text.replace(HONEST.encode(), ghost_id.encode())
                (ghost_dir / name).write_bytes(text)
            (ghost_dir / "e2e.key").write_bytes(keys.private_to_bytes(keys.generate()))
            ghost_tls = write_identity(ghost_dir, ghost_id, prov.ca_file, issued.cert, issued.key)
            ghost = HostileDevice(ghost_dir, ghost_tls, system.port, seed=4)
            clients.append(ghost)
            ghost.valid(3)
            counted("unknown_device", 3)
            honest_round()

            # Rotated out with no grace: the connected device's old e2e key is dead at once.
            rc, _out, err = run_cli(["device", "rotate", ROTATED, "--dir", str(home), "--grace", "0"])
            assert rc == 0, err
            time.sleep(1.0)
            rotated.valid(3)
            counted("bad_auth", 3)
            honest_round()

            # Expired certificate, and one from another CA for a registered id: TLS refuses both.
            cert, key = expired_certificate(ca, EXPIRED)
            why_expired = refused_by_tls(system, write_identity(tmp_path / "expired", EXPIRED, prov.ca_file,
                                                                cert, key))
            rogue = CertificateAuthority.create(common_name="sgw root CA")  # same name, other key
            issued = rogue.issue(HONEST)
            why_rogue = refused_by_tls(system, write_identity(tmp_path / "rogue", HONEST, prov.ca_file,
                                                              issued.cert, issued.key))
            # Positive control: the same procedure with a real identity connects. Not HONEST's own: the
            # broker makes the CN the client id, so that would displace the honest client's connection.
            ok = try_connect(prov.identity("admin"), system.port)
            assert ok.ok and ok.client is not None, ok.reason
            disconnect(ok.client)
            honest_round()

            system.wait_for(lambda: system.results_for(HONEST) >= sent, 20, "honest results")
            time.sleep(0.5)
            after = system.rejections()
            delta = {k: int(v - base.get(k, 0)) for k, v in after.items() if v != base.get(k, 0)}
            assert delta == {"revoked": 3, "unknown_device": 3, "bad_auth": 3}, delta
            assert system.results_for(HONEST) == sent  # each honest window exactly once
            assert system.results_for(REVOKED) == 2 and system.results_for(ROTATED) == 2
            assert system.results_for(ghost_id) == 0
            assert why_revoked == why_expired == why_rogue == VERIFY_FAILED
            print(f"\nidentity faults: gateway {delta}; honest {sent}/{sent} results; broker TLS refused "
                  f"the revoked, expired and other-CA certificates ('{VERIFY_FAILED}' logged for each)")
        finally:
            for c in clients:
                c.close()
