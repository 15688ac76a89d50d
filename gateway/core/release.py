"""Signed model releases: one file that carries a manifest entry, its model files and who signed it.

A release is built and signed offline with a release key (Ed25519) that is not the CA key: the CA
decides who may connect, the release key what may run. Layout (docs/SECURITY.md, "Model releases"):

    b"SGWREL\\x00\\x01"
    u32 BE len || statement        canonical JSON (sorted keys, no spaces), the only thing signed
    u32 BE len || signatures       JSON list of {"alg", "key_id", "sig"}; Ed25519 over LABEL || statement
    file bytes                     concatenated in the statement's "files" order

The statement names the model, its version, its target (role agent|gateway, sensor kind or "*"),
allow_downgrade, and each file's size and sha256; its manifest entry's variants must name those files
with the same sha256. `verify` checks, in this order, so a release always gets one reason: the framing
(malformed), any signature (unsigned), a trusted key (unknown_key), its signature (bad_signature),
every file hash (tampered), the target (wrong_target), the version against the installed one
(downgrade). Pure: the caller passes the trusted keys, the installed version and the clock.

The signature list is algorithm-tagged. Ed25519 is always required; a verifier that also trusts an
ML-DSA-65 key (FIPS 204) requires a valid ML-DSA-65 signature as well (both must hold: a hybrid, so a
break of either scheme alone forges nothing; docs/SECURITY.md says when to turn it on). A signature of
an algorithm a verifier does not require is ignored: it never makes a release valid on its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.core.reasons import ReleaseReason
from gateway.errors import LocalError, RemoteError

MAGIC = b"SGWREL\x00\x01"
FORMAT = 1
LABEL = b"sgw/v1 model release\x00"  # domain separation: this key's signatures mean nothing elsewhere
ALG_ED25519 = "ed25519"
ALG_MLDSA65 = "mldsa65"
MLDSA65_PUBLIC_KEY_BYTES = 1952
ROLES = ("agent", "gateway")
ANY_KIND = "*"
RESERVED_NAMES = ("manifest.json", "release.sgwrel")  # what an installed release's folder adds
MAX_STATEMENT_BYTES = 1 << 20  # the classifier's entry (open-set constants) is about 215 KB
MAX_SIGNATURES_BYTES = 16384
MAX_FILES = 16
MAX_RELEASE_BYTES = 32 << 20
PUBLIC_KEY_BYTES = 32

T = TypeVar("T")
_LEN = struct.Struct(">I")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"\d{1,9}(\.\d{1,9}){0,3}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PublicKey(Protocol):
    """Ed25519PublicKey and MLDSA65PublicKey alike."""

    def verify(self, signature: bytes, data: bytes) -> None: ...
    def public_bytes_raw(self) -> bytes: ...


class Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...
    def public_key(self) -> Any: ...  # a PublicKey


class ReleaseRefusedError(RemoteError):
    """A release this verifier will not load. The text is fixed per reason plus the release's own public
    fields (model, versions), never key material."""

    def __init__(self, reason: ReleaseReason, detail: str = "") -> None:
        text = f"model release refused: {reason.value}" + (f" ({detail})" if detail else "")
        super().__init__(reason.value, text)
        self.why: ReleaseReason = reason


@dataclass(frozen=True)
class Release:
    model: str
    version: str
    role: str
    kind: str
    allow_downgrade: bool
    created_ms: int
    entry: Mapping[str, Any] = field(repr=False)  # the manifest entry (edge_models/manifest.json shape)
    files: Mapping[str, bytes] = field(repr=False)
    digest: str  # sha256 of the whole release file: its id on the downlink and in logs
    key_id: str  # the trusted key whose signature made it valid

    def manifest_document(self) -> bytes:
        """A manifest (gateway/inference/manifest.py) holding just this model, files beside it."""
        doc = {"format": 1, "generator": "sgw model release", "models": {self.model: self.entry}}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "role": self.role, "kind": self.kind,
                "allow_downgrade": self.allow_downgrade, "created_ms": self.created_ms, "digest": self.digest,
                "key_id": self.key_id, "files": {n: len(b) for n, b in self.files.items()}}


def key_id(public_raw: bytes) -> str:
    """A release key's short name: the first 8 bytes of sha256 of its raw public key, in hex."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def public_raw(key: PublicKey) -> bytes:
    return key.public_bytes_raw()


def version_tuple(version: str) -> tuple[int, ...]:
    if not _VERSION.fullmatch(version):
        raise ValueError(f"version {version!r} is not 1-4 dot-separated numbers (1.2.0)")
    return tuple(int(p) for p in version.split("."))


def is_downgrade(version: str, installed: str | None) -> bool:
    """Below the installed version (1.2 == 1.2.0). The same version again is a reinstall, not a downgrade."""
    if installed is None:
        return False
    a, b = version_tuple(version), version_tuple(installed)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) < b + (0,) * (width - len(b))


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def statement_problem(st: Mapping[str, Any]) -> str | None:
    """What makes a statement invalid, or None. The builder refuses what the verifier would refuse."""
    try:
        if st.get("format") != FORMAT:
            return "unknown statement format"
        if not isinstance(st.get("model"), str) or not _NAME.fullmatch(st["model"]):
            return "model must be 1-64 characters of [A-Za-z0-9._-]"
        version_tuple(st["version"])
        if st.get("role") not in ROLES:
            return f"role must be one of {', '.join(ROLES)}"
        kind = st.get("kind")
        if not isinstance(kind, str) or not (kind == ANY_KIND or _NAME.fullmatch(kind)):
            return "kind must be a sensor kind or *"
        if not isinstance(st.get("allow_downgrade"), bool) or not isinstance(st.get("created_ms"), int):
            return "allow_downgrade must be a boolean and created_ms an integer"
        files = st["files"]
        if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
            return f"a release carries 1..{MAX_FILES} files"
        names: set[str] = set()
        for f in files:
            name = f["name"]
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (*RESERVED_NAMES, *names):
                return "a file name is unsafe, reserved or repeated"
            names.add(name)
            if not isinstance(f["size"], int) or f["size"] < 0 or not _HEX64.fullmatch(str(f["sha256"])):
                return "a file's size or sha256 is malformed"
        entry = st["entry"]
        if not isinstance(entry, dict) or str(entry.get("version")) != st["version"]:
            return "the manifest entry's version differs from the release's"
        by_name = {f["name"]: f["sha256"] for f in files}
        variants = entry.get("variants")
        if not isinstance(variants, list) or not variants:
            return "the manifest entry lists no variants"
        for v in variants:
            if by_name.get(v.get("file")) != v.get("sha256"):
                return "a variant names a file the release does not carry, or another sha256"
    except ValueError as exc:  # version_tuple says which version
        return str(exc)
    except (KeyError, TypeError, AttributeError) as exc:
        return f"statement is incomplete: {type(exc).__name__}"
    return None


def build(*, model: str, version: str, role: str, kind: str, allow_downgrade: bool, created_ms: int,
          entry: Mapping[str, Any], files: Mapping[str, bytes],
          signers: Sequence[Ed25519PrivateKey], pq_signers: Sequence[Signer] = ()) -> bytes:
    """The release file. `entry` is the manifest entry; its variants' sha256 are set from `files` here, and
    its version to `version`. Raises LocalError for what a verifier would refuse (no signer: an unsigned
    release, which only tests build). pq_signers: ML-DSA-65 keys (load_pq_private_key) signing too."""
    entry_copy: dict[str, Any] = json.loads(json.dumps(entry))  # a deep copy we may edit
    digests = {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}
    entry_copy["version"] = version
    for v in entry_copy.get("variants") or []:
        if v.get("file") in digests:
            v["sha256"] = digests[v["file"]]
            v["bytes"] = len(files[v["file"]])
    st = {"format": FORMAT, "model": model, "version": version, "role": role, "kind": kind,
          "allow_downgrade": allow_downgrade, "created_ms": created_ms, "entry": entry_copy,
          "files": [{"name": n, "size": len(files[n]), "sha256": digests[n]} for n in files]}
    problem = statement_problem(st)
    if problem is not None:
        raise LocalError(f"cannot build the release: {problem}")
    statement = _canonical(st)
    if len(statement) > MAX_STATEMENT_BYTES:
        raise LocalError("cannot build the release: its manifest entry is too large")
    sigs = [{"alg": alg, "key_id": key_id(public_raw(k.public_key())), "sig": k.sign(LABEL + statement).hex()}
            for alg, keys in ((ALG_ED25519, signers), (ALG_MLDSA65, pq_signers)) for k in keys]
    signatures = _canonical(sigs)
    out = b"".join((MAGIC, _LEN.pack(len(statement)), statement, _LEN.pack(len(signatures)), signatures,
                    *files.values()))
    if len(out) > MAX_RELEASE_BYTES:
        raise LocalError(f"cannot build the release: larger than {MAX_RELEASE_BYTES} bytes")
    return out


@dataclass(frozen=True)
class _Parsed:
    statement_bytes: bytes
    statement: Mapping[str, Any]
    signatures: list[Mapping[str, Any]]
    files: dict[str, bytes]
    sizes_ok: bool  # the file bytes add up to the statement's sizes (checked after the signature)


def _parse(blob: bytes) -> _Parsed:
    bad = ReleaseRefusedError(ReleaseReason.MALFORMED)
    if len(blob) > MAX_RELEASE_BYTES or not blob.startswith(MAGIC):
        raise bad
    i = len(MAGIC)
    if i + _LEN.size > len(blob):
        raise bad
    (n,) = _LEN.unpack_from(blob, i)
    i += _LEN.size
    if n > MAX_STATEMENT_BYTES or i + n + _LEN.size > len(blob):
        raise bad
    statement_bytes = blob[i:i + n]
    i += n
    (m,) = _LEN.unpack_from(blob, i)
    i += _LEN.size
    if m > MAX_SIGNATURES_BYTES or i + m > len(blob):
        raise bad
    try:
        st = json.loads(statement_bytes)
        sigs = json.loads(blob[i:i + m])
    except ValueError:
        raise bad from None
    i += m
    if not isinstance(st, dict) or statement_problem(st) is not None or not isinstance(sigs, list):
        raise bad
    if not all(isinstance(s, dict) for s in sigs):
        raise bad
    files: dict[str, bytes] = {}
    for f in st["files"]:
        files[f["name"]] = blob[i:i + f["size"]]
        i += f["size"]
    # short (a truncated download) or trailing bytes: tampered, but only once the signature held
    return _Parsed(statement_bytes, st, sigs, files, sizes_ok=i == len(blob))


def claimed_model(blob: bytes) -> str | None:
    """The model a release says it is, unverified (to look up what is installed before verifying)."""
    try:
        return str(_parse(blob).statement["model"])
    except ReleaseRefusedError:
        return None


def _check_signatures(p: _Parsed, alg: str, trusted: Mapping[str, PublicKey]) -> str:
    """The key id of a trusted `alg` signer whose signature holds; every trusted one must hold."""
    ours = [s for s in p.signatures if s.get("alg") == alg and s.get("key_id") in trusted]
    if not ours:
        if alg != ALG_ED25519 and not any(s.get("alg") == alg for s in p.signatures):
            raise ReleaseRefusedError(ReleaseReason.UNSIGNED, f"no {alg} signature; it is required here")
        raise ReleaseRefusedError(ReleaseReason.UNKNOWN_KEY)
    for s in ours:  # one bad signature by a trusted key is a forgery attempt, whatever the others say
        try:
            trusted[str(s["key_id"])].verify(bytes.fromhex(str(s["sig"])), LABEL + p.statement_bytes)
        except (InvalidSignature, ValueError):
            raise ReleaseRefusedError(ReleaseReason.BAD_SIGNATURE, alg) from None
    return str(ours[0]["key_id"])


def verify(blob: bytes, *, trusted: Mapping[str, PublicKey], role: str, kind: str,
           installed_version: str | None, model: str | None = None,
           pq_trusted: Mapping[str, PublicKey] | None = None) -> Release:
    """The release in `blob` if this verifier may load it, else ReleaseRefusedError with its reason.

    trusted: key_id -> Ed25519 public key. pq_trusted: key_id -> ML-DSA-65 public key; when given, an
    ML-DSA-65 signature is required too. role/kind: this verifier (kind "*" accepts any kind, for a
    gateway). model: the model it serves (None = any). installed_version: what it runs now."""
    p = _parse(blob)
    st = p.statement
    if not p.signatures:
        raise ReleaseRefusedError(ReleaseReason.UNSIGNED)
    signer = _check_signatures(p, ALG_ED25519, trusted)
    if pq_trusted:
        _check_signatures(p, ALG_MLDSA65, pq_trusted)
    if not p.sizes_ok:
        raise ReleaseRefusedError(ReleaseReason.TAMPERED, "the file bytes do not add up to the signed sizes")
    for f in st["files"]:
        if hashlib.sha256(p.files[f["name"]]).hexdigest() != f["sha256"]:
            raise ReleaseRefusedError(ReleaseReason.TAMPERED, f"{f['name']} does not match its sha256")
    if st["role"] != role:
        wrong = f"built for the {st['role']}, this is the {role}"
    elif kind != ANY_KIND and st["kind"] not in (ANY_KIND, kind):
        wrong = f"built for {st['kind']} sensors, this is {kind}"
    elif model is not None and st["model"] != model:
        wrong = f"model {st['model']}, this runs {model}"
    else:
        wrong = ""
    if wrong:
        raise ReleaseRefusedError(ReleaseReason.WRONG_TARGET, wrong)
    if not st["allow_downgrade"] and is_downgrade(st["version"], installed_version):
        raise ReleaseRefusedError(ReleaseReason.DOWNGRADE, f"{st['version']} is below {installed_version}")
    return Release(model=st["model"], version=st["version"], role=st["role"], kind=st["kind"],
                   allow_downgrade=st["allow_downgrade"], created_ms=st["created_ms"], entry=st["entry"],
                   files=p.files, digest=hashlib.sha256(blob).hexdigest(), key_id=signer)


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    """A trusted release key from its raw 32 bytes (the release.pub file). ValueError otherwise."""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"a release public key is {PUBLIC_KEY_BYTES} raw bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def trust(*raws: bytes) -> dict[str, PublicKey]:
    """key_id -> key for raw public keys (ValueError on a malformed one)."""
    return {key_id(r): load_public_key(r) for r in raws}


# ML-DSA-65 through `cryptography` (>= 50, with an OpenSSL that has ML-DSA, 3.5 or newer): imported only
# where a fleet turns it on, so a device without it runs Ed25519-only releases as before.
def _mldsa() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import mldsa  # noqa: PLC0415
    except ImportError:
        raise LocalError("ML-DSA-65 needs cryptography >= 50 (pip install -U cryptography)") from None
    return mldsa


def load_pq_public_key(raw: bytes) -> PublicKey:
    if len(raw) != MLDSA65_PUBLIC_KEY_BYTES:
        raise ValueError(f"an ML-DSA-65 public key is {MLDSA65_PUBLIC_KEY_BYTES} raw bytes, got {len(raw)}")
    def make() -> PublicKey:
        key: PublicKey = _mldsa().MLDSA65PublicKey.from_public_bytes(raw)
        return key
    return _unsupported_is_local(make)


def load_pq_private_key(seed: bytes) -> Signer:
    if len(seed) != 32:
        raise ValueError("an ML-DSA-65 private key is its raw 32-byte seed")
    def make() -> Signer:
        key: Signer = _mldsa().MLDSA65PrivateKey.from_seed_bytes(seed)
        return key
    return _unsupported_is_local(make)


def generate_pq_key() -> Signer:
    return _unsupported_is_local(_generate)


def _generate() -> Signer:
    key: Signer = _mldsa().MLDSA65PrivateKey.generate()
    return key


def pq_trust(*raws: bytes) -> dict[str, PublicKey]:
    return {key_id(r): load_pq_public_key(r) for r in raws}


def _unsupported_is_local(make: Callable[[], T]) -> T:
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415

    try:
        return make()
    except UnsupportedAlgorithm:
        raise LocalError("ML-DSA-65 is not supported by this cryptography's OpenSSL (3.5 or newer needed)") \
            from None
