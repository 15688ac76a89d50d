"""Micro-batching per model: flush at max_batch items or max_wait after the first, whichever comes first.

Pure: the caller passes `now_ns` and asks `next_deadline_ns()` when to come back, so the policy is tested
without clocks. A batch keeps its items in arrival order; results of a batched call map back to them
position by position (`Batch.pair`).

Bounded: a key never holds max_batch items between calls (it flushes on reaching it), and at most
`max_keys` keys are open at once, so pending items never exceed max_keys * (max_batch - 1).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

FlushReason = Literal["full", "deadline", "drain"]

_NEVER = 2**63 - 1


@dataclass(frozen=True)
class Batch(Generic[K, T]):
    key: K
    items: tuple[T, ...]
    opened_ns: int   # arrival of the first item: how long the oldest item waited is flushed_ns - opened_ns
    flushed_ns: int  # the `now` of the call that flushed it (for "drain", the last time seen)
    reason: FlushReason

    def pair(self, results: Sequence[R]) -> list[tuple[T, R]]:
        """Each item with its result; a length mismatch is a bug in the model call, so it raises."""
        if len(results) != len(self.items):
            raise ValueError(f"{len(results)} results for a batch of {len(self.items)}")
        return list(zip(self.items, results, strict=True))


class MicroBatcher(Generic[K, T]):
    def __init__(self, max_batch: int, max_wait_ns: int, max_keys: int = 64) -> None:
        if max_batch < 1 or max_wait_ns < 0 or max_keys < 1:
            raise ValueError("max_batch and max_keys must be >= 1 and max_wait_ns >= 0")
        self.max_batch = max_batch
        self.max_wait_ns = max_wait_ns
        self.max_keys = max_keys
        self._open: dict[K, tuple[int, list[T]]] = {}  # key -> (opened_ns, items); insertion = age order
        self._last_ns = 0
        self._due_ns = _NEVER  # <= next_deadline_ns() (a lower bound): add() polls only once it has passed

    def __len__(self) -> int:
        return sum(len(items) for _, items in self._open.values())

    def add(self, key: K, item: T, now_ns: int) -> list[Batch[K, T]]:
        """Queue one item; returns every batch that is due now (overdue ones first, then a full one)."""
        out = self.poll(now_ns) if now_ns >= self._due_ns else []
        full = self.put(key, item, now_ns)
        if full is not None:
            out.append(full)
        elif now_ns - self._open[key][0] >= self.max_wait_ns:
            out.append(self._flush(key, now_ns, "deadline"))
        return out

    def put(self, key: K, item: T, now_ns: int) -> Batch[K, T] | None:
        """Queue one item and flush its key only when full; deadlines are left to `poll`.

        For a caller that polls on its own schedule (the gateway polls after each socket read): a batch
        that went overdue while more items were arriving keeps filling up to max_batch until that poll,
        instead of leaving as a fragment, and max_wait_ns = 0 means "every poll" rather than "alone".
        """
        if now_ns > self._last_ns:  # noqa: PLR1730 - per message: max() is a call
            self._last_ns = now_ns
        entry = self._open.get(key)
        if entry is None:
            if len(self._open) >= self.max_keys:
                raise OverflowError(f"more than {self.max_keys} batch keys open at once")
            entry = self._open[key] = (now_ns, [])
            self._due_ns = min(self._due_ns, now_ns + self.max_wait_ns)
        items = entry[1]
        items.append(item)
        if len(items) >= self.max_batch:
            return self._flush(key, now_ns, "full")
        return None

    def poll(self, now_ns: int) -> list[Batch[K, T]]:
        """Flush every key whose first item has waited max_wait_ns; call at next_deadline_ns()."""
        self._last_ns = max(self._last_ns, now_ns)
        due = [k for k, (opened, _) in self._open.items() if now_ns - opened >= self.max_wait_ns]
        out = [self._flush(k, now_ns, "deadline") for k in due]
        due_ns = self.next_deadline_ns()
        self._due_ns = _NEVER if due_ns is None else due_ns
        return out

    def next_deadline_ns(self) -> int | None:
        if not self._open:
            return None
        return min(opened for opened, _ in self._open.values()) + self.max_wait_ns

    def drain(self) -> list[Batch[K, T]]:
        """Everything still queued, oldest key first: for shutdown."""
        return [self._flush(k, self._last_ns, "drain") for k in list(self._open)]

    def _flush(self, key: K, now_ns: int, reason: FlushReason) -> Batch[K, T]:
        opened, items = self._open.pop(key)
        self._last_ns = max(self._last_ns, now_ns)
        return Batch(key, tuple(items), opened, now_ns, reason)
