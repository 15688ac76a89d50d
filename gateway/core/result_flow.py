"""Stored result batches on their way to the broker, and the ack tags of each connection: sans-IO.

The MQTT shell (gateway/server/shell.py) does the IO (paho publishes and acks, payloads read back from
the store); this class decides, in the manner of h11's connection state kept apart from the socket:

- **Unconfirmed bound.** At most `max_unconfirmed` result batches handed to the client without a PUBACK
  (paho holds their payloads). A batch stored beyond that waits in the store, by id only, and goes
  oldest first as PUBACKs make room: memory stays bounded however slowly the broker confirms, and input
  acks never wait for it (their PUBACKs arrive behind the backlog on the read side).
- **Order.** Once anything waits in the store, a new batch queues behind it.
- **A refused hand-over** (the client could not take it) goes back to the front, and waiting batches are
  retried after a pause rather than in a tight loop.
- **QoS 0 mids.** paho numbers QoS 0 publishes from the same 16-bit counter and reports them through
  on_publish too: such a mid that wrapped onto a result still awaiting its PUBACK must not confirm it.
- **Ack tags.** Packet ids are per connection: a tag packs the connection generation with the mid, and a
  tag from an earlier connection is never acked (the broker redelivers that input; it is a replay).
"""

from __future__ import annotations

from collections import deque

MAX_UNCONFIRMED = 1024
MID_BITS = 16
MID_MASK = (1 << MID_BITS) - 1


class ResultFlow:
    def __init__(self, max_unconfirmed: int = MAX_UNCONFIRMED) -> None:
        self.max_unconfirmed = max_unconfirmed
        self.awaiting: dict[int, int] = {}  # mid -> pending id, handed to the client, no PUBACK yet
        self.deferred: deque[int] = deque()  # pending ids waiting in the store, oldest first
        self.hand_failed = False  # the last hand-over was refused: retry the waiting ones after a pause
        self.generation = 1
        self._qos0: set[int] = set()

    # -- connections and ack tags -------------------------------------------------------------------

    def connected(self) -> None:
        """A new connection: earlier tags are void; QoS 0 messages queued before were discarded."""
        self.generation += 1
        self._qos0.clear()

    def tag(self, mid: int) -> int:
        return (self.generation << MID_BITS) | mid

    def ackable(self, tag: int) -> int | None:
        """The packet id to ack for `tag`, or None when it belongs to an earlier connection."""
        return tag & MID_MASK if tag >> MID_BITS == self.generation else None

    # -- result batches -----------------------------------------------------------------------------

    @property
    def has_room(self) -> bool:
        return len(self.awaiting) < self.max_unconfirmed

    def stored(self, pending_id: int) -> bool:
        """A batch is durable in the store: True to hand it to the client now (then `handed` or
        `refused`), False when it waits in the store behind others or for room."""
        if self.deferred or not self.has_room:
            self.deferred.append(pending_id)
            return False
        return True

    def handed(self, pending_id: int, mid: int) -> None:
        self.awaiting[mid] = pending_id

    def refused(self, pending_id: int) -> None:
        self.deferred.appendleft(pending_id)
        self.hand_failed = True

    @property
    def can_send_deferred(self) -> bool:
        return bool(self.deferred) and self.has_room and not self.hand_failed

    def next_deferred(self) -> int | None:
        """The oldest waiting batch to hand over now, or None (nothing waits, or no room)."""
        if not self.deferred or not self.has_room:
            return None
        return self.deferred.popleft()

    def retry(self) -> None:
        """After the pause: hand waiting batches over again."""
        self.hand_failed = False

    def qos0_sent(self, mid: int) -> None:
        self._qos0.add(mid)

    def on_publish(self, mid: int) -> int | None:
        """A PUBACK (or a QoS 0 completion): the pending id it confirms, if any."""
        if self._qos0 and mid in self._qos0:
            self._qos0.discard(mid)
            return None
        return self.awaiting.pop(mid, None)
