"""`sgw model keygen | release | verify`: the release key, signing a model release, checking one.

The release key signs what may run; it is not the CA key (which decides who may connect) and belongs
offline, on the machine where models are retrained. Devices and gateways trust its public half:
`keygen --trust` puts it in the sgw home, and `sgw device add` then writes it into every new bundle
(agent.toml [model] release_public_key_file). Format and checks: gateway/core/release.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.cli.ca import add_dir_arg, home_of, os_errors
from gateway.core import release as rel
from gateway.errors import ConfigError, LocalError, ProvisioningError
from gateway.inference.manifest import default_manifest_path
from gateway.inference.releases import load_trust
from gateway.pki.files import PRIVATE, PUBLIC, write_atomic

KEY_FILE = "release.key"
PUB_FILE = "release.pub"
PQ_KEY_FILE = "release-mldsa65.key"
PQ_PUB_FILE = "release-mldsa65.pub"
EXIT_REFUSED = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("keygen", help="create the release signing key (Ed25519; not the CA key)",
                       description="Writes OUT/release.key (raw 32 bytes, 0600) and OUT/release.pub. Keep "
                                   "the private key offline. --trust also copies release.pub into the sgw "
                                   "home, so new device bundles and the gateway trust it.")
    k.add_argument("--out", type=Path, required=True, help="folder for release.key and release.pub")
    k.add_argument("--trust", action="store_true", help="make it the home's trusted release key")
    k.add_argument("--pq", action="store_true",
                   help="also an ML-DSA-65 key (release-mldsa65.key/.pub): releases then carry both "
                        "signatures, and verifiers that trust it require both (docs/SECURITY.md)")
    add_dir_arg(k)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=os_errors(keygen))

    r = sub.add_parser("release", help="build and sign a model release file",
                       description="One file: the manifest entry of --model from --manifest (its version "
                                   "set to --version), the model files it names, and an Ed25519 signature "
                                   "over both. Agents and gateways refuse it unless signed by a key they "
                                   "trust, for their role and sensor kind, and not below what they run "
                                   "(unless --allow-downgrade, which is signed into it).")
    r.add_argument("--model", required=True, help="model name in the manifest (prefilter, classifier, ...)")
    r.add_argument("--version", required=True, help="release version, 1-4 dot-separated numbers")
    r.add_argument("--role", choices=rel.ROLES, required=True, help="who may load it")
    r.add_argument("--kind", default=rel.ANY_KIND, help="sensor kind it is for (default *: any)")
    r.add_argument("--key", type=Path, required=True, help="release.key from 'sgw model keygen'")
    r.add_argument("--pq-key", type=Path, default=None,
                   help="release-mldsa65.key: sign with ML-DSA-65 too (for fleets that require it)")
    r.add_argument("--manifest", type=Path, default=None, help="manifest (default: the shipped one)")
    r.add_argument("--allow-downgrade", action="store_true", help="may replace a newer version")
    r.add_argument("--out", type=Path, required=True, help="the release file to write (.sgwrel)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=os_errors(release))

    v = sub.add_parser("verify", help="check a release as an agent or gateway would",
                       description="Exit 0 and its summary when it would be loaded; exit 1 and the reason "
                                   "(malformed, unsigned, unknown_key, bad_signature, tampered, "
                                   "wrong_target, downgrade) when it would be refused.")
    v.add_argument("release", type=Path, metavar="RELEASE")
    v.add_argument("--public-key", type=Path, default=None,
                   help="trusted release.pub (default: the home's, from 'keygen --trust')")
    v.add_argument("--pq-public-key", type=Path, default=None,
                   help="require an ML-DSA-65 signature by this key (default: the home's, if it has one)")
    add_dir_arg(v)
    v.add_argument("--role", choices=rel.ROLES, default="agent")
    v.add_argument("--kind", default="vibration", help="the verifier's sensor kind (* for a gateway)")
    v.add_argument("--installed", default=None, metavar="VERSION", help="the version it would replace")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=os_errors(verify))


def _print(obj: dict[str, Any], as_json: bool, text: str) -> None:
    sys.stdout.write((json.dumps(obj, indent=2, sort_keys=True) if as_json else text) + "\n")


def _read_raw(path: Path, option: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) != 32:
        raise ConfigError(f"{option}: {path} is not a raw 32-byte release key")
    return raw


def read_private_key(path: Path) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_read_raw(path, "--key"))


def keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    key_path, pub_path = out / KEY_FILE, out / PUB_FILE
    if any((out / n).exists() for n in (KEY_FILE, PUB_FILE, PQ_KEY_FILE, PQ_PUB_FILE)):
        raise ProvisioningError(f"{out} already holds a release key; refusing to overwrite it")
    home = home_of(args)
    if args.trust and not home.gateway_toml.exists():
        raise ProvisioningError(f"--trust: {home.root} is not an sgw home (run 'sgw ca init')")
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    pq = rel.generate_pq_key() if args.pq else None  # fails here (one line) where ML-DSA is missing
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    pub = rel.public_raw(key.public_key())
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(key_path, raw, mode=PRIVATE)
    write_atomic(pub_path, pub, mode=PUBLIC)
    pq_pub = None
    if pq is not None:
        pq_pub = rel.public_raw(pq.public_key())
        write_atomic(out / PQ_KEY_FILE, pq.private_bytes_raw(), mode=PRIVATE)  # type: ignore[attr-defined]
        write_atomic(out / PQ_PUB_FILE, pq_pub, mode=PUBLIC)
    trusted = None
    if args.trust:
        trusted = home.release_pub
        write_atomic(trusted, pub, mode=PUBLIC)
        if pq_pub is not None:
            write_atomic(home.release_pq_pub, pq_pub, mode=PUBLIC)
    info = {"key_id": rel.key_id(pub), "private_key": str(key_path), "public_key": str(pub_path),
            "pq_key_id": rel.key_id(pq_pub) if pq_pub else None,
            "pq_public_key": str(out / PQ_PUB_FILE) if pq_pub else None,
            "trusted_in_home": str(trusted) if trusted else None}
    _print(info, args.json, f"release key {info['key_id']}: {key_path} (keep offline), {pub_path}"
           + (f"; trusted by {home.root}" if trusted else ""))
    return 0


def release(args: argparse.Namespace) -> int:
    from gateway.inference.manifest import load_manifest  # noqa: PLC0415

    key = read_private_key(args.key)
    pq = None
    if args.pq_key is not None:
        try:
            pq = rel.load_pq_private_key(_read_raw(args.pq_key, "--pq-key"))
        except ValueError as exc:
            raise ConfigError(f"--pq-key: {exc}") from None
    manifest_path: Path = args.manifest or default_manifest_path()
    spec = load_manifest(manifest_path).model(args.model)  # a ModelError names what is missing
    doc = json.loads(manifest_path.read_text())
    entry = doc["models"][args.model]
    files = {v.path.name: v.read_verified() for v in spec.variants}  # the manifest's own hashes first
    blob = rel.build(model=args.model, version=args.version, role=args.role, kind=args.kind,
                     allow_downgrade=args.allow_downgrade, created_ms=time.time_ns() // 1_000_000,
                     entry=entry, files=files, signers=[key], pq_signers=[pq] if pq else [])
    write_atomic(args.out, blob, mode=PUBLIC)
    checked = rel.verify(blob, trusted=rel.trust(rel.public_raw(key.public_key())), role=args.role,
                         kind=args.kind, installed_version=None,
                         pq_trusted=rel.pq_trust(rel.public_raw(pq.public_key())) if pq else None)
    info = {"release": str(args.out), "bytes": len(blob), **checked.summary()}
    _print(info, args.json, f"{args.out}: {args.model} {args.version} for the {args.role} ({args.kind}), "
           f"{len(blob)} bytes, signed by {checked.key_id}, digest {checked.digest[:16]}")
    return 0


def verify(args: argparse.Namespace) -> int:
    home = home_of(args)
    pub = args.public_key if args.public_key is not None else home.release_pub
    if not pub.is_file():
        raise ConfigError(f"--public-key: no trusted release key at {pub}")
    pq_pub = args.pq_public_key
    if pq_pub is None:
        pq_pub = home.release_pq_pub if args.public_key is None and home.release_pq_pub.is_file() else Path()
    trust = load_trust(pub, role=args.role, kind=args.kind, key="--public-key", pq_public_key_file=pq_pub,
                       pq_key="--pq-public-key")
    try:
        blob = args.release.read_bytes()
    except OSError as exc:
        raise LocalError(f"{args.release}: {exc.strerror or exc}") from None
    try:
        checked = trust.verify(blob, installed_version=args.installed)
    except rel.ReleaseRefusedError as exc:
        if args.json:
            _print({"ok": False, "reason": exc.reason, "error": str(exc)}, True, "")
        else:
            sys.stderr.write(f"sgw: error: {exc}\n")
        return EXIT_REFUSED
    _print({"ok": True, **checked.summary(), "pq_required": bool(trust.pq_keys)}, args.json,
           f"ok: {checked.model} {checked.version} for the {checked.role} ({checked.kind}), "
           f"signed by {checked.key_id}")
    return 0

