"""The agent's end of end-to-end receipts (docs/PROTOCOL.md, "Receipts").

With `[outbox] delete_on = "receipt"` a PUBACK only means "the broker has it": the window stays in the
outbox until a receipt sealed by a trusted gateway says the gateway committed it (or refused it for
good, which is counted under its reason). `AgentDownlink` opens what arrives on the cmd topic, applies
receipts to the outbox and runs commands (gateway/agent/commands.py); `Unreceipted` remembers what this
connection sent and says when to send it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.agent import commands
from gateway.agent.commands import Controls, Outcome
from gateway.agent.config import AgentConfig, E2eKeys
from gateway.agent.gateway_key import Trusted, load_previous
from gateway.agent.metrics import AgentMetrics
from gateway.agent.outbox import Outbox
from gateway.common.logs import RateLimitedLog
from gateway.core.downlink import DownlinkOpener, DownlinkRefusedError, receipt_ranges, reject_reason_name
from gateway.errors import LocalError
from gateway.pb import downlink_pb2 as dpb

log = logging.getLogger("sgw.agent.receipts")

STATE_KEY = "downlink"  # the opener's replay windows, in the outbox database
MAX_UNRECEIPTED = 4096  # sent and not receipted yet, per connection: past it the agent waits
MAX_RESEND_S = 300.0  # the resend interval doubles while no receipt comes, up to this


@dataclass(frozen=True, slots=True)
class Applied:
    """What one receipt did to the outbox: outbox ids now gone (receipted or refused)."""

    ids: list[int]
    accepted: int
    rejected: int


class AgentDownlink:
    def __init__(self, cfg: AgentConfig, e2e: E2eKeys, outbox: Outbox, metrics: AgentMetrics) -> None:
        self._outbox = outbox
        self._metrics = metrics
        self._log = RateLimitedLog(log, interval_s=10.0)
        # The key this agent seals with, and those a gateway key rotation keeps trusted until its grace
        # ends (gateway/agent/gateway_key.py): receipts and commands may come sealed by either.
        previous = load_previous(cfg, time.time_ns() // 1_000_000)
        self.trusted = [Trusted(cfg.e2e.gateway_key_id, e2e.gateway_public, 0),
                        *(t for t in previous if t.key_id != cfg.e2e.gateway_key_id)]
        self.opener = DownlinkOpener(
            device_id=cfg.device.id, device_keys={cfg.e2e.device_key_id: e2e.device_key},
            trusted_gateways={t.key_id: t.public for t in self.trusted},
            trusted_until_ns={t.key_id: t.until_ms * 1_000_000 for t in self.trusted if t.until_ms},
        )
        state = outbox.get_blob(STATE_KEY)
        if state is not None:
            try:
                self.opener.load_state(state)
            except LocalError as exc:
                # Unreadable state only forgets which downlink messages were seen: receipts are
                # idempotent, so the cost is accepting a replayed receipt once (it deletes nothing new).
                log.warning("downlink state unreadable; starting fresh",
                            extra={"fields": {"error": str(exc)}})

    def handle(self, topic: str, payload: bytes, now_ns: int, controls: Controls) -> Applied | Outcome | None:
        """Open one downlink message: a receipt is applied to the outbox, a command is run (its reply is
        the caller's to seal). None when refused."""
        try:
            opened = self.opener.open(payload, topic=topic, now_ns=now_ns, refuse_expired=False)
        except DownlinkRefusedError as exc:
            reason = exc.reason.value
            self._metrics.downlink_refused.labels(reason=reason).inc()
            self._log.emit(f"refused:{reason}", "downlink message refused", {"reason": reason})
            return None
        body = opened.message.WhichOneof("body")
        if self.opener.take_changed():
            # A command's counter is fsynced before it runs, so a replay after a crash cannot run it
            # twice; for a receipt no fsync is needed (a replayed one deletes nothing not receipted).
            self._outbox.set_blob(STATE_KEY, self.opener.state(), durable=body == "command")
        if body == "command":
            outcome = commands.run(opened.message.command, controls, expired=opened.expired)
            result = "ok" if outcome.reply.ok else "error"
            self._metrics.commands.labels(kind=outcome.kind, outcome=result).inc()
            return outcome
        return self._apply(opened.message.receipt)

    def _apply(self, receipt: dpb.Receipt) -> Applied:
        outbox, m = self._outbox, self._metrics
        ids = outbox.ids_in(receipt_ranges(receipt))
        accepted = len(ids)
        rejected = 0
        for rejection in receipt.rejected:
            r = rejection.range
            gone = outbox.ids_in([(r.epoch, r.counter_first, r.counter_last)])
            if gone:
                name = reject_reason_name(rejection.reason)
                m.receipt_rejected.labels(reason=name).inc(len(gone))
                self._log.emit(f"rejected:{name}", "the gateway refused windows for good; deleting them",
                               {"reason": name, "count": len(gone)}, level=logging.ERROR)
                rejected += len(gone)
                ids += gone
        for message_id in ids:
            outbox.ack(message_id)
        outbox.commit_acks()
        m.receipts.inc()
        m.windows_receipted.inc(accepted)
        return Applied(ids, accepted, rejected)


class Unreceipted:
    """What this connection sent and no receipt has covered yet, oldest first, and the resend timer."""

    def __init__(self, timeout_s: float, max_entries: int = MAX_UNRECEIPTED) -> None:
        self._base = timeout_s
        self.timeout_s = timeout_s
        self._max = max_entries
        self._sent: dict[int, float] = {}  # outbox id -> monotonic send time, in send order

    def __len__(self) -> int:
        return len(self._sent)

    @property
    def room(self) -> int:
        return self._max - len(self._sent)

    def sent(self, message_id: int, now: float) -> None:
        self._sent.pop(message_id, None)
        self._sent[message_id] = now

    def settle(self, ids: Iterable[int]) -> None:
        for message_id in ids:
            self._sent.pop(message_id, None)
        self.timeout_s = self._base  # receipts flow: back to the configured timeout

    def resend_due(self, now: float) -> int:
        """When the oldest unreceipted message waited longer than the timeout: how many were waiting (the
        caller sends everything again from the oldest), and the next wait is twice as long if receipts
        still do not come. 0 while nothing is due."""
        if not self._sent or now - next(iter(self._sent.values())) < self.timeout_s:
            return 0
        count = len(self._sent)
        self._sent.clear()
        self.timeout_s = min(self.timeout_s * 2, max(MAX_RESEND_S, self._base))
        return count
