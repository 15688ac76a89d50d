"""A key rotation started on the device (`sgw device cmd ID rotate-key`; docs/PROTOCOL.md, "Key rotation
from the device").

Two steps, so no private key ever leaves the device and the device never runs on keys the registry
does not know:
1. `begin`: make a new X25519 e2e key and a new P-256 TLS key, keep them as pending files beside the
   current ones (0600, fsynced), and answer with their public halves (the e2e public key and a
   certificate request) under the proposed key id (current + 1). Asked again, it answers with the same
   pending keys, so a lost reply costs nothing.
2. `commit`: given the key id the registry assigned and the CA's certificate for the pending TLS key,
   check both (our CA, our id, our key) and install: first a commit record (fsynced), then the files are
   replaced and agent.toml's `device_key_id` rewritten, then the pending files and the record go. A
   crash anywhere after the record is finished by `recover` at the next start, before the config is
   read, so the agent never starts on a half-installed set.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.agent.config import AgentConfig
from gateway.core import envelope, keys
from gateway.errors import ProvisioningError
from gateway.pki import templates
from gateway.pki.ca import cert_pem, ec_key_pem, new_ec_key
from gateway.pki.csr import check_issued, make_csr
from gateway.pki.files import PRIVATE, PUBLIC, write_atomic

log = logging.getLogger("sgw.agent.rotation")

PENDING_E2E = ".rotate-e2e.key"
PENDING_TLS = ".rotate-tls.key"
COMMIT_RECORD = ".rotate-commit.json"


@dataclass(frozen=True, slots=True)
class Paths:
    """Where the agent's keys live (agent.toml's [mqtt] and [e2e] files) and the config to rewrite."""

    device_id: str
    config: Path
    e2e_key: Path
    tls_key: Path
    tls_cert: Path
    ca_cert: Path

    @property
    def folder(self) -> Path:
        return self.e2e_key.parent


def rotation_paths(cfg: AgentConfig, config: Path) -> Paths:
    return Paths(device_id=cfg.device.id, config=config, e2e_key=cfg.e2e.device_key_file,
                 tls_key=cfg.mqtt.key_file, tls_cert=cfg.mqtt.cert_file, ca_cert=cfg.mqtt.ca_file)


@dataclass(frozen=True, slots=True)
class Proposal:
    key_id: int
    e2e_key: X25519PrivateKey
    e2e_public: bytes
    csr: bytes


class KeyRotation:
    def __init__(self, paths: Paths, current_key_id: int) -> None:
        self._paths = paths
        self._current = current_key_id

    def pending(self) -> Proposal | None:
        """The keys of a rotation begun and not committed, or None (unreadable pending files count as
        none: `begin` makes new ones, and the registry never saw them unless a reply carried them)."""
        folder = self._paths.folder
        try:
            e2e_raw = (folder / PENDING_E2E).read_bytes()
            tls_pem = (folder / PENDING_TLS).read_bytes()
        except FileNotFoundError:
            return None
        try:
            e2e_key = keys.private_from_bytes(e2e_raw)
            tls_key = serialization.load_pem_private_key(tls_pem, password=None)
        except ValueError:
            log.warning("pending rotation keys unreadable; a new rotation makes new ones")
            return None
        if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
            return None
        return self._proposal(e2e_key, tls_key)

    def begin(self) -> Proposal:
        if self._current + 1 > envelope.MAX_U32:
            raise ProvisioningError("this device has run out of key ids")
        found = self.pending()
        if found is not None:
            return found
        e2e_key = X25519PrivateKey.generate()
        tls_key = new_ec_key()
        folder = self._paths.folder
        write_atomic(folder / PENDING_TLS, ec_key_pem(tls_key), mode=PRIVATE)
        write_atomic(folder / PENDING_E2E, e2e_key.private_bytes_raw(), mode=PRIVATE)
        log.info("key rotation begun", extra={"fields": {"proposed_key_id": self._current + 1}})
        return self._proposal(e2e_key, tls_key)

    def _proposal(self, e2e_key: X25519PrivateKey, tls_key: ec.EllipticCurvePrivateKey) -> Proposal:
        return Proposal(self._current + 1, e2e_key, keys.public_bytes(e2e_key),
                        make_csr(self._paths.device_id, tls_key))

    def commit(self, key_id: int, certificate_der: bytes) -> None:
        """Check and install; ProvisioningError (and nothing changed) when anything does not fit."""
        paths = self._paths
        if key_id != self._current + 1:
            raise ProvisioningError(f"key id {key_id} is not the one this device proposed "
                                    f"({self._current + 1})")
        try:
            tls_key = serialization.load_pem_private_key((paths.folder / PENDING_TLS).read_bytes(), None)
            (paths.folder / PENDING_E2E).stat()
        except FileNotFoundError:
            raise ProvisioningError("no rotation is pending on this device: send rotate-key again") from None
        if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
            raise ProvisioningError("the pending TLS key is not a P-256 key")
        try:
            ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise ProvisioningError(f"cannot read the CA certificate {paths.ca_cert}: {exc}") from None
        check_issued(certificate_der, ca=ca, device_id=paths.device_id, key=tls_key)
        if templates.with_device_key_id(paths.config.read_text(), key_id) is None:
            raise ProvisioningError(f"{paths.config}: no single device_key_id line to update")
        folders = {paths.config.parent, paths.e2e_key.parent, paths.tls_key.parent, paths.tls_cert.parent}
        for folder in sorted(folders):
            if not os.access(folder, os.W_OK):  # checked before the record: a refusal must change nothing
                raise ProvisioningError(f"{folder}: the agent cannot write here; "
                                        "rotate with 'sgw device rotate'")
        record = {"key_id": key_id, "certificate": certificate_der.hex()}
        write_atomic(paths.folder / COMMIT_RECORD, json.dumps(record).encode(), mode=PRIVATE)
        _finish(paths)
        self._current = key_id


def recover(paths: Paths) -> bool:
    """Finish a commit a crash interrupted; True when it did (the caller reads the config again)."""
    if not (paths.folder / COMMIT_RECORD).exists():
        return False
    _finish(paths)
    log.warning("finished a key rotation that a restart interrupted")
    return True


def _finish(paths: Paths) -> None:
    # Idempotent: every step reads the pending files and the record, which go only at the end.
    folder = paths.folder
    record = json.loads((folder / COMMIT_RECORD).read_text())
    key_id, certificate = int(record["key_id"]), bytes.fromhex(record["certificate"])
    if (folder / PENDING_E2E).exists():
        write_atomic(paths.e2e_key, (folder / PENDING_E2E).read_bytes(), mode=PRIVATE)
        write_atomic(paths.tls_key, (folder / PENDING_TLS).read_bytes(), mode=PRIVATE)
        write_atomic(paths.tls_cert, cert_pem(x509.load_der_x509_certificate(certificate)), mode=PUBLIC)
    edited = templates.with_device_key_id(paths.config.read_text(), key_id)
    if edited is not None:
        write_atomic(paths.config, edited.encode(), mode=PUBLIC)
    for name in (PENDING_E2E, PENDING_TLS, COMMIT_RECORD):
        (folder / name).unlink(missing_ok=True)
