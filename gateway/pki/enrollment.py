"""Zero-touch enrollment messages and the checks of an IDevID (docs/PROTOCOL.md, "Enrollment").

One home for what both sides must agree on: the bytes the IDevID key signs, the JSON shape of a request
and of an answer, the broker username of an IDevID (the topic level), and the closed set of refusal
reasons. The checks here take `now` and the allow-listed anchors as arguments; the service
(gateway/server/enroll.py) does the IO, the agent (gateway/agent/enroll.py) builds the requests.

The service trusts nothing the broker did: it verifies the chain to an allow-listed manufacturer CA
itself, the validity of every certificate at `now`, that the request topic names this very IDevID, and
the IDevID key's signature over (IDevID certificate, CSR, e2e public key, nonce, time).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VERSION = 1
DOMAIN = b"sgw-enroll-v1\x00"  # domain separation: this signature can never be read as another one
NONCE_BYTES = 16
FRESH_S = 300  # a request's time may differ this much from the service's clock
MAX_REQUEST_BYTES = 16384  # a chain of three P-256 certificates and a CSR fit in about 3 KiB
MAX_CHAIN = 4  # IDevID + intermediates the service will walk

# OpenSSL's short names, as mosquitto's `use_subject_as_username` prints them (XN_FLAG_RFC2253).
_SHORT_NAMES = {
    NameOID.COMMON_NAME: "CN", NameOID.COUNTRY_NAME: "C", NameOID.LOCALITY_NAME: "L",
    NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", NameOID.SERIAL_NUMBER: "serialNumber",
}
# Values that need no RFC 2253 escaping and are safe inside one MQTT topic level (no '/', '+', '#').
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._:@-]+( [A-Za-z0-9._:@-]+)*")


class Refusal(StrEnum):
    """Why an enrollment request was refused: the answer's `reason`, the metric label, the log field."""

    MALFORMED = "malformed"  # not a request of this version, or parts unreadable
    TOPIC_MISMATCH = "topic_mismatch"  # the topic names another identity than the request's IDevID
    UNTRUSTED_CA = "untrusted_ca"  # no chain to an allow-listed manufacturer CA
    IDEVID_EXPIRED = "idevid_expired"  # a certificate of the chain is outside its validity at `now`
    NO_SERIAL = "no_serial"  # the IDevID subject has no (single, usable) serialNumber
    SERIAL_NOT_ALLOWED = "serial_not_allowed"  # the CA's entry lists serials and this is not one
    REFUSED_BY_OPERATOR = "refused_by_operator"  # `sgw enroll refuse` for this serial
    STALE = "stale"  # the request's time is outside the freshness window
    REPLAY = "replay"  # this nonce was seen before
    BAD_SIGNATURE = "bad_signature"  # not signed by the IDevID's key
    BAD_CSR = "bad_csr"  # the CSR is not a self-signed P-256 request for the device id
    IDENTITY_CONFLICT = "identity_conflict"  # the device id belongs to another device, or other keys


class Refused(Exception):  # noqa: N818 - a refusal is an outcome, not a bug
    def __init__(self, reason: Refusal, detail: str = "") -> None:
        super().__init__(detail or reason.value)
        self.reason = reason
        self.detail = detail or reason.value


def broker_username(name: x509.Name) -> str:
    """The MQTT username mosquitto gives this subject with `use_subject_as_username true`: RFC 2253
    text, last RDN first. Only plain values are supported (no escaping needed), so both sides compute
    the same string; Refused(MALFORMED) otherwise."""
    parts = []
    for rdn in reversed(list(name.rdns)):
        attrs = list(rdn)
        if len(attrs) != 1:
            raise Refused(Refusal.MALFORMED, "multi-valued RDNs are not supported in an IDevID subject")
        attr = attrs[0]
        short = _SHORT_NAMES.get(attr.oid)
        value = attr.value if isinstance(attr.value, str) else ""
        if short is None or not _PLAIN_VALUE.fullmatch(value):
            raise Refused(Refusal.MALFORMED, f"IDevID subject attribute {attr.oid.dotted_string} is not "
                                             "usable for enrollment (known name, plain value)")
        parts.append(f"{short}={value}")
    if not parts:
        raise Refused(Refusal.MALFORMED, "empty IDevID subject")
    return ",".join(parts)


def serial_of(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(values) != 1 or not isinstance(values[0].value, str) or not values[0].value:
        raise Refused(Refusal.NO_SERIAL, "the IDevID subject needs exactly one serialNumber")
    return values[0].value


def signed_bytes(idevid_der: bytes, csr_der: bytes, e2e_public: bytes, nonce: bytes, time_ns: int) -> bytes:
    """What the IDevID key signs: length-prefixed, so no field can be shifted into another."""
    return b"".join([
        DOMAIN,
        struct.pack(">I", len(idevid_der)), idevid_der,
        struct.pack(">I", len(csr_der)), csr_der,
        e2e_public, nonce, struct.pack(">Q", time_ns),
    ])


@dataclass(frozen=True)
class Request:
    chain: tuple[bytes, ...]  # DER, the IDevID first, then intermediates (never the anchor's private key)
    csr: bytes
    e2e_public: bytes
    nonce: bytes
    time_ns: int
    signature: bytes

    def encode(self) -> bytes:
        return json.dumps({
            "v": VERSION, "chain": [_b64(c) for c in self.chain], "csr": _b64(self.csr),
            "e2e_public": self.e2e_public.hex(), "nonce": self.nonce.hex(), "time_ns": self.time_ns,
            "signature": _b64(self.signature),
        }, sort_keys=True).encode()

    @property
    def idevid(self) -> bytes:
        return self.chain[0]


def make_request(chain: Sequence[x509.Certificate], key: ec.EllipticCurvePrivateKey, *, csr: bytes,
                 e2e_public: bytes, nonce: bytes, time_ns: int) -> Request:
    ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)
    sig = key.sign(signed_bytes(ders[0], csr, e2e_public, nonce, time_ns), ec.ECDSA(hashes.SHA256()))
    return Request(ders, csr, e2e_public, nonce, time_ns, sig)


def parse_request(payload: bytes) -> Request:
    if len(payload) > MAX_REQUEST_BYTES:
        raise Refused(Refusal.MALFORMED, "request too large")
    try:
        doc = json.loads(payload)
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise Refused(Refusal.MALFORMED, f"not an enrollment request of version {VERSION}")
        chain = tuple(_unb64(c) for c in doc["chain"])
        req = Request(chain, _unb64(doc["csr"]), bytes.fromhex(doc["e2e_public"]),
                      bytes.fromhex(doc["nonce"]), int(doc["time_ns"]), _unb64(doc["signature"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise Refused(Refusal.MALFORMED, f"unreadable request ({type(exc).__name__})") from None
    if not 1 <= len(req.chain) <= MAX_CHAIN or len(req.e2e_public) != 32 or len(req.nonce) != NONCE_BYTES:
        raise Refused(Refusal.MALFORMED, "request fields out of range")
    return req


@dataclass(frozen=True)
class Verified:
    idevid: x509.Certificate
    serial: str
    username: str
    anchor: x509.Certificate


def verify_request(req: Request, *, username: str, anchors: Sequence[x509.Certificate],
                   now_ns: int) -> Verified:
    """Every check that needs no state: chain, validity, topic binding, freshness, signature.

    Order matters for the reason reported: who signed it first (untrusted_ca), then when (expired), then
    what it asks. The nonce (replay) and the allow-list's serials need the store: the service checks them.
    """
    try:
        certs = [x509.load_der_x509_certificate(d) for d in req.chain]
    except ValueError:
        raise Refused(Refusal.MALFORMED, "an IDevID chain certificate is unreadable") from None
    leaf = certs[0]
    anchor = _chain_to_anchor(certs, anchors)
    now = dt.datetime.fromtimestamp(now_ns / 1e9, dt.UTC)
    for cert in [*certs, anchor]:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Refused(Refusal.IDEVID_EXPIRED,
                          f"certificate {cert.subject.rfc4514_string()} is valid "
                          f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}")
    if broker_username(leaf.subject) != username:
        raise Refused(Refusal.TOPIC_MISMATCH, "the request topic names another identity than its IDevID")
    serial = serial_of(leaf)
    if abs(now_ns - req.time_ns) > FRESH_S * 1_000_000_000:
        raise Refused(Refusal.STALE, f"request time is {(now_ns - req.time_ns) / 1e9:+.0f} s from ours "
                                     f"(window {FRESH_S} s)")
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Refused(Refusal.BAD_SIGNATURE, "the IDevID key must be an EC key")
    try:
        key.verify(req.signature, signed_bytes(req.idevid, req.csr, req.e2e_public, req.nonce, req.time_ns),
                   ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise Refused(Refusal.BAD_SIGNATURE, "the request is not signed by the IDevID's key") from None
    return Verified(leaf, serial, username, anchor)


def _chain_to_anchor(certs: Sequence[x509.Certificate],
                     anchors: Sequence[x509.Certificate]) -> x509.Certificate:
    """The allow-listed anchor that issued the chain (each link checked by signature and issuer name;
    intermediates must be CAs). Refused(UNTRUSTED_CA) when none did."""
    for i, cert in enumerate(certs):
        if i > 0:
            try:
                certs[i - 1].verify_directly_issued_by(cert)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                raise Refused(Refusal.UNTRUSTED_CA, "the IDevID chain is broken") from None
            if not _is_ca(cert):
                raise Refused(Refusal.UNTRUSTED_CA, "an intermediate of the chain is not a CA")
        for anchor in anchors:
            try:
                cert.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            return anchor
    raise Refused(Refusal.UNTRUSTED_CA, "the IDevID is not issued by an allow-listed manufacturer CA")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# -- the answer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Approved:
    """Everything agent.toml needs, all public: the device made its private keys and keeps them."""

    device_id: str
    certificate: bytes  # PEM, the LDevID (sgw TLS client certificate over the CSR's key)
    ca_certificate: bytes  # PEM, sgw's CA
    device_key_id: int
    gateway_public: bytes
    gateway_key_id: int
    broker_host: str
    broker_port: int
    suite: str = "x25519"  # the uplink suite to seal with (the registry holds the device to it)
    gateway_kem_public: bytes = b""  # the gateway's ML-KEM-768 key, when this home has one


def encode_approved(nonce: bytes, a: Approved) -> bytes:
    return json.dumps({
        "v": VERSION, "status": "approved", "nonce": nonce.hex(), "device_id": a.device_id,
        "certificate": a.certificate.decode(), "ca_certificate": a.ca_certificate.decode(),
        "device_key_id": a.device_key_id, "gateway_public_key": a.gateway_public.hex(),
        "gateway_key_id": a.gateway_key_id, "broker_host": a.broker_host, "broker_port": a.broker_port,
        "suite": a.suite, "gateway_mlkem_public_key": a.gateway_kem_public.hex(),
    }, sort_keys=True).encode()


def encode_refused(nonce: bytes, reason: Refusal, detail: str) -> bytes:
    return json.dumps({"v": VERSION, "status": "refused", "nonce": nonce.hex(), "reason": reason.value,
                       "detail": detail}, sort_keys=True).encode()


@dataclass(frozen=True)
class Answer:
    nonce: bytes
    approved: Approved | None
    reason: str = ""
    detail: str = ""


def parse_answer(payload: bytes) -> Answer:
    """ValueError for anything that is not an answer of this version."""
    doc: Any = json.loads(payload)
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ValueError("not an enrollment answer of this version")
    nonce = bytes.fromhex(doc["nonce"])
    if doc["status"] == "refused":
        return Answer(nonce, None, str(doc["reason"]), str(doc.get("detail", "")))
    if doc["status"] != "approved":
        raise ValueError(f"unknown status {doc['status']!r}")
    return Answer(nonce, Approved(
        device_id=str(doc["device_id"]), certificate=str(doc["certificate"]).encode(),
        ca_certificate=str(doc["ca_certificate"]).encode(), device_key_id=int(doc["device_key_id"]),
        gateway_public=bytes.fromhex(doc["gateway_public_key"]), gateway_key_id=int(doc["gateway_key_id"]),
        broker_host=str(doc["broker_host"]), broker_port=int(doc["broker_port"]),
        suite=str(doc.get("suite", "x25519")),
        gateway_kem_public=bytes.fromhex(str(doc.get("gateway_mlkem_public_key", ""))),
    ))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(text, validate=True)
