"""What the gateway owes each device in receipts (docs/PROTOCOL.md, "Receipts"): sans-IO, time passed in.

The shell reports outcomes; `due(now)` hands back, per device, compact ranges to seal into one Receipt.
The rules that make "a device deletes a window only on a receipt" safe:

- `accepted` only after the window's batch is committed (results and replay state in the store), or for
  a status (done once accepted);
- a resend of something the gateway processed before (`resent`: the replay window holds that exact
  counter) is receipted as accepted only once nothing of that device is in flight, because the original
  may still be in a batch that is not committed yet (a crash then would lose it);
- `rejected` only for a final refusal (authenticated and then refused, or a counter the gateway can
  never accept again): the device deletes the window and counts it;
- anything else (rate limited, overloaded before opening, unknown, bad_auth) gets no receipt, so the
  device resends it later.

Bounds: pairs per device, devices pending, one receipt per device per `min_interval_ns`, and ranges
per receipt (`ranges.MAX_RANGES`, the rest waits for the next one). Past a bound an outcome is dropped
and counted: the device then resends, which is slower but never loses anything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gateway.core import ranges

Pair = tuple[int, int]


@dataclass(slots=True)
class _Owed:
    key_id: int
    since_ns: int
    accepted: set[Pair] = field(default_factory=set)
    rejected: dict[Pair, int] = field(default_factory=dict)  # -> RejectReason value
    held: set[Pair] = field(default_factory=set)  # resends waiting for the device's in-flight to clear


@dataclass(frozen=True, slots=True)
class Due:
    device_id: str
    key_id: int  # the device key the device used: the receipt is sealed to it
    accepted: list[ranges.Range]
    rejected: list[tuple[ranges.Range, int]]


class ReceiptBook:
    def __init__(self, *, max_devices: int = 8192, max_pairs: int = 4096,
                 min_interval_ns: int = 50_000_000, max_delay_ns: int = 20_000_000) -> None:
        self._max_devices = max(1, max_devices)
        self._max_pairs = max(1, max_pairs)
        self._interval = max(0, min_interval_ns)
        self._delay = max(0, max_delay_ns)
        self._owed: dict[str, _Owed] = {}
        self._inflight: Counter[str] = Counter()
        self._last_sent: dict[str, int] = {}
        self.dropped = 0  # outcomes not receipted because a bound was hit (the device resends)

    # -- outcomes ---------------------------------------------------------------------------------------
    def _entry(self, device_id: str, key_id: int, now_ns: int) -> _Owed | None:
        owed = self._owed.get(device_id)
        if owed is None:
            if len(self._owed) >= self._max_devices:
                self.dropped += 1
                return None
            owed = self._owed[device_id] = _Owed(key_id, now_ns)
        owed.key_id = key_id  # the newest key the device sealed with
        if len(owed.accepted) + len(owed.rejected) + len(owed.held) >= self._max_pairs:
            self.dropped += 1
            return None
        return owed

    def accepted(self, device_id: str, epoch: int, counter: int, key_id: int, now_ns: int) -> None:
        owed = self._entry(device_id, key_id, now_ns)
        if owed is not None:
            owed.accepted.add((epoch, counter))

    def rejected(self, device_id: str, epoch: int, counter: int, key_id: int, *, reason: int,
                 now_ns: int) -> None:
        owed = self._entry(device_id, key_id, now_ns)
        if owed is not None:
            owed.rejected[epoch, counter] = reason

    def resent(self, device_id: str, epoch: int, counter: int, key_id: int, now_ns: int) -> None:
        owed = self._entry(device_id, key_id, now_ns)
        if owed is None:
            return
        if self._inflight[device_id]:
            owed.held.add((epoch, counter))
        else:
            owed.accepted.add((epoch, counter))

    def queued(self, device_id: str) -> None:
        """One of the device's windows entered a batch (not committed yet)."""
        self._inflight[device_id] += 1

    def done(self, device_id: str) -> None:
        """One of the device's windows left its batch (committed, or refused at commit)."""
        left = self._inflight[device_id] - 1
        if left > 0:
            self._inflight[device_id] = left
            return
        del self._inflight[device_id]
        owed = self._owed.get(device_id)
        if owed is not None and owed.held:
            owed.accepted |= owed.held
            owed.held.clear()

    # -- what to send -----------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._owed)

    def due(self, now_ns: int) -> list[Due]:
        """Receipts to send now: each device at most once per min_interval, after max_delay of batching."""
        out: list[Due] = []
        for device_id, owed in list(self._owed.items()):
            if not owed.accepted and not owed.rejected:
                if not owed.held:
                    del self._owed[device_id]
                continue
            if now_ns - owed.since_ns < self._delay:
                continue
            if now_ns - self._last_sent.get(device_id, -self._interval) < self._interval:
                continue
            acc, acc_rest = ranges.compact(owed.accepted)
            by_reason: dict[int, set[Pair]] = {}
            for pair, why in owed.rejected.items():
                by_reason.setdefault(why, set()).add(pair)
            rej: list[tuple[ranges.Range, int]] = []  # its own bound: MAX_REJECTIONS = MAX_RANGES
            rej_rest: dict[Pair, int] = {}
            for why, pairs in sorted(by_reason.items()):
                room = ranges.MAX_RANGES - len(rej)
                got, rest = ranges.compact(pairs, room) if room > 0 else ([], list(pairs))
                rej += [(r, why) for r in got]
                rej_rest.update(dict.fromkeys(rest, why))
            owed.accepted = set(acc_rest)
            owed.rejected = rej_rest
            owed.since_ns = now_ns
            self._last_sent[device_id] = now_ns
            if len(self._last_sent) > 2 * self._max_devices:  # forget the longest-quiet devices
                for old in list(self._last_sent)[: self._max_devices]:
                    del self._last_sent[old]
            out.append(Due(device_id, owed.key_id, acc, rej))
        return out
