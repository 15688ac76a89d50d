"""Zero-touch enrollment on the device (docs/PROTOCOL.md, "Enrollment"): the first start of an agent
whose agent.toml has an [enroll] section and no [device] yet.

1. Make the TLS key (P-256) and the e2e key (X25519) here, as pending files beside agent.toml (0600,
   fsynced) before anything is sent. A restart reuses them, so a request the service already answered
   is asked again with the same keys and gets the same identity (the service is idempotent for the
   same IDevID and keys); no second registry entry, no second certificate.
2. Connect to the enrollment listener with the IDevID, ask (IDevID-signed: CSR, e2e public key, fresh
   nonce, time) and wait for the answer carrying our nonce; ask again on a timeout or after a refusal.
3. Check the answer (our sgw CA issued the LDevID, for the id given, over our pending key; the CA it
   names is the one we were configured with), write a commit record holding it (fsynced), then install:
   keys and certificates, then agent.toml gains [device], [mqtt] and [e2e], then the pending files and
   the record go. `recover` finishes an interrupted install at the next start; every step is idempotent,
   as in a rotation (gateway/agent/rotation.py), so a SIGKILL at any point leaves either the enrollment
   config or a complete identity, never half a set.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from gateway.agent.config import EnrollSection
from gateway.common.config import from_mapping
from gateway.common.logs import LogFormat
from gateway.common.mqtt import connect_properties, set_nodelay
from gateway.core import envelope, keys, suites
from gateway.core.topics import enroll_req_topic, enroll_resp_topic
from gateway.errors import ConfigError, ProvisioningError
from gateway.pki import templates
from gateway.pki.ca import ec_key_pem, new_ec_key
from gateway.pki.csr import check_issued, make_csr
from gateway.pki.enrollment import (
    NONCE_BYTES,
    Answer,
    Approved,
    Refused,
    broker_username,
    make_request,
    parse_answer,
    serial_of,
)
from gateway.pki.files import PRIVATE, PUBLIC, write_atomic
from gateway.registry.ids import is_device_id

log = logging.getLogger("sgw.agent.enroll")

PENDING_TLS = ".enroll-tls.key"
PENDING_E2E = ".enroll-e2e.key"
COMMIT_RECORD = ".enroll-commit.json"
REGISTRY_SETTLE_S = 1.0  # the gateway's longest registry poll interval (gateway/server/config.py)
INSTALLED = {"tls_key": "device.key", "tls_cert": "device.crt", "e2e_key": "e2e.key", "ca": "ca.crt",
             "gateway_public": "gateway_e2e.pub", "gateway_kem": "gateway_e2e_mlkem.pub"}


def log_settings(config: Path) -> tuple[str, LogFormat]:
    """(level, format) from agent.toml's [log], read leniently: enrollment logs before the config is
    checked in full (load_agent_config reports any problem right after)."""
    try:
        section = tomllib.loads(config.read_text()).get("log", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "info", "text"
    level, fmt = section.get("level", "info"), section.get("format", "text")
    if level not in {"debug", "info", "warning", "error"}:
        level = "info"
    return str(level), ("json" if fmt == "json" else "text")


def ensure_enrolled(config: Path) -> bool:
    """Enrol if agent.toml asks for it; True when it did (or finished an interrupted install)."""
    if recover(config):
        return True
    try:
        data = tomllib.loads(config.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # load_agent_config reports it, naming the problem
    if "device" in data or "enroll" not in data:
        return False
    if not isinstance(data["enroll"], dict):
        raise ConfigError("enroll: expected a table")
    section = from_mapping(EnrollSection, data["enroll"], base_dir=config.resolve().parent, where="enroll")
    Enroller(config, section).run()
    return True


@dataclass(frozen=True)
class _Identity:
    chain: list[x509.Certificate]
    key: ec.EllipticCurvePrivateKey
    serial: str
    username: str
    ca: x509.Certificate


def _load_identity(section: EnrollSection) -> _Identity:
    try:
        chain = x509.load_pem_x509_certificates(section.idevid_cert_file.read_bytes())
        key = serialization.load_pem_private_key(section.idevid_key_file.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(section.ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"enroll: cannot read the IDevID or CA files: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("enroll.idevid_key_file: the IDevID key must be an EC key")
    if chain[0].public_key() != key.public_key():
        raise ConfigError("enroll: the IDevID key does not match the IDevID certificate")
    try:
        return _Identity(chain, key, serial_of(chain[0]), broker_username(chain[0].subject), ca)
    except Refused as exc:
        raise ConfigError(f"enroll.idevid_cert_file: {exc.detail}") from None


class Enroller:
    def __init__(self, config: Path, section: EnrollSection) -> None:
        self._config = config
        self._folder = config.resolve().parent
        self._section = section
        self._id = _load_identity(section)

    def _pending(self) -> tuple[ec.EllipticCurvePrivateKey, X25519PrivateKey]:
        """The keys this enrollment asks with: made once, kept until installed."""
        tls_path, e2e_path = self._folder / PENDING_TLS, self._folder / PENDING_E2E
        try:
            tls = serialization.load_pem_private_key(tls_path.read_bytes(), password=None)
            e2e = keys.private_from_bytes(e2e_path.read_bytes())
            if isinstance(tls, ec.EllipticCurvePrivateKey):
                return tls, e2e
        except (FileNotFoundError, ValueError):
            pass
        # None, or half made (a crash between the two writes): nothing was sent with them yet, since
        # both are written before the first request.
        tls_new, e2e_new = new_ec_key(), X25519PrivateKey.generate()
        write_atomic(tls_path, ec_key_pem(tls_new), mode=PRIVATE)
        write_atomic(e2e_path, e2e_new.private_bytes_raw(), mode=PRIVATE)
        log.info("enrollment keys made on the device", extra={"fields": {"serial": self._id.serial}})
        return tls_new, e2e_new

    def run(self) -> None:
        tls_key, e2e_key = self._pending()
        csr = make_csr(self._id.serial, tls_key)
        e2e_public = keys.public_bytes(e2e_key)
        while True:
            answer = self._ask(csr, e2e_public)
            if answer is None:
                log.warning("no enrollment answer; asking again", extra={"fields": {
                    "timeout_s": self._section.timeout_s}})
                continue
            if answer.approved is None:
                log.warning("enrollment refused", extra={"fields": {
                    "reason": answer.reason, "detail": answer.detail, "retry_s": self._section.retry_s}})
                time.sleep(self._section.retry_s)
                continue
            try:
                self._check(answer.approved, tls_key)
            except ProvisioningError as exc:
                log.warning("enrollment answer refused by the device", extra={"fields": {"error": str(exc)}})
                time.sleep(self._section.retry_s)
                continue
            self._commit(answer.approved)
            log.info("enrolled", extra={"fields": {"device": answer.approved.device_id,
                                                   "serial": self._id.serial}})
            # The gateway reads a new registry entry at its next poll (registry.poll_interval_s, at
            # most 1 s): windows sent before that are refused as unknown_device and only go again
            # after outbox.receipt_timeout_s. Waiting out one poll once saves that round.
            time.sleep(REGISTRY_SETTLE_S)
            return

    def _ask(self, csr: bytes, e2e_public: bytes) -> Answer | None:
        """One request over one connection; the answer carrying its nonce, or None on a timeout."""
        section, ident = self._section, self._id
        nonce = secrets.token_bytes(NONCE_BYTES)
        request = make_request(ident.chain, ident.key, csr=csr, e2e_public=e2e_public, nonce=nonce,
                               time_ns=time.time_ns()).encode()
        got: list[Answer] = []
        done = threading.Event()
        ready = threading.Event()

        def on_connect(c: paho.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
            if getattr(rc, "is_failure", False):
                log.warning("enrollment listener refused us", extra={"fields": {"reason": str(rc)}})
                return
            set_nodelay(c)
            c.subscribe(enroll_resp_topic(ident.username), qos=1)

        def on_subscribe(c: paho.Client, _u: object, _m: int, _rc: object, _p: object = None) -> None:
            ready.set()
            c.publish(enroll_req_topic(ident.username), request, qos=1)

        def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
            try:
                answer = parse_answer(bytes(msg.payload))
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable enrollment answer ignored")
                return
            if answer.nonce == nonce:
                got.append(answer)
                done.set()

        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"enroll-{secrets.token_hex(4)}", protocol=paho.MQTTv5)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(section.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(section.idevid_cert_file), str(section.idevid_key_file))
        client.tls_set_context(ctx)
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        try:
            client.connect(section.host, section.port, keepalive=30, properties=connect_properties())
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot reach the enrollment listener", extra={"fields": {
                "host": section.host, "port": section.port, "error": str(exc)}})
            time.sleep(min(section.timeout_s, section.retry_s))
            return None
        client.loop_start()
        try:
            done.wait(section.timeout_s)
        finally:
            client.disconnect()
            client.loop_stop()
        if not ready.is_set():
            log.warning("enrollment listener did not take our IDevID (TLS or ACL)")
        return got[0] if got else None

    def _check(self, a: Approved, tls_key: ec.EllipticCurvePrivateKey) -> None:
        if not is_device_id(a.device_id):
            raise ProvisioningError(f"the answer's device id {a.device_id!r} is not a device id")
        try:
            ca = x509.load_pem_x509_certificate(a.ca_certificate)
            cert = x509.load_pem_x509_certificate(a.certificate)
        except ValueError:
            raise ProvisioningError("the answer's certificates are unreadable") from None
        if ca != self._id.ca:
            raise ProvisioningError("the answer names another CA than enroll.ca_file")
        check_issued(cert.public_bytes(serialization.Encoding.DER), ca=self._id.ca, device_id=a.device_id,
                     key=tls_key)
        keys.public_from_bytes(a.gateway_public)
        if not 0 <= a.device_key_id <= envelope.MAX_U32 or not 0 <= a.gateway_key_id <= envelope.MAX_U32:
            raise ProvisioningError("the answer's key ids are out of range")
        if not 1 <= a.broker_port <= 65535 or not a.broker_host:
            raise ProvisioningError("the answer's broker address is unusable")
        if a.suite not in suites.BY_NAME:
            raise ProvisioningError(f"the answer's suite {a.suite!r} is not one this agent knows")
        if a.gateway_kem_public and len(a.gateway_kem_public) != suites.KEM_PUBLIC_BYTES:
            raise ProvisioningError("the answer's gateway ML-KEM-768 key has the wrong size")
        if suites.BY_NAME[a.suite] == suites.HYBRID and not a.gateway_kem_public:
            raise ProvisioningError("the answer asks for x25519-mlkem768 without the gateway's ML-KEM key")

    def _commit(self, a: Approved) -> None:
        record = {"device_id": a.device_id, "certificate": a.certificate.decode(),
                  "ca_certificate": a.ca_certificate.decode(), "device_key_id": a.device_key_id,
                  "gateway_public": a.gateway_public.hex(), "gateway_key_id": a.gateway_key_id,
                  "broker_host": a.broker_host, "broker_port": a.broker_port, "suite": a.suite,
                  "gateway_kem_public": a.gateway_kem_public.hex()}
        write_atomic(self._folder / COMMIT_RECORD, json.dumps(record).encode(), mode=PRIVATE)
        _finish(self._config)


def recover(config: Path) -> bool:
    """Finish an install a crash interrupted; True when it did."""
    if not (config.resolve().parent / COMMIT_RECORD).exists():
        return False
    _finish(config)
    log.warning("finished an enrollment that a restart interrupted")
    return True


def _finish(config: Path) -> None:
    # Idempotent: the pending keys and the record go only at the end, and agent.toml is extended only
    # while it still has no [device].
    folder = config.resolve().parent
    record = json.loads((folder / COMMIT_RECORD).read_text())
    if (folder / PENDING_TLS).exists() and (folder / PENDING_E2E).exists():
        write_atomic(folder / INSTALLED["tls_key"], (folder / PENDING_TLS).read_bytes(), mode=PRIVATE)
        write_atomic(folder / INSTALLED["e2e_key"], (folder / PENDING_E2E).read_bytes(), mode=PRIVATE)
    write_atomic(folder / INSTALLED["tls_cert"], str(record["certificate"]).encode(), mode=PUBLIC)
    write_atomic(folder / INSTALLED["ca"], str(record["ca_certificate"]).encode(), mode=PUBLIC)
    write_atomic(folder / INSTALLED["gateway_public"], bytes.fromhex(record["gateway_public"]), mode=PUBLIC)
    kem = bytes.fromhex(str(record.get("gateway_kem_public", "")))
    if kem:
        write_atomic(folder / INSTALLED["gateway_kem"], kem, mode=PUBLIC)
    text = config.read_text()
    if "device" not in tomllib.loads(text):
        identity = templates.agent_identity_toml(
            device_id=str(record["device_id"]), kind="vibration", host=str(record["broker_host"]),
            port=int(record["broker_port"]), device_key_id=int(record["device_key_id"]),
            gateway_key_id=int(record["gateway_key_id"]), suite=str(record.get("suite", "x25519")),
            gateway_kem_file=INSTALLED["gateway_kem"] if kem else "")
        header = ("# Identity written by zero-touch enrollment (docs/OPERATIONS.md): keys made on this\n"
                  "# device, certificate from the enrollment service.\n")
        write_atomic(config, (header + identity + "\n" + text).encode(), mode=PUBLIC)
    for name in (PENDING_TLS, PENDING_E2E, COMMIT_RECORD):
        (folder / name).unlink(missing_ok=True)
