#!/usr/bin/env python3
"""Writes tests/vectors/enroll_v1.json: one enrollment request (docs/PROTOCOL.md, "Enrollment") with a
test manufacturer CA and IDevID, every input of the signature, the exact bytes signed and the broker
username of the IDevID.

Deterministic (keys are SHA-256 of fixed labels, ECDSA signatures per RFC 6979), so rerunning changes
nothing; tests/test_enroll_checks.py checks the file against the code. Another implementation (the
firmware of a device that enrols itself, say) can check its signed bytes and its topic against it.

Usage: python scripts/make_enroll_vector.py [--check]
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

from gateway.core.topics import enroll_req_topic
from gateway.pki.enrollment import VERSION, Request, broker_username, signed_bytes

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "enroll_v1.json"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _scalar(label: str) -> int:
    return int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % (P256_ORDER - 1) + 1


def _key(label: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(_scalar(label), ec.SECP256R1())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def build() -> dict[str, object]:
    ca_key, dev_key, tls_key = _key("sgw enroll vector ca"), _key("sgw enroll vector idevid"), _key(
        "sgw enroll vector tls")
    start, end = dt.datetime(2025, 1, 1, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "Acme Devices CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "Sensor-9"),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0001")])
    idevid = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
              .public_key(dev_key.public_key()).serial_number(2).not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SN-0001")]))
           .sign(tls_key, hashes.SHA256(), ecdsa_deterministic=True).public_bytes(serialization.Encoding.DER))
    e2e = x25519.X25519PrivateKey.from_private_bytes(hashlib.sha256(b"sgw enroll vector e2e").digest())
    e2e_public = e2e.public_key().public_bytes_raw()
    nonce = hashlib.sha256(b"sgw enroll vector nonce").digest()[:16]
    time_ns = 1_796_000_000_000_000_000  # 2026-11-30
    idevid_der = idevid.public_bytes(serialization.Encoding.DER)
    signed = signed_bytes(idevid_der, csr, e2e_public, nonce, time_ns)
    signature = dev_key.sign(signed, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    request = Request((idevid_der,), csr, e2e_public, nonce, time_ns, signature)
    username = broker_username(idevid.subject)
    return {
        "version": VERSION,
        "note": "Test keys only. signed_bytes = 'sgw-enroll-v1\\0' || u32be(len idevid) || idevid DER || "
                "u32be(len csr) || csr DER || e2e_public || nonce || u64be(time_ns); signature = ECDSA "
                "P-256 SHA-256 (DER) by the IDevID key, RFC 6979 here (any valid signature is accepted).",
        "manufacturer_ca_pem": _pem(ca),
        "idevid_pem": _pem(idevid),
        "idevid_key_pem": dev_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()).decode(),
        "serial": "SN-0001",
        "broker_username": username,
        "request_topic": enroll_req_topic(username),
        "csr_der": csr.hex(),
        "e2e_public": e2e_public.hex(),
        "nonce": nonce.hex(),
        "time_ns": time_ns,
        "signed_bytes": signed.hex(),
        "signature": signature.hex(),
        "signature_b64": base64.b64encode(signature).decode(),
        "request_json": request.encode().decode(),
    }


def main() -> int:
    text = json.dumps(build(), indent=2, sort_keys=True) + "\n"
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != text:
            sys.stderr.write(f"{OUT} is out of date: run scripts/make_enroll_vector.py\n")
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
