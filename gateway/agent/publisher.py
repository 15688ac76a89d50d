"""What the agent may publish next and what each PUBACK means, sans-IO (in the manner of aiomqtt's client
driven by one loop, with the state machine kept out of the IO): no asyncio, no sockets, times passed in.

The service's pump (gateway/agent/service.py) asks `room(now)` which outbox rows may go, `admit`s each
(the epoch fence, then pacing), reports `sent(mid, row, now)`, and hands every PUBACK to `on_puback`;
this class keeps the in-flight rows, the resend timer of unreceipted messages and the 0x10 ("no matching
subscribers") retry state. Rules, each the reason for a branch:

- **Epoch fence.** Messages of an older session are never in flight together with newer ones, so a
  retry of an old one cannot land after the gateway moved to the newer epoch (it would be a stale
  session there).
- **Receive maximum.** At most `window` unacknowledged publishes (the broker's receive maximum, capped
  by the agent's own limit); with receipts also at most what the unreceipted tracker holds.
- **0x10.** The broker accepted the message but nobody got it (gateway down or not resubscribed): such
  messages stay in the outbox; once nothing is in flight the pump waits a backoff delay (`backing_off`)
  and replays from the oldest (`retry`).
- **Receipts.** With `receipt_timeout_s`, a PUBACK deletes nothing: the outbox keeps a message until a
  receipt covers it (`settle`), and when the oldest has waited too long everything unreceipted goes
  again from the oldest (the gateway answers what it has with a fresh receipt, not a second result).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.agent.outbox import Row
from gateway.agent.receipts import Unreceipted
from gateway.core.ratelimit import TokenBuckets


@dataclass(frozen=True, slots=True)
class InFlight:
    outbox_id: int
    created_ns: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Room:
    after_id: int  # ask the outbox for rows with a larger id ...
    count: int  # ... at most this many (0: nothing may go now)
    resend: int  # > 0: the receipt timeout fired, this many unreceipted messages go again


class Admit(enum.Enum):
    SEND = "send"
    FENCE = "fence"  # an older session's messages are still in flight: stop this round
    PACED = "paced"  # the publish rate is used up: stop, come back after 1 / rate


class Delivery(enum.Enum):
    UNKNOWN = "unknown"  # not a mid of ours (an earlier connection's, or a duplicate)
    DELIVERED = "delivered"  # the broker has it: delete it now, or wait for its receipt
    UNHEARD = "unheard"  # 0x10: kept, replayed after a backoff
    REFUSED = "refused"  # the broker refused it (not authorised ...): keep it, drop the connection


@dataclass(frozen=True, slots=True)
class Acked:
    outcome: Delivery
    row: InFlight | None = None
    delete: bool = False  # the outbox may delete row.outbox_id now (PUBACK mode, no receipts)


class Publisher:
    def __init__(self, *, window: int, receipt_timeout_s: float | None, rate: float, burst: int) -> None:
        self.window = max(1, window)
        self.inflight: dict[int, InFlight] = {}
        self.waiting = Unreceipted(receipt_timeout_s) if receipt_timeout_s is not None else None
        self.rate = rate
        self._pace = TokenBuckets(rate, burst, 1) if rate > 0 else None
        self.last_id = 0  # the newest outbox id sent on this connection's current pass
        self.unheard = 0  # messages of this pass PUBACKed with 0x10

    @property
    def backing_off(self) -> bool:
        """Every publish of the pass is answered and some reached no subscriber: wait, then `retry`."""
        return self.unheard > 0 and not self.inflight

    def retry(self) -> None:
        self.unheard, self.last_id = 0, 0

    def room(self, now: float) -> Room:
        """Which rows may be published now (monotonic `now`, seconds)."""
        free = self.window - len(self.inflight)
        resend = 0
        if self.waiting is not None:
            resend = self.waiting.resend_due(now)
            if resend:
                self.last_id = 0  # everything unreceipted again, oldest first
            free = min(free, self.waiting.room)
        if self.unheard:
            free = 0  # finish the pass, back off, then replay from the oldest
        return Room(self.last_id, max(0, free), resend)

    def admit(self, row: Row, now_ns: int) -> Admit:
        if self.inflight and next(iter(self.inflight.values())).epoch != row.epoch:
            return Admit.FENCE
        if self._pace is not None and not self._pace.allow("", now_ns):
            return Admit.PACED
        return Admit.SEND

    def sent(self, mid: int, row: Row, now: float) -> None:
        self.inflight[mid] = InFlight(row.id, row.created_ns, row.epoch)
        if self.waiting is not None:
            self.waiting.sent(row.id, now)
        self.last_id = row.id

    def on_puback(self, mid: int, *, ok: bool, unheard: bool) -> Acked:
        row = self.inflight.pop(mid, None)
        if row is None:
            return Acked(Delivery.UNKNOWN)
        if unheard:
            self.unheard += 1
            return Acked(Delivery.UNHEARD, row)
        if not ok:
            return Acked(Delivery.REFUSED, row)
        return Acked(Delivery.DELIVERED, row, delete=self.waiting is None)

    def settle(self, outbox_ids: Iterable[int]) -> None:
        """A receipt covered these: they are no longer waiting (the outbox deletes them)."""
        if self.waiting is not None:
            self.waiting.settle(outbox_ids)

    @property
    def unreceipted(self) -> int | None:
        return None if self.waiting is None else len(self.waiting)
