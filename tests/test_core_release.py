"""Model releases (gateway/core/release.py): the format, and each refusal reason from its own defect."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.core import release
from gateway.core.reasons import ReleaseReason
from gateway.errors import LocalError
from gateway.inference.manifest import default_manifest_path

KEY = Ed25519PrivateKey.generate()
TRUSTED = release.trust(release.public_raw(KEY.public_key()))


def _entry() -> dict[str, object]:
    doc = json.loads(default_manifest_path().read_text())
    return dict(doc["models"]["prefilter"])


def _files() -> dict[str, bytes]:
    return {"prefilter_b1.tflite": (default_manifest_path().parent / "prefilter_b1.tflite").read_bytes()}


def make(version: str = "1.1.0", *, role: str = "agent", kind: str = "vibration",
         allow_downgrade: bool = False, signers: tuple[Ed25519PrivateKey, ...] = (KEY,),
         files: dict[str, bytes] | None = None) -> bytes:
    return release.build(model="prefilter", version=version, role=role, kind=kind,
                         allow_downgrade=allow_downgrade, created_ms=1_700_000_000_000, entry=_entry(),
                         files=files or _files(), signers=signers)


def check(blob: bytes, *, installed: str | None = "1.0.0", role: str = "agent",
          kind: str = "vibration") -> release.Release:
    return release.verify(blob, trusted=TRUSTED, role=role, kind=kind, installed_version=installed,
                          model="prefilter")


def refused(blob: bytes, **kw: object) -> ReleaseReason:
    with pytest.raises(release.ReleaseRefusedError) as info:
        check(blob, **kw)  # type: ignore[arg-type]
    return info.value.why


def test_a_signed_release_verifies_and_carries_its_entry_and_files() -> None:
    blob = make()
    r = check(blob)
    assert (r.model, r.version, r.role, r.kind) == ("prefilter", "1.1.0", "agent", "vibration")
    assert r.files == _files() and r.key_id == next(iter(TRUSTED))
    doc = json.loads(r.manifest_document())
    variant = doc["models"]["prefilter"]["variants"][0]
    assert doc["models"]["prefilter"]["version"] == "1.1.0" and variant["file"] == "prefilter_b1.tflite"
    assert make() == blob  # deterministic: the same inputs sign to the same bytes (Ed25519)


@pytest.mark.parametrize("flip", ["statement", "signature", "file"])
def test_each_part_flipped_is_refused_for_what_it_is(flip: str) -> None:
    blob = bytearray(make())
    n = int.from_bytes(blob[8:12], "big")
    if flip == "statement":
        # a digit of created_ms: still valid JSON, still a valid statement, no longer what was signed
        at = blob.index(b"1700000000000")
        blob[at + 5] = ord("9")
        assert refused(bytes(blob)) == ReleaseReason.BAD_SIGNATURE
    elif flip == "signature":
        sig_at = 12 + n + 4
        at = blob.index(b'"sig":"', sig_at) + 8
        blob[at] = ord("0") if blob[at] != ord("0") else ord("1")
        assert refused(bytes(blob)) == ReleaseReason.BAD_SIGNATURE
    else:
        blob[-10] ^= 1
        assert refused(bytes(blob)) == ReleaseReason.TAMPERED


def test_unsigned_unknown_key_truncated_and_garbage() -> None:
    assert refused(make(signers=())) == ReleaseReason.UNSIGNED
    assert refused(make(signers=(Ed25519PrivateKey.generate(),))) == ReleaseReason.UNKNOWN_KEY
    assert refused(make()[:-1]) == ReleaseReason.TAMPERED
    assert refused(make() + b"x") == ReleaseReason.TAMPERED
    assert refused(b"not a release") == ReleaseReason.MALFORMED
    assert refused(make()[:20]) == ReleaseReason.MALFORMED
    # an extra signature by an unknown key beside the trusted one changes nothing
    assert check(make(signers=(Ed25519PrivateKey.generate(), KEY))).version == "1.1.0"


def test_target_role_kind_and_model() -> None:
    assert refused(make(role="gateway")) == ReleaseReason.WRONG_TARGET
    assert refused(make(kind="temperature")) == ReleaseReason.WRONG_TARGET
    assert check(make(kind="*")).kind == "*"
    with pytest.raises(release.ReleaseRefusedError) as info:
        release.verify(make(), trusted=TRUSTED, role="agent", kind="vibration", installed_version=None,
                       model="classifier")
    assert info.value.why == ReleaseReason.WRONG_TARGET


def test_downgrade_only_when_signed_into_the_release() -> None:
    assert refused(make("0.9.0")) == ReleaseReason.DOWNGRADE
    assert check(make("0.9.0", allow_downgrade=True)).version == "0.9.0"
    assert check(make("1.0"), installed="1.0.0").version == "1.0"  # the same version again: a reinstall
    assert check(make("0.1.0"), installed=None).version == "0.1.0"
    assert release.is_downgrade("1.9.9", "1.10") and not release.is_downgrade("1.10", "1.9.9")


def test_the_builder_refuses_what_the_verifier_would() -> None:
    with pytest.raises(LocalError, match="version"):
        make("v2")
    with pytest.raises(LocalError, match="role"):
        make(role="cloud")
    with pytest.raises(LocalError, match="does not carry"):
        make(files={"other.tflite": b"x"})
    with pytest.raises(LocalError, match="unsafe"):
        make(files={**_files(), "../x": b"x"})


def test_hybrid_ml_dsa_signature_when_the_verifier_requires_it() -> None:
    pq = release.generate_pq_key()
    pq_trusted = release.pq_trust(release.public_raw(pq.public_key()))
    hybrid = release.build(model="prefilter", version="1.1.0", role="agent", kind="vibration",
                           allow_downgrade=False, created_ms=1, entry=_entry(), files=_files(), signers=[KEY],
                           pq_signers=[pq])

    def pq_check(blob: bytes) -> release.Release:
        return release.verify(blob, trusted=TRUSTED, role="agent", kind="vibration", installed_version=None,
                              pq_trusted=pq_trusted)

    assert pq_check(hybrid).version == "1.1.0"
    assert check(hybrid).version == "1.1.0"  # an Ed25519-only verifier ignores the second signature
    for blob, reason in ((make(), ReleaseReason.UNSIGNED),  # Ed25519 alone is not enough here
                         (release.build(model="prefilter", version="1.1.0", role="agent", kind="vibration",
                                        allow_downgrade=False, created_ms=1, entry=_entry(), files=_files(),
                                        signers=[KEY], pq_signers=[release.generate_pq_key()]),
                          ReleaseReason.UNKNOWN_KEY)):
        with pytest.raises(release.ReleaseRefusedError) as info:
            pq_check(blob)
        assert info.value.why == reason
    flipped = bytearray(hybrid)
    at = flipped.index(b'"alg":"mldsa65"')
    at = flipped.index(b'"sig":"', at) + 20
    flipped[at] = ord("0") if flipped[at] != ord("0") else ord("1")
    with pytest.raises(release.ReleaseRefusedError) as info:
        pq_check(bytes(flipped))
    assert info.value.why == ReleaseReason.BAD_SIGNATURE
    # the Ed25519 signature alone still holds over the statement: an Ed25519-only verifier accepts it
    assert check(bytes(flipped)).version == "1.1.0"
