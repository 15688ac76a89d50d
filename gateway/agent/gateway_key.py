"""The gateway keys and the suite an agent was told about over its downlink (`update_gateway_key`,
`set_suite`; docs/PROTOCOL.md "Gateway key rotation", "Set the suite over the downlink").

They live in the agent's state folder, beside the outbox (`<outbox>.gateway.json` and the public key files
it names), never in agent.toml or the installed key files: under the packaged systemd unit those are
read-only credentials and /etc, while the outbox's folder is the unit's writable StateDirectory. At every
start `apply` lays them over the config: the gateway key id, its public key file(s) and the suite.

One write commits a change: the new public key files are written first under names carrying the key id,
then the JSON (fsynced, renamed into place) that names them. A crash before the rename leaves the agent
on what it had; after it, on the new state. The JSON also lists the gateway keys trusted before, each
with the end of its grace, for the downlink only (`previous`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.agent.config import AgentConfig
from gateway.core import keys, suites
from gateway.errors import ConfigError, ProvisioningError
from gateway.pki.files import PUBLIC, write_atomic

log = logging.getLogger("sgw.agent.gateway_key")

MAX_PREVIOUS = 8


@dataclass(frozen=True, slots=True)
class Trusted:
    key_id: int
    public: bytes
    until_ms: int  # 0 = no end (the key this agent seals with)


def state_path(cfg: AgentConfig) -> Path:
    return cfg.outbox.path.with_name(cfg.outbox.path.name + ".gateway.json")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: not the agent's gateway key state ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not the agent's gateway key state (not an object)")
    return data


def apply(cfg: AgentConfig) -> AgentConfig:
    """`cfg` with what the downlink installed laid over [e2e]; unchanged when nothing was. A damaged state
    file is a ConfigError: trust must neither widen nor silently fall back."""
    path = state_path(cfg)
    data = _read(path)
    if data is None:
        return cfg
    try:
        e2e = cfg.e2e
        changes: dict[str, Any] = {}
        if data.get("gateway_key_id") is not None:
            changes["gateway_key_id"] = int(data["gateway_key_id"])
            changes["gateway_public_key_file"] = path.with_name(str(data["public_file"]))
            if data.get("mlkem_file"):
                changes["gateway_mlkem_public_key_file"] = path.with_name(str(data["mlkem_file"]))
        if data.get("suite"):
            changes["suite"] = str(data["suite"])
        return dataclasses.replace(cfg, e2e=dataclasses.replace(e2e, **changes))
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not the agent's gateway key state ({exc})") from None


def load_previous(cfg: AgentConfig, now_ms: int) -> list[Trusted]:
    """The gateway keys trusted before the current one that are still in their grace."""
    path = state_path(cfg)
    data = _read(path)
    if data is None:
        return []
    try:
        items = data.get("previous", [])
        out = [Trusted(int(i["key_id"]), bytes.fromhex(i["public"]), int(i["until_ms"])) for i in items]
        for t in out:
            keys.public_from_bytes(t.public)
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{path}: not a list of trusted gateway keys ({exc})") from None
    return [t for t in out if t.until_ms > now_ms]


def _write(cfg: AgentConfig, data: dict[str, Any]) -> None:
    path = state_path(cfg)
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode=PUBLIC)


def install(cfg: AgentConfig, *, key_id: int, public: bytes, mlkem_public: bytes, trusted: list[Trusted],
            until_ms: int) -> None:
    """Seal to `public` under `key_id` from the next start; every key in `trusted` stays trusted on the
    downlink until min(its end, until_ms). ProvisioningError, with nothing changed, when it cannot."""
    try:
        keys.public_from_bytes(public)
        if mlkem_public:
            keys.kem_public_from_bytes(mlkem_public)
    except ConfigError as exc:
        raise ProvisioningError(f"the new gateway key is unusable: {exc}") from None
    path = state_path(cfg)
    data = dict(_read(path) or {})
    previous = [{"key_id": t.key_id, "public": t.public.hex(),
                 "until_ms": min(t.until_ms, until_ms) if t.until_ms else until_ms}
                for t in trusted if t.key_id != key_id][-MAX_PREVIOUS:]
    public_file = f"{path.name}.{key_id}.pub"
    write_atomic(path.with_name(public_file), public, mode=PUBLIC)
    mlkem_file = ""
    if mlkem_public:
        mlkem_file = f"{path.name}.{key_id}.mlkem.pub"
        write_atomic(path.with_name(mlkem_file), mlkem_public, mode=PUBLIC)
    elif data.get("mlkem_file"):
        mlkem_file = str(data["mlkem_file"])  # no new ML-KEM key given: keep what an earlier update put
    before = {str(data.get("public_file", "")), str(data.get("mlkem_file", ""))}
    old_files = before - {public_file, mlkem_file, ""}
    data.update(gateway_key_id=key_id, public_file=public_file, mlkem_file=mlkem_file, previous=previous)
    _write(cfg, data)  # the commit point
    for name in old_files:  # what the previous update installed: superseded (its public half is listed)
        path.with_name(name).unlink(missing_ok=True)
    log.info("gateway key updated for the next start", extra={"fields": {"gateway_key_id": key_id}})


def set_suite(cfg: AgentConfig, suite: int) -> None:
    """Seal with `suite` from the next start. Suite 3 needs the gateway's ML-KEM-768 key on the device
    (configured, as every bundle has it, or installed by update_gateway_key)."""
    name = suites.NAMES.get(suite)
    if name is None:
        raise ProvisioningError(f"suite {suite} is not an uplink suite")
    effective = apply(cfg)
    if suite == suites.HYBRID and not effective.e2e.gateway_mlkem_public_key_file.is_file():
        raise ProvisioningError("no gateway ML-KEM-768 key on this device: send update-gateway-key first")
    data = dict(_read(state_path(cfg)) or {})
    data["suite"] = name
    _write(cfg, data)
    log.info("suite set for the next start", extra={"fields": {"suite": name}})
