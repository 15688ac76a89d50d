"""Issue 15, rotate-key from the device side: both halves over real files and real crypto, no broker.

The live path (sealed command, reply, CA, install, reconnect on the new keys) is in test_commands.py;
here: what each half refuses (and that a refusal changes nothing), retries, and a crash mid-install.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.agent.config import load_agent_config
from gateway.agent.rotation import (
    COMMIT_RECORD,
    PENDING_E2E,
    PENDING_TLS,
    KeyRotation,
    recover,
    rotation_paths,
)
from gateway.errors import ProvisioningError
from gateway.pki.ca import CertificateAuthority
from gateway.pki.csr import requested_key
from gateway.pki.home import Home, rotate_device_remote
from tests.support.provision import Provisioned, provision

DEV = "dev-k1"


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Provisioned, Path]:
    prov = provision(tmp_path / "home", [DEV])
    device = tmp_path / "device"
    shutil.copytree(prov.bundle(DEV), device)
    return prov, device / "agent.toml"


def _rotation(config: Path) -> KeyRotation:
    cfg = load_agent_config(config)
    return KeyRotation(rotation_paths(cfg, config), cfg.e2e.device_key_id)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_begin_is_idempotent_and_keeps_private_keys_private(installed: tuple[Provisioned, Path]) -> None:
    _prov, config = installed
    first = _rotation(config).begin()
    again = _rotation(config).begin()  # a lost reply: asked again, the same keys
    assert (first.key_id, first.e2e_public) == (again.key_id, again.e2e_public) == (2, again.e2e_public)
    assert requested_key(first.csr, DEV).public_numbers() == requested_key(again.csr, DEV).public_numbers()
    for name in (PENDING_E2E, PENDING_TLS):
        assert (config.parent / name).stat().st_mode & 0o777 == 0o600
    with pytest.raises(ProvisioningError, match="not for"):
        requested_key(first.csr, "dev-other")  # the CA side refuses a request for another id


def test_commit_refuses_what_does_not_fit_and_changes_nothing(installed: tuple[Provisioned, Path]) -> None:
    prov, config = installed
    rotation = _rotation(config)
    proposal = rotation.begin()
    home = Home(prov.home)
    ca = CertificateAuthority.load(home.ca_cert, home.ca_key)
    tls_public = requested_key(proposal.csr, DEV)
    der = serialization.Encoding.DER
    foreign = CertificateAuthority.create().leaf(DEV, tls_public).public_bytes(der)
    other_id = ca.leaf("dev-other", tls_public).public_bytes(der)
    other_key = ca.issue(DEV).cert.public_bytes(der)
    good = ca.leaf(DEV, tls_public).public_bytes(der)
    before = _files(config.parent)
    for key_id, cert, why in ((2, foreign, "trusted CA"), (2, other_id, "not for"),
                              (2, other_key, "another key"), (3, good, "not the one"),
                              (2, b"\x30" * 10, "unreadable"), (2, b"\x30" * 5000, "too large")):
        with pytest.raises(ProvisioningError, match=why):
            rotation.commit(key_id, cert)
        assert _files(config.parent) == before, why
    rotation.commit(2, good)
    after = _files(config.parent)
    assert "device_key_id = 2" in after["agent.toml"].decode()
    assert after["e2e.key"] == before[PENDING_E2E] and after["device.key"] == before[PENDING_TLS]
    assert not {PENDING_E2E, PENDING_TLS, COMMIT_RECORD} & set(after)
    assert load_agent_config(config).e2e.device_key_id == 2


def test_a_crash_mid_install_is_finished_at_the_next_start(installed: tuple[Provisioned, Path]) -> None:
    prov, config = installed
    proposal = _rotation(config).begin()
    home = Home(prov.home)
    ca = CertificateAuthority.load(home.ca_cert, home.ca_key)
    cert = ca.leaf(DEV, requested_key(proposal.csr, DEV)).public_bytes(serialization.Encoding.DER)
    pending_e2e = (config.parent / PENDING_E2E).read_bytes()
    # As if killed right after the commit record and the first file: the record is what commits.
    (config.parent / COMMIT_RECORD).write_text(f'{{"key_id": 2, "certificate": "{cert.hex()}"}}')
    (config.parent / "e2e.key").write_bytes(pending_e2e)
    cfg = load_agent_config(config)
    assert recover(rotation_paths(cfg, config))
    assert load_agent_config(config).e2e.device_key_id == 2
    assert (config.parent / "e2e.key").read_bytes() == pending_e2e
    assert not (config.parent / COMMIT_RECORD).exists()
    assert not recover(rotation_paths(cfg, config))  # nothing left to finish


def test_the_ca_half_refuses_mismatched_ids_and_answers_a_retry(installed: tuple[Provisioned, Path]) -> None:
    prov, config = installed
    home = Home(prov.home)
    proposal = _rotation(config).begin()
    with pytest.raises(ProvisioningError, match="registry's next is 2"):
        rotate_device_remote(home, DEV, e2e_public=proposal.e2e_public, csr_der=proposal.csr, key_id=5)
    with pytest.raises(ProvisioningError, match="not for"):
        rotate_device_remote(home, "dev-k2", e2e_public=proposal.e2e_public, csr_der=proposal.csr, key_id=2)
    rotated, cert = rotate_device_remote(home, DEV, e2e_public=proposal.e2e_public, csr_der=proposal.csr,
                                         key_id=2)
    assert rotated.key_id == 2
    again, cert_again = rotate_device_remote(home, DEV, e2e_public=proposal.e2e_public, csr_der=proposal.csr,
                                             key_id=2)
    assert (again.key_id, cert_again) == (2, cert)  # the answer was lost: the same certificate again
    with home.open_registry() as registry:
        record = registry.get(DEV)
        assert record is not None and sorted(k.key_id for k in record.keys) == [1, 2]
    assert not (prov.bundle(DEV) / "device.key").exists() and not (prov.bundle(DEV) / "e2e.key").exists()
