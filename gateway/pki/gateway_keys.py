"""The gateway's static end-to-end keys in the home, and their rotation (`sgw gateway rotate-key`,
`sgw gateway retire-key`; docs/PROTOCOL.md "Gateway key rotation", docs/OPERATIONS.md).

A rotation makes a new X25519 key (and a new ML-KEM-768 key where the fleet has one) under the next key
id, in files named by their id, and rewrites the [e2e] section of every gateway*.toml in the home: the
new key seals and opens, the old one moves to `[e2e] previous` with `accept_until_ms` (opened, never
used to seal, until then). The one rename of gateway.toml is the commit point: before it the home is as
it was, after it only the copies under the legacy names (gateway/e2e.pub, which new bundles take) are
refreshed, which running it again also does. Restart the gateway(s) to load the new config, then tell the
devices (`sgw device cmd --all update-gateway-key`).
"""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.common import tomledit
from gateway.core import envelope, keys
from gateway.errors import ProvisioningError
from gateway.pki.ca import new_mlkem768, new_x25519
from gateway.pki.files import PRIVATE, PUBLIC, write_atomic
from gateway.pki.home import Home


@dataclass(frozen=True, slots=True)
class Previous:
    key_id: int
    private_key_file: str  # as written in the toml: relative to the home
    mlkem_private_key_file: str
    accept_until_ms: int


@dataclass(frozen=True, slots=True)
class KeySet:
    """gateway.toml's [e2e] keys: the current one (seals and opens) and those being rotated out."""

    key_id: int
    private_key_file: str
    mlkem_private_key_file: str
    suites: tuple[str, ...]
    previous: tuple[Previous, ...]


@dataclass(frozen=True, slots=True)
class Loaded:
    """The private keys of a KeySet, for a process that seals or opens with the home's keys (the CLI)."""

    key_id: int
    x25519: dict[int, X25519PrivateKey]
    mlkem: dict[int, MLKEM768PrivateKey]
    accept_until_ns: dict[int, int]  # previous keys only

    def downlink_key(self, now_ms: int) -> int:
        """The key to seal commands with: the oldest still in its grace (every device, updated or not,
        trusts it), else the current one."""
        live = [(until, kid) for kid, until in self.accept_until_ns.items() if until > now_ms * 1_000_000]
        return min(live)[1] if live else self.key_id


def read_key_set(config: Path) -> KeySet:
    try:
        data = tomllib.loads(config.read_text())
        e2e = data["e2e"]
        previous = tuple(Previous(int(p["key_id"]), str(p["private_key_file"]),
                                  str(p.get("mlkem_private_key_file", "")), int(p["accept_until_ms"]))
                         for p in e2e.get("previous", []))
        return KeySet(int(e2e.get("key_id", 1)), str(e2e["private_key_file"]),
                      str(e2e.get("mlkem_private_key_file", "")),
                      tuple(str(s) for s in e2e.get("suites", [])), previous)
    except FileNotFoundError:
        raise ProvisioningError(f"missing {config}; run 'sgw ca init' first") from None
    except (KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise ProvisioningError(f"{config}: cannot read the [e2e] keys ({exc})") from None


def load_keys(home: Home) -> Loaded:
    ks = read_key_set(home.gateway_toml)
    root = home.root
    try:
        x = {ks.key_id: keys.private_from_bytes((root / ks.private_key_file).read_bytes())}
        kem = ({ks.key_id: keys.kem_private_from_bytes((root / ks.mlkem_private_key_file).read_bytes())}
               if ks.mlkem_private_key_file else {})
        until: dict[int, int] = {}
        for p in ks.previous:
            x[p.key_id] = keys.private_from_bytes((root / p.private_key_file).read_bytes())
            if p.mlkem_private_key_file:
                kem[p.key_id] = keys.kem_private_from_bytes((root / p.mlkem_private_key_file).read_bytes())
            until[p.key_id] = p.accept_until_ms * 1_000_000
    except OSError as exc:
        raise ProvisioningError(f"cannot read a gateway key {exc.filename}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ProvisioningError(f"a gateway key file is unusable: {exc}") from None
    return Loaded(ks.key_id, x, kem, until)


def with_e2e(text: str, ks: KeySet) -> str | None:
    """The toml's text with its [e2e] keys set to `ks` (the key, its files, `previous` as a list of
    tables) through gateway/common/tomledit.py, so the operator's comments and other edits stay; None when
    it is not TOML with an [e2e] private_key_file."""
    if tomledit.get(text, "e2e", "private_key_file") is None:
        return None
    previous = [{"key_id": p.key_id, "private_key_file": p.private_key_file,
                 "mlkem_private_key_file": p.mlkem_private_key_file, "accept_until_ms": p.accept_until_ms}
                for p in ks.previous]
    try:
        return tomledit.set_keys(text, {"e2e": {
            "private_key_file": ks.private_key_file, "key_id": ks.key_id,
            "mlkem_private_key_file": ks.mlkem_private_key_file, "previous": previous}})
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Rotation:
    old_key_id: int
    key_id: int
    accept_until_ms: int
    mlkem: bool
    configs: tuple[Path, ...]
    dropped: tuple[int, ...]  # earlier keys whose grace had ended: removed from the config and the home


def rotate_gateway_key(home: Home, *, grace_s: int, now_ms: int) -> Rotation:
    """New key(s) under the next id; the current becomes a previous key accepted for `grace_s`."""
    if not 0 <= grace_s <= 10 * 365 * 86400:
        raise ProvisioningError("--grace must be 0 s to 10 years")
    ks = read_key_set(home.gateway_toml)
    new_id = max([ks.key_id, *(p.key_id for p in ks.previous)]) + 1
    if new_id > envelope.MAX_U32:
        raise ProvisioningError("the gateway has run out of key ids")
    texts = {}
    for config in home.gateway_configs():
        text = config.read_text()
        if with_e2e(text, ks) is None:
            raise ProvisioningError(f"{config}: no single [e2e] section to rewrite")
        other = read_key_set(config)
        if config != home.gateway_toml and (other.key_id, other.private_key_file) != (ks.key_id,
                                                                                     ks.private_key_file):
            continue  # an instance on keys of its own: not this rotation's to change
        texts[config] = (text, other.suites)
    gw = home.gateway_dir
    # The current key under its id, so the config can keep naming it after the legacy files move on.
    old_x = f"gateway/e2e.{ks.key_id}.key"
    old_kem = f"gateway/e2e_mlkem.{ks.key_id}.key" if ks.mlkem_private_key_file else ""
    for src, dst in ((ks.private_key_file, old_x), (ks.mlkem_private_key_file, old_kem)):
        if src and src != dst and not (home.root / dst).exists():
            write_atomic(home.root / dst, (home.root / src).read_bytes(), mode=PRIVATE)
    x_private, x_public = new_x25519()
    write_atomic(gw / f"e2e.{new_id}.key", x_private, mode=PRIVATE)
    write_atomic(gw / f"e2e.{new_id}.pub", x_public, mode=PUBLIC)
    kem_file = ""
    if ks.mlkem_private_key_file:
        kem_private, kem_public = new_mlkem768()
        write_atomic(gw / f"e2e_mlkem.{new_id}.key", kem_private, mode=PRIVATE)
        write_atomic(gw / f"e2e_mlkem.{new_id}.pub", kem_public, mode=PUBLIC)
        kem_file = f"gateway/e2e_mlkem.{new_id}.key"
    until = now_ms + grace_s * 1000
    kept = tuple(p for p in ks.previous if p.accept_until_ms > now_ms)
    dropped = tuple(p for p in ks.previous if p.accept_until_ms <= now_ms)
    previous = (*kept, Previous(ks.key_id, old_x, old_kem, until))
    for config, (text, config_suites) in texts.items():  # gateway.toml first: the commit point
        new = KeySet(new_id, f"gateway/e2e.{new_id}.key", kem_file, config_suites, previous)
        write_atomic(config, (with_e2e(text, new) or text).encode(), mode=PUBLIC)
    _refresh_legacy(home, new_id, bool(kem_file))
    for p in dropped:  # past their grace: nothing may open with them any more, so they go
        for name in (p.private_key_file, p.mlkem_private_key_file):
            if name and name not in (old_x, old_kem):
                (home.root / name).unlink(missing_ok=True)
    return Rotation(ks.key_id, new_id, until, bool(kem_file), tuple(texts), tuple(p.key_id for p in dropped))


def _refresh_legacy(home: Home, key_id: int, kem: bool) -> None:
    """gateway/e2e.{key,pub} (and the ML-KEM pair) hold the current key: new bundles copy the public."""
    gw = home.gateway_dir
    pairs = [(f"e2e.{key_id}.key", "e2e.key", PRIVATE), (f"e2e.{key_id}.pub", "e2e.pub", PUBLIC)]
    if kem:
        pairs += [(f"e2e_mlkem.{key_id}.key", "e2e_mlkem.key", PRIVATE),
                  (f"e2e_mlkem.{key_id}.pub", "e2e_mlkem.pub", PUBLIC)]
    for src, dst, mode in pairs:
        tmp = gw / f".{dst}.refresh.tmp"
        shutil.copyfile(gw / src, tmp)
        tmp.chmod(mode)
        tmp.replace(gw / dst)


def retire_gateway_keys(home: Home, *, now_ms: int, key_id: int | None = None) -> tuple[int, ...]:
    """End the grace of previous keys now (all, or `key_id`): what they seal is refused from now on.
    Returns the key ids retired; the gateways apply it at their next start."""
    ks = read_key_set(home.gateway_toml)
    targets = [p for p in ks.previous if key_id is None or p.key_id == key_id]
    if not targets:
        raise ProvisioningError("no gateway key is being rotated out" if key_id is None
                                else f"gateway key {key_id} is not being rotated out")
    ids = {p.key_id for p in targets}
    for config in home.gateway_configs():
        other = read_key_set(config)
        if config != home.gateway_toml and other.key_id != ks.key_id:
            continue
        previous = tuple(Previous(p.key_id, p.private_key_file, p.mlkem_private_key_file,
                                  min(p.accept_until_ms, now_ms) if p.key_id in ids else p.accept_until_ms)
                         for p in other.previous)
        text = with_e2e(config.read_text(), KeySet(other.key_id, other.private_key_file,
                                                   other.mlkem_private_key_file, other.suites, previous))
        if text is None:
            raise ProvisioningError(f"{config}: no single [e2e] section to rewrite")
        write_atomic(config, text.encode(), mode=PUBLIC)
    return tuple(sorted(ids))


def public_keys(home: Home, key_id: int) -> tuple[bytes, bytes]:
    """The current key's X25519 and ML-KEM-768 public halves (b"" where the fleet has no ML-KEM key)."""
    gw = home.gateway_dir
    named = gw / f"e2e.{key_id}.pub"
    x = (named if named.exists() else home.gateway_e2e_pub).read_bytes()
    kem_named = gw / f"e2e_mlkem.{key_id}.pub"
    kem_path = kem_named if kem_named.exists() else home.gateway_kem_pub
    return x, (kem_path.read_bytes() if kem_path.exists() else b"")
