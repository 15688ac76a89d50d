"""The gateway keys an agent trusts, and the change of them the gateway's downlink asks for
(`update_gateway_key`, `set_suite`; docs/PROTOCOL.md "Gateway key rotation").

`update_gateway_key` comes sealed by a gateway key the agent already trusts. It carries the new key id and
public key(s); the agent seals with them from its next start and keeps trusting every key it trusted
before, on the downlink only, until `previous_until_ms` (the end of the gateway's grace). Installed like a
device key rotation (gateway/agent/rotation.py): a commit record first (fsynced), then the files, then the
record goes; a crash in between is finished by `recover` at the next start, before the config is read.

Files beside the gateway public key file: the new key replaces it (and the ML-KEM key file), the keys
trusted before are listed in `gateway_keys_previous.json` with their ends, agent.toml's `gateway_key_id`
(and, for set_suite, `suite`) is rewritten.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.agent.config import AgentConfig
from gateway.core import keys, suites
from gateway.errors import ConfigError, ProvisioningError
from gateway.pki import templates
from gateway.pki.files import PUBLIC, write_atomic

log = logging.getLogger("sgw.agent.gateway_key")

PREVIOUS_FILE = "gateway_keys_previous.json"
COMMIT_RECORD = ".gateway-key-commit.json"
KEM_FILE = "gateway_e2e_mlkem.pub"  # the bundle's name (gateway/pki/home.py GATEWAY_KEM_PUB)
MAX_PREVIOUS = 8


@dataclass(frozen=True, slots=True)
class Trusted:
    key_id: int
    public: bytes
    until_ms: int  # 0 = no end (the key this agent seals with)


def previous_path(cfg: AgentConfig) -> Path:
    return cfg.e2e.gateway_public_key_file.with_name(PREVIOUS_FILE)


def load_previous(path: Path, now_ms: int) -> list[Trusted]:
    """The gateway keys still in their grace; an unreadable list is a ConfigError (trust must not widen
    or silently shrink on a damaged file)."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        items = json.loads(raw)["previous"]
        out = [Trusted(int(i["key_id"]), bytes.fromhex(i["public"]), int(i["until_ms"])) for i in items]
        for t in out:
            keys.public_from_bytes(t.public)
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{path}: not a list of trusted gateway keys ({exc})") from None
    return [t for t in out if t.until_ms > now_ms]


@dataclass(frozen=True, slots=True)
class Paths:
    config: Path  # agent.toml
    gateway_public: Path
    gateway_kem: Path  # where the ML-KEM key goes (the configured file, or the bundle's name beside)
    previous: Path

    @property
    def folder(self) -> Path:
        return self.gateway_public.parent


def key_paths(cfg: AgentConfig, config: Path) -> Paths:
    kem = cfg.e2e.gateway_mlkem_public_key_file
    if kem == Path():
        kem = cfg.e2e.gateway_public_key_file.with_name(KEM_FILE)
    return Paths(config, cfg.e2e.gateway_public_key_file, kem, previous_path(cfg))


def install(paths: Paths, *, key_id: int, public: bytes, mlkem_public: bytes, trusted: list[Trusted],
            until_ms: int) -> None:
    """Trust `public` under `key_id` and seal with it from the next start; everything in `trusted` stays
    trusted until min(its end, until_ms). ProvisioningError, with nothing changed, when it cannot."""
    try:
        keys.public_from_bytes(public)
        if mlkem_public:
            keys.kem_public_from_bytes(mlkem_public)
    except ConfigError as exc:
        raise ProvisioningError(f"the new gateway key is unusable: {exc}") from None
    text = paths.config.read_text()
    if templates.with_gateway_key_id(text, key_id) is None:
        raise ProvisioningError(f"{paths.config}: no single gateway_key_id line to update")
    for folder in sorted({paths.config.parent, paths.folder}):
        if not os.access(folder, os.W_OK):
            raise ProvisioningError(f"{folder}: the agent cannot write here")
    previous = [{"key_id": t.key_id, "public": t.public.hex(),
                 "until_ms": min(t.until_ms, until_ms) if t.until_ms else until_ms}
                for t in trusted if t.key_id != key_id][-MAX_PREVIOUS:]
    record = {"key_id": key_id, "public": public.hex(), "mlkem": mlkem_public.hex(), "previous": previous}
    write_atomic(paths.folder / COMMIT_RECORD, json.dumps(record).encode(), mode=PUBLIC)
    _finish(paths)


def set_suite(paths: Paths, suite: int) -> None:
    """Seal with `suite` from the next start (agent.toml's [e2e] suite). Suite 3 needs the gateway's
    ML-KEM-768 key on the device already (every bundle has it; update_gateway_key brings a new one)."""
    name = suites.NAMES.get(suite)
    if name is None:
        raise ProvisioningError(f"suite {suite} is not an uplink suite")
    kem = ""
    if suite == suites.HYBRID:
        if not paths.gateway_kem.is_file():
            raise ProvisioningError("no gateway ML-KEM-768 key on this device: send update-gateway-key first")
        kem = os.path.relpath(paths.gateway_kem, paths.config.parent)
    text = templates.with_suite(paths.config.read_text(), name, kem)
    if text is None:
        raise ProvisioningError(f"{paths.config}: no single [e2e] suite / gateway_key_id line to edit")
    write_atomic(paths.config, text.encode(), mode=PUBLIC)
    log.info("suite set for the next start", extra={"fields": {"suite": name}})


def recover(paths: Paths) -> bool:
    """Finish an install a crash interrupted; True when it did (the caller reads the config again)."""
    if not (paths.folder / COMMIT_RECORD).exists():
        return False
    _finish(paths)
    log.warning("finished a gateway key update that a restart interrupted")
    return True


def _finish(paths: Paths) -> None:
    # Idempotent: every step is derived from the record, which goes only at the end.
    record = json.loads((paths.folder / COMMIT_RECORD).read_text())
    key_id = int(record["key_id"])
    write_atomic(paths.previous, json.dumps({"previous": record["previous"]}, indent=1).encode(), mode=PUBLIC)
    write_atomic(paths.gateway_public, bytes.fromhex(record["public"]), mode=PUBLIC)
    text = paths.config.read_text()
    if record["mlkem"]:
        write_atomic(paths.gateway_kem, bytes.fromhex(record["mlkem"]), mode=PUBLIC)
    edited = templates.with_gateway_key_id(text, key_id)
    if edited is not None and edited != text:
        write_atomic(paths.config, edited.encode(), mode=PUBLIC)
    (paths.folder / COMMIT_RECORD).unlink(missing_ok=True)
    log.info("gateway key updated for the next start", extra={"fields": {"gateway_key_id": key_id}})
