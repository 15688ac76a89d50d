"""The enrollment checks that need no broker (gateway/pki/enrollment.py): chains with intermediates,
the broker username of a subject, request parsing bounds, and the vector another implementation checks
itself against (tests/vectors/enroll_v1.json)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.pki.csr import make_csr
from gateway.pki.enroll_ca import enroll
from gateway.pki.enrollment import (
    Refused,
    Request,
    broker_username,
    make_request,
    parse_request,
    signed_bytes,
    verify_request,
)
from gateway.pki.home import Home
from gateway.registry.enrollment import EnrollmentStore
from tests.support.idevid import Manufacturer
from tests.support.provision import provision

VECTORS = Path(__file__).resolve().parent / "vectors" / "enroll_v1.json"


def _cert(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
          signer: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256()))


def _request(chain: list[x509.Certificate], key: ec.EllipticCurvePrivateKey, serial: str) -> Request:
    return make_request(chain, key, csr=make_csr(serial, ec.generate_private_key(ec.SECP256R1())),
                        e2e_public=os.urandom(32), nonce=os.urandom(16), time_ns=time.time_ns())


@pytest.mark.parametrize("intermediate_is_ca", [True, False])
def test_a_chain_through_an_intermediate(tmp_path: Path, intermediate_is_ca: bool) -> None:
    root = Manufacturer.create(tmp_path / "root", "Acme Root CA")
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Acme Line 3")])
    mid = _cert(mid_name, root.cert.subject, mid_key, root.key, ca=intermediate_is_ca)
    dev_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sensor"),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1")])
    leaf = _cert(subject, mid_name, dev_key, mid_key, ca=False)
    req = _request([leaf, mid], dev_key, "SN-1")
    user = broker_username(leaf.subject)
    if intermediate_is_ca:
        got = verify_request(req, username=user, anchors=[root.cert], now_ns=time.time_ns())
        assert (got.serial, got.anchor) == ("SN-1", root.cert)
    else:
        with pytest.raises(Refused) as refused:
            verify_request(req, username=user, anchors=[root.cert], now_ns=time.time_ns())
        assert refused.value.reason == "untrusted_ca"
    # Without the intermediate the chain does not reach the anchor.
    with pytest.raises(Refused) as refused:
        verify_request(_request([leaf], dev_key, "SN-1"), username=user, anchors=[root.cert],
                       now_ns=time.time_ns())
    assert refused.value.reason == "untrusted_ca"


def test_broker_username_is_openssl_rfc2253_for_plain_subjects_only() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme GmbH"),
                      x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1")])
    assert broker_username(name) == "serialNumber=SN-1,O=Acme GmbH,C=DE"
    for bad in ([x509.NameAttribute(NameOID.COMMON_NAME, "a/b")],  # a topic separator
                [x509.NameAttribute(NameOID.COMMON_NAME, "a,b")],  # would need RFC 2253 escaping
                [x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@b")]):  # a name we do not map
        with pytest.raises(Refused) as refused:
            broker_username(x509.Name(bad))
        assert refused.value.reason == "malformed"
    multi = x509.Name([x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.SERIAL_NUMBER, "1")])])
    with pytest.raises(Refused):
        broker_username(multi)


def test_parse_request_bounds() -> None:
    for payload in (b"x" * 20000, b"[]", b'{"v": 2}', b'{"v": 1}',
                    json.dumps({"v": 1, "chain": [], "csr": "", "e2e_public": "00" * 32, "nonce": "00" * 16,
                                "time_ns": 1, "signature": ""}).encode(),
                    json.dumps({"v": 1, "chain": ["AA=="], "csr": "", "e2e_public": "00" * 31,
                                "nonce": "00" * 16, "time_ns": 1, "signature": ""}).encode()):
        with pytest.raises(Refused) as refused:
            parse_request(payload)
        assert refused.value.reason == "malformed"


def test_vector() -> None:
    """tests/vectors/enroll_v1.json: the IDevID and its key, the request's fields, the exact bytes
    signed, a signature over them and the broker username. ECDSA signatures are randomised, so the
    vector's signature is checked, not reproduced."""
    v = json.loads(VECTORS.read_text())
    cert = x509.load_pem_x509_certificate(v["idevid_pem"].encode())
    csr, e2e, nonce = bytes.fromhex(v["csr_der"]), bytes.fromhex(v["e2e_public"]), bytes.fromhex(v["nonce"])
    signed = signed_bytes(cert.public_bytes(serialization.Encoding.DER), csr, e2e, nonce, v["time_ns"])
    assert signed.hex() == v["signed_bytes"]
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(bytes.fromhex(v["signature"]), signed, ec.ECDSA(hashes.SHA256()))
    assert broker_username(cert.subject) == v["broker_username"]
    req = parse_request(v["request_json"].encode())
    anchor = x509.load_pem_x509_certificate(v["manufacturer_ca_pem"].encode())
    got = verify_request(req, username=v["broker_username"], anchors=[anchor], now_ns=v["time_ns"])
    assert got.serial == v["serial"]


def test_the_generator_reproduces_the_vector() -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_enroll_vector.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True,
                          check=False, cwd=script.parent.parent)
    assert done.returncode == 0, done.stderr


def test_a_service_killed_mid_issue_leaves_nothing_that_blocks_the_retry(tmp_path: Path) -> None:
    """The device folder is published inside the registry transaction; a SIGKILL before the commit
    leaves the folder without its row. The retry (same IDevID, same keys) recognises it as its own
    leftover and enrols; another device's folder under that id stays a conflict."""
    home = Home(provision(tmp_path / "home", []).home)
    acme = Manufacturer.create(tmp_path / "acme", "Acme Devices CA")
    idevid = acme.idevid(tmp_path / "dev", "SN-1")
    req = _request([idevid.cert], idevid.key, "SN-1")
    user = broker_username(idevid.cert.subject)
    with home.open_registry() as registry:
        store = EnrollmentStore(registry)
        store.allow(acme.cert, [], prefix="", now_ns=time.time_ns())
        leftover = home.device_dir("SN-1")
        leftover.mkdir()
        (leftover / "e2e.pub").write_bytes(req.e2e_public)
        got = enroll(home, store, req, username=user, now_ns=time.time_ns())
        assert got.approved.device_id == "SN-1" and not got.repeat
        assert (home.device_dir("SN-1") / "device.crt").exists()

        other = acme.idevid(tmp_path / "dev2", "SN-2")
        (home.device_dir("SN-2")).mkdir()
        (home.device_dir("SN-2") / "e2e.pub").write_bytes(b"\x01" * 32)
        with pytest.raises(Refused) as refused:
            enroll(home, store, _request([other.cert], other.key, "SN-2"),
                   username=broker_username(other.cert.subject), now_ns=time.time_ns())
        assert refused.value.reason == "identity_conflict"
