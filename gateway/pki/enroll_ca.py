"""The CA's half of zero-touch enrollment: decide on one verified request and issue the LDevID.

Runs where the CA key is (`sgw enroll serve`), not in the gateway: the gateway never holds the CA key,
and issuing a certificate and registering a device are the same kind of act as `sgw device add`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.core import suites
from gateway.errors import ProvisioningError
from gateway.pki import templates
from gateway.pki.ca import cert_pem, not_after_ns, serial_hex
from gateway.pki.csr import requested_key
from gateway.pki.enrollment import FRESH_S, Approved, Refusal, Refused, Request, verify_request
from gateway.pki.files import PRIVATE_DIR, fsync_dir, publish_dir, staging_dir, write_new
from gateway.pki.home import DEFAULT_KIND, GATEWAY_KEM_PUB, Home, _seed
from gateway.registry.enrollment import EnrollmentStore, fingerprint
from gateway.registry.ids import enrolled_device_id
from gateway.registry.store import NewDevice

log = logging.getLogger("sgw.enroll")


@dataclass(frozen=True)
class Decision:
    approved: Approved
    serial: str
    repeat: bool  # the same IDevID with the same keys asked again: the same identity, nothing new


def enroll(home: Home, store: EnrollmentStore, req: Request, *, username: str, now_ns: int) -> Decision:
    """Approve (issue and register, or answer a retry with what was issued) or raise Refused.

    A refusal of an allow-listed CA's serial is recorded for `sgw enroll list`; refusals before the
    chain is known (untrusted_ca, malformed) are not, since anyone can send them: they are counted
    and logged only.
    """
    cas = {c.fingerprint: c for c in store.cas()}
    verified = verify_request(req, username=username, anchors=[c.cert for c in cas.values()], now_ns=now_ns)
    entry = cas[fingerprint(verified.anchor)]
    try:
        return _decide(home, store, req, _Asked(entry.fingerprint, verified.serial, entry.prefix,
                                                entry.any_serial, entry.suite), now_ns)
    except Refused as refused:
        store.record_refusal(entry.fingerprint, verified.serial, refused.reason.value, refused.detail, now_ns)
        raise


@dataclass(frozen=True)
class _Asked:
    fp: str  # the allow-listed CA that issued the IDevID
    serial: str
    prefix: str
    any_serial: bool
    suite: int


def _decide(home: Home, store: EnrollmentStore, req: Request, asked: _Asked, now_ns: int) -> Decision:
    fp, serial, prefix, any_serial = asked.fp, asked.serial, asked.prefix, asked.any_serial
    if store.seen_nonce(req.nonce, now_ns, keep_ns=2 * FRESH_S * 1_000_000_000):
        raise Refused(Refusal.REPLAY, "this request's nonce was seen before")
    state = store.serial_state(fp, serial)
    if state is not None and state[0] == "refused":
        raise Refused(Refusal.REFUSED_BY_OPERATOR, state[1] or "refused with 'sgw enroll refuse'")
    if not any_serial and state is None:
        raise Refused(Refusal.SERIAL_NOT_ALLOWED, f"serial {serial} is not allow-listed for this CA")
    try:
        device_id = enrolled_device_id(prefix, serial)
    except ProvisioningError as exc:
        raise Refused(Refusal.NO_SERIAL, f"serial not usable as a device id: {exc}") from None
    try:
        # The device does not know its device id yet (the prefix is the operator's): it asks for its serial.
        tls_public = requested_key(req.csr, serial)
    except ProvisioningError as exc:
        raise Refused(Refusal.BAD_CSR, str(exc)) from None
    spki = tls_public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    idevid = hashlib.sha256(req.idevid).hexdigest()
    before = store.get(fp, serial)
    if before is not None and before.state == "approved":
        if before.idevid != idevid:
            raise Refused(Refusal.IDENTITY_CONFLICT, f"serial {serial} was enrolled by another IDevID")
        if before.tls_public != spki or before.e2e_public != req.e2e_public or before.certificate is None:
            raise Refused(Refusal.IDENTITY_CONFLICT,
                          f"{before.device_id} is enrolled with other keys; to enrol it afresh run "
                          f"'sgw device remove {before.device_id}' and 'sgw enroll remove --serial {serial}'")
        store.count_retry(fp, serial, now_ns)
        record = store.registry.get(before.device_id or device_id)
        suite = record.min_suite if record is not None else asked.suite
        return Decision(_answer(home, before.device_id or device_id, before.certificate, suite), serial,
                        repeat=True)
    new = _New(device_id, idevid, tls_public, spki, req.e2e_public)
    return Decision(_issue(home, store, asked, new, now_ns), serial, repeat=False)


@dataclass(frozen=True)
class _New:
    device_id: str
    idevid: str
    tls_public: ec.EllipticCurvePublicKey
    spki: bytes
    e2e_public: bytes


def _issue(home: Home, store: EnrollmentStore, asked: _Asked, new: _New, now_ns: int) -> Approved:
    fp, serial, device_id, e2e_public = asked.fp, asked.serial, new.device_id, new.e2e_public
    registry = store.registry
    folder = home.device_dir(device_id)
    if registry.get(device_id) is None and folder.is_dir() and _read(folder / "e2e.pub") == e2e_public:
        # Our own leftover: the service was killed between publishing the folder and committing the
        # registry row (both happen inside one transaction, which a SIGKILL cannot roll back on disk).
        shutil.rmtree(folder)
    if registry.get(device_id) is not None or folder.exists():
        raise Refused(Refusal.IDENTITY_CONFLICT, f"device {device_id} already exists and was not enrolled "
                                                 "by this IDevID")
    ca = home.require_ca()
    cert = ca.leaf(device_id, new.tls_public)
    pem = cert_pem(cert)
    host, port, gw_key_id = home.broker_defaults()
    with staging_dir(home.devices_dir, "enroll") as stage:
        # The home keeps the public half of the bundle, as after a rotation from the device: what
        # `sgw device cmd ID rotate-key` and `sgw device show` read.
        folder = stage / device_id
        folder.mkdir(mode=PRIVATE_DIR)
        write_new(folder / "ca.crt", home.ca_cert.read_bytes())
        write_new(folder / "device.crt", pem)
        write_new(folder / "e2e.pub", e2e_public)
        write_new(folder / "gateway_e2e.pub", home.gateway_e2e_pub.read_bytes())
        kem = _read(home.gateway_kem_pub)
        if kem is not None:
            write_new(folder / GATEWAY_KEM_PUB, kem)
        write_new(folder / "agent.toml", templates.agent_toml(
            device_id=device_id, kind=DEFAULT_KIND, host=host, port=port, device_key_id=1,
            gateway_key_id=gw_key_id, seed=_seed(device_id), suite=suites.NAMES[asked.suite],
            gateway_kem_file=GATEWAY_KEM_PUB if kem is not None else "").encode())
        with registry.transaction():
            registry.add_devices([NewDevice(device_id, DEFAULT_KIND, e2e_public, serial_hex(cert),
                                            not_after_ns(cert), min_suite=asked.suite)], now_ns=now_ns)
            store.record_approval(fp, serial, device_id=device_id, idevid=new.idevid, tls_public=new.spki,
                                  e2e_public=e2e_public, certificate=pem, now_ns=now_ns)
            publish_dir(folder, home.device_dir(device_id), mode=PRIVATE_DIR)
            fsync_dir(home.devices_dir)
    return _answer(home, device_id, pem, asked.suite)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _answer(home: Home, device_id: str, certificate: bytes, suite: int) -> Approved:
    host, port, gw_key_id = home.broker_defaults()
    x509.load_pem_x509_certificate(certificate)  # stored by us; unreadable would be a broken registry
    return Approved(device_id=device_id, certificate=certificate, ca_certificate=home.ca_cert.read_bytes(),
                    device_key_id=1, gateway_public=home.gateway_e2e_pub.read_bytes(),
                    gateway_key_id=gw_key_id, broker_host=host, broker_port=port,
                    suite=suites.NAMES.get(suite, "x25519"),
                    gateway_kem_public=_read(home.gateway_kem_pub) or b"")
