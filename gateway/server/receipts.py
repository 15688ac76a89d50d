"""The gateway's receipt sender: pipeline outcomes in, sealed receipts out on sgw/v1/dev/{id}/cmd.

The bookkeeping (what is owed, when it may be said) is the pure `core.receipts.ReceiptBook`; this module
seals each due receipt to the key the device used (`core.downlink.DownlinkSealer`) and returns it from
`flush` for the shell to publish (QoS 0: a lost receipt only makes the device resend, and the resend is
answered with a fresh receipt). It never calls into the shell.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.common.logs import RateLimitedLog
from gateway.core.downlink import DownlinkSealer, make_receipt
from gateway.core.pipeline import Accepted, Item, Rejected
from gateway.core.reasons import Reason
from gateway.core.receipts import ReceiptBook
from gateway.core.session import KeyLookup
from gateway.core.topics import cmd_topic_for
from gateway.errors import LocalError
from gateway.pb import downlink_pb2 as dpb

log = logging.getLogger("sgw.gateway.receipts")

# What a final refusal tells the device (only refusals after which the gateway will never accept that
# counter: the device deletes the window and counts it under this reason).
REJECT_REASONS: dict[Reason, int] = {
    Reason.DECODE_ERROR: dpb.REJECT_REASON_MALFORMED,
    Reason.MALFORMED: dpb.REJECT_REASON_MALFORMED,
    Reason.CLOCK_SKEW: dpb.REJECT_REASON_CLOCK_SKEW,
    Reason.UNROUTABLE: dpb.REJECT_REASON_UNROUTABLE,
    Reason.OVERLOADED: dpb.REJECT_REASON_OVERLOADED,
    Reason.STALE_SESSION: dpb.REJECT_REASON_STALE,
    Reason.REPLAY: dpb.REJECT_REASON_STALE,  # too old for the window: it can never be accepted now
}


@dataclass
class ReceiptStats:
    sent: int = 0
    accepted: int = 0  # windows (and statuses) receipted as accepted
    rejected: int = 0  # windows receipted as refused for good
    unsealable: int = 0  # a due receipt for a device that is unknown, revoked or lost that key


class Receipts:
    def __init__(self, *, sealer: DownlinkSealer, lookup: KeyLookup, book: ReceiptBook | None = None) -> None:
        self.book = book or ReceiptBook()
        self.stats = ReceiptStats()
        self._sealer = sealer
        self._lookup = lookup
        self._log = RateLimitedLog(log, interval_s=10.0)

    # -- outcomes from the shell ------------------------------------------------------------------------
    def on_accepted(self, ev: Accepted, now_ns: int) -> None:
        if ev.receipt is not None:  # a status: final once accepted
            epoch, counter, key_id = ev.receipt
            self.book.accepted(ev.device_id, epoch, counter, key_id, now_ns)
        elif ev.queued:
            self.book.queued(ev.device_id)

    def on_rejected(self, ev: Rejected, now_ns: int) -> None:
        if ev.receipt is None or ev.device_id is None:
            return  # no authenticated outcome: the device resends it (rate limited, unknown, bad_auth ...)
        epoch, counter, key_id = ev.receipt
        if ev.seen:
            self.book.resent(ev.device_id, epoch, counter, key_id, now_ns)
            return
        why = REJECT_REASONS.get(ev.reason)
        if why is not None:
            self.book.rejected(ev.device_id, epoch, counter, key_id, reason=why, now_ns=now_ns)

    def on_committed(self, items: list[Item], now_ns: int) -> None:
        """The batch is in the store (results and replay state): every item is done, kept or late."""
        book = self.book
        for it in items:
            book.accepted(it.device_id, it.epoch, it.counter, it.key_id, now_ns)
            book.done(it.device_id)

    # -- sending ------------------------------------------------------------------------------------------
    def flush(self, now_ns: int) -> list[tuple[str, bytes]]:
        """The receipts due now, sealed: (topic, payload) for the shell to publish at QoS 0."""
        out: list[tuple[str, bytes]] = []
        for due in self.book.due(now_ns):
            record = self._lookup(due.device_id)
            entry = record.keys.get(due.key_id) if record is not None and record.status == "active" else None
            if entry is None:
                self.stats.unsealable += 1
                continue
            try:
                rejected = [(r, dpb.RejectReason.ValueType(why)) for r, why in due.rejected]
                payload = self._sealer.seal(make_receipt(due.accepted, rejected), device_id=due.device_id,
                                            device_public=entry.public, device_key_id=due.key_id)
            except LocalError as exc:
                self.stats.unsealable += 1
                self._log.emit(f"seal:{due.device_id}", "cannot seal a receipt",
                               {"device": due.device_id, "error": str(exc)})
                continue
            out.append((cmd_topic_for(due.device_id), payload))
            self.stats.sent += 1
            self.stats.accepted += sum(last - first + 1 for _e, first, last in due.accepted)
            self.stats.rejected += sum(last - first + 1 for (_e, first, last), _w in due.rejected)
        return out
