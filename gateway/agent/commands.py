"""Commands an agent accepts on its sealed downlink (docs/PROTOCOL.md, "Commands"), and its replies.

Only authenticated, fresh, unexpired commands get here (`core.downlink.DownlinkOpener`); an expired one
is answered "expired" and not run. Each reply is sealed into the outbox like any uplink message, so it
reaches the gateway through outages and is receipted. `set_config` changes only a documented whitelist,
in memory (agent.toml is not rewritten: a restart returns to the file).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.agent.rotation import Proposal
from gateway.core import suites
from gateway.core.downlink import MAX_REPLY_ERROR, command_kind_name
from gateway.errors import ProvisioningError
from gateway.pb import downlink_pb2 as dpb
from gateway.pb import messages_pb2 as pb

log = logging.getLogger("sgw.agent.commands")

LOG_LEVELS = ("debug", "info", "warning", "error")
# key -> (parse and check a value, or raise ValueError with the allowed range)
SETTABLE: dict[str, Callable[[str], float | str]] = {}


def _float_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")
        return value
    return parse


def _level(text: str) -> str:
    if text not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text


SETTABLE.update({
    "filter.summary_interval_s": _float_in(0.1, 86400.0),
    "publish_rate": _float_in(0.0, 100000.0),  # messages/s when replaying a backlog; 0 = unpaced
    "log.level": _level,
})


class Controls(Protocol):
    """What a command may touch in the running agent (gateway/agent/service.py implements it)."""

    def status_now(self) -> pb.DeviceStatus: ...
    def apply_setting(self, key: str, value: float | str) -> None: ...
    def recommission(self) -> str | None: ...  # an error, or None when it started
    def request_restart(self) -> None: ...
    def rotation_begin(self) -> Proposal: ...  # raises ProvisioningError
    def rotation_commit(self, key_id: int, certificate_der: bytes) -> None: ...  # raises ProvisioningError
    def model_chunk(self, chunk: dpb.ModelChunk) -> tuple[str | None, dict[str, str]]: ...  # error, values
    def model_rollback(self) -> tuple[str | None, dict[str, str]]: ...
    # Raise ProvisioningError; both take effect at the next start (the caller asks for it).
    def update_gateway_key(self, key_id: int, public: bytes, mlkem_public: bytes, until_ms: int) -> None: ...
    def set_suite(self, suite: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: dpb.CommandReply
    kind: str


def run(command: dpb.Command, controls: Controls, *, expired: bool) -> Outcome:
    kind = command_kind_name(command.kind) if command.kind else "unspecified"
    reply = dpb.CommandReply(command_id=command.id, ok=True)
    if expired:
        return Outcome(_error(reply, "expired before it arrived; not run"), kind)
    if command.kind == dpb.COMMAND_KIND_PING:
        pass
    elif command.kind == dpb.COMMAND_KIND_STATUS:
        reply.status = controls.status_now().SerializeToString()
    elif command.kind == dpb.COMMAND_KIND_SET_CONFIG:
        parsed: list[tuple[str, float | str]] = []
        for entry in command.config:
            parse = SETTABLE.get(entry.key)
            if parse is None:
                allowed = ", ".join(SETTABLE)
                return Outcome(_error(reply, f"{entry.key}: not settable (allowed: {allowed})"), kind)
            try:
                parsed.append((entry.key, parse(entry.value)))
            except ValueError as exc:
                return Outcome(_error(reply, f"{entry.key}: {exc}"), kind)
        for key, value in parsed:  # all checked first: a bad entry changes nothing
            controls.apply_setting(key, value)
            reply.values.add(key=key, value=str(value))
    elif command.kind == dpb.COMMAND_KIND_COMMISSION:
        problem = controls.recommission()
        if problem is not None:
            return Outcome(_error(reply, problem), kind)
    elif command.kind == dpb.COMMAND_KIND_ROTATE_KEY:
        # Two steps (gateway/agent/rotation.py): without a certificate, make the keys and answer with
        # their public halves; with one, install it and restart on the new keys.
        try:
            if not command.new_key_id:
                proposal = controls.rotation_begin()
                reply.new_key_id, reply.new_e2e_public, reply.csr = (proposal.key_id, proposal.e2e_public,
                                                                     proposal.csr)
            else:
                controls.rotation_commit(command.new_key_id, command.certificate)
                reply.new_key_id = command.new_key_id
                controls.request_restart()
        except ProvisioningError as exc:
            return Outcome(_error(reply, str(exc)), kind)
        except OSError as exc:
            return Outcome(_error(reply, f"key files: {exc.strerror or exc}"), kind)
    elif command.kind in (dpb.COMMAND_KIND_UPDATE_GATEWAY_KEY, dpb.COMMAND_KIND_SET_SUITE):
        # Persisted before the reply; the agent restarts on it after the reply is flushed, so the reply
        # is sealed with what the sender can still open.
        try:
            if command.kind == dpb.COMMAND_KIND_SET_SUITE:
                controls.set_suite(command.suite)
                reply.values.add(key="suite", value=suites.NAMES[command.suite])
            else:
                controls.update_gateway_key(command.gateway_key_id, command.gateway_public,
                                            command.gateway_mlkem_public, command.previous_until_ms)
                reply.values.add(key="gateway_key_id", value=str(command.gateway_key_id))
            controls.request_restart()
        except ProvisioningError as exc:
            return Outcome(_error(reply, str(exc)), kind)
        except OSError as exc:
            return Outcome(_error(reply, f"key files: {exc.strerror or exc}"), kind)
    elif command.kind == dpb.COMMAND_KIND_REBOOT_AGENT:
        controls.request_restart()
    elif command.kind == dpb.COMMAND_KIND_MODEL_CHUNK:
        problem, values = controls.model_chunk(command.model_chunk)
        for key, value in values.items():  # "next" even on an error: the sender resumes from there
            reply.values.add(key=key, value=value)
        if problem is not None:
            return Outcome(_error(reply, problem), kind)
        if "installed" not in values:
            return Outcome(reply, kind)  # a chunk in the middle: not worth a log line each
    elif command.kind == dpb.COMMAND_KIND_MODEL_ROLLBACK:
        problem, values = controls.model_rollback()
        for key, value in values.items():
            reply.values.add(key=key, value=value)
        if problem is not None:
            return Outcome(_error(reply, problem), kind)
    else:
        return Outcome(_error(reply, "unknown command"), kind)
    log.info("command run", extra={"fields": {"id": command.id, "kind": kind, "ok": reply.ok}})
    return Outcome(reply, kind)


def _error(reply: dpb.CommandReply, message: str) -> dpb.CommandReply:
    reply.ok = False
    reply.error = message[:MAX_REPLY_ERROR]
    log.warning("command refused", extra={"fields": {"id": reply.command_id, "error": reply.error}})
    return reply
