"""Sets of (epoch, counter) pairs as compact inclusive ranges: what a receipt says the gateway accepted.

A receipt names what the gateway committed for one device; counters mostly arrive in runs, so a run is
one (epoch, first, last) triple. Canonical form: sorted by (epoch, first), no two ranges overlapping or
touching, so equal sets have equal encodings and membership is a binary search.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence

from gateway.errors import LocalError

MAX_RANGES = 256  # per receipt: about 7.7 KB at worst, well under the downlink's message bound
_MAX_U64 = (1 << 64) - 1

Range = tuple[int, int, int]  # (epoch, counter_first, counter_last), inclusive
Pair = tuple[int, int]  # (epoch, counter)


def compact(pairs: Iterable[Pair], max_ranges: int = MAX_RANGES) -> tuple[list[Range], list[Pair]]:
    """The canonical ranges of the lowest pairs, at most `max_ranges` of them, and the (sorted) pairs that
    did not fit, for the next receipt. Duplicates collapse."""
    if max_ranges < 1:
        raise LocalError("max_ranges must be at least 1")
    ordered = sorted(set(pairs))
    out: list[Range] = []
    for i, (epoch, counter) in enumerate(ordered):
        if out and out[-1][0] == epoch and out[-1][2] + 1 == counter:
            out[-1] = (epoch, out[-1][1], counter)
        elif len(out) == max_ranges:
            return out, ordered[i:]
        else:
            out.append((epoch, counter, counter))
    return out, []


def is_canonical(ranges: Sequence[Range], max_ranges: int = MAX_RANGES) -> bool:
    """True for what `compact` makes: bounded count, u64 fields, first <= last, sorted, disjoint and
    not touching."""
    if len(ranges) > max_ranges:
        return False
    previous: Range | None = None
    for epoch, first, last in ranges:
        if not (0 <= first <= last <= _MAX_U64 and 0 <= epoch <= _MAX_U64):
            return False
        if previous is not None and (epoch, first) <= (previous[0], previous[2] + 1):
            return False
        previous = (epoch, first, last)
    return True


def contains(ranges: Sequence[Range], epoch: int, counter: int) -> bool:
    """Whether canonical `ranges` cover (epoch, counter). Binary search: O(log n) for each outbox entry."""
    if len(ranges) > MAX_RANGES:
        raise LocalError(f"at most {MAX_RANGES} ranges")
    i = bisect_right(ranges, (epoch, counter, _MAX_U64)) - 1
    if i < 0:
        return False
    r_epoch, first, last = ranges[i]
    return r_epoch == epoch and first <= counter <= last
