"""MicroBatcher: nothing lost or reordered, never over max_batch, nobody waits past max_wait."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.batcher import Batch, MicroBatcher

# (gap to the previous event in ns, key) for a stream of arrivals
events = st.lists(st.tuples(st.integers(0, 3_000), st.sampled_from("abc")), max_size=200)


def run(mb: MicroBatcher[str, int], stream: list[tuple[int, str]],
        honour_deadlines: bool) -> list[Batch[str, int]]:
    """Feed arrivals; when honouring deadlines, poll exactly at each deadline that falls before an arrival."""
    out: list[Batch[str, int]] = []
    now = 0
    for i, (gap, key) in enumerate(stream):
        arrival = now + gap
        while honour_deadlines and (d := mb.next_deadline_ns()) is not None and d <= arrival:
            out += mb.poll(d)
            assert (mb.next_deadline_ns() or d + 1) > d  # a poll at a deadline clears everything due
        now = arrival
        out += mb.add(key, i, now)
    return out + mb.drain()


@settings(max_examples=200, deadline=None)
@given(events, st.integers(1, 16), st.integers(0, 5_000), st.booleans())
def test_every_item_once_in_order_and_batches_bounded(stream, max_batch, max_wait, honour) -> None:
    mb: MicroBatcher[str, int] = MicroBatcher(max_batch, max_wait)
    batches = run(mb, stream, honour)
    assert all(1 <= len(b.items) <= max_batch for b in batches)
    for key in "abc":
        got = [i for b in batches if b.key == key for i in b.items]
        assert got == [i for i, (_, k) in enumerate(stream) if k == key]
    assert len(mb) == 0
    assert mb.next_deadline_ns() is None


@settings(max_examples=200, deadline=None)
@given(events, st.integers(1, 16), st.integers(0, 5_000))
def test_no_item_waits_longer_than_max_wait_when_polled_on_time(stream, max_batch, max_wait) -> None:
    mb: MicroBatcher[str, int] = MicroBatcher(max_batch, max_wait)
    for b in run(mb, stream, honour_deadlines=True):
        if b.reason != "drain":
            assert b.flushed_ns - b.opened_ns <= max_wait
        if b.reason == "deadline":
            assert b.flushed_ns - b.opened_ns >= max_wait  # never early: waiting is what fills batches


@settings(max_examples=100, deadline=None)
@given(events, st.integers(1, 16), st.integers(0, 5_000))
def test_matches_a_reference_model(stream, max_batch, max_wait) -> None:
    """A plain reimplementation of the rule; the batcher must agree on every flush and every deadline."""
    mb: MicroBatcher[str, int] = MicroBatcher(max_batch, max_wait)
    opened: dict[str, int] = {}
    count: dict[str, int] = {}
    now = 0
    for i, (gap, key) in enumerate(stream):
        now += gap
        expect = [k for k, t in opened.items() if now - t >= max_wait]
        for k in expect:
            del opened[k], count[k]
        if key not in opened:
            opened[key], count[key] = now, 0
        count[key] += 1
        if count[key] >= max_batch or now - opened[key] >= max_wait:
            expect.append(key)
            del opened[key], count[key]
        assert [b.key for b in mb.add(key, i, now)] == expect
        assert mb.next_deadline_ns() == (min(opened.values()) + max_wait if opened else None)


def test_full_flush_and_deadline_flush() -> None:
    mb: MicroBatcher[str, str] = MicroBatcher(max_batch=3, max_wait_ns=100)
    assert mb.add("m", "a", 0) == []
    assert mb.add("m", "b", 10) == []
    [full] = mb.add("m", "c", 20)
    assert (full.items, full.reason, full.opened_ns, full.flushed_ns) == (("a", "b", "c"), "full", 0, 20)
    mb.add("m", "d", 30)
    assert mb.next_deadline_ns() == 130
    assert mb.poll(129) == []
    [late] = mb.poll(130)
    assert (late.items, late.reason) == (("d",), "deadline")


def test_overdue_batch_flushes_before_the_new_item_joins() -> None:
    mb: MicroBatcher[str, int] = MicroBatcher(max_batch=8, max_wait_ns=100)
    mb.add("m", 1, 0)
    [old] = mb.add("m", 2, 500)
    assert old.items == (1,) and old.reason == "deadline"
    assert len(mb) == 1


def test_zero_wait_flushes_every_item_alone() -> None:
    mb: MicroBatcher[str, int] = MicroBatcher(max_batch=8, max_wait_ns=0)
    assert [b.items for b in mb.add("m", 1, 5)] == [(1,)]


def test_results_map_back_to_items() -> None:
    mb: MicroBatcher[str, str] = MicroBatcher(max_batch=2, max_wait_ns=10)
    mb.add("m", "w1", 0)
    [b] = mb.add("m", "w2", 1)
    assert b.pair(["healthy", "bearing"]) == [("w1", "healthy"), ("w2", "bearing")]
    with pytest.raises(ValueError, match="1 results for a batch of 2"):
        b.pair(["x"])


def test_keys_are_bounded() -> None:
    mb: MicroBatcher[int, int] = MicroBatcher(max_batch=4, max_wait_ns=10, max_keys=2)
    mb.add(1, 0, 0)
    mb.add(2, 0, 0)
    with pytest.raises(OverflowError):
        mb.add(3, 0, 0)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(0, 10)
    with pytest.raises(ValueError):
        MicroBatcher(1, -1)


def test_put_leaves_deadlines_to_poll() -> None:
    """`put` (the gateway's path): an overdue batch keeps filling until the caller polls; zero wait means
    "at the next poll", not "alone"."""
    mb: MicroBatcher[str, int] = MicroBatcher(max_batch=3, max_wait_ns=100)
    assert mb.put("m", 1, 0) is None
    assert mb.put("m", 2, 500) is None  # overdue, but only poll flushes on time
    full = mb.put("m", 3, 501)
    assert full is not None and (full.items, full.reason, full.opened_ns) == ((1, 2, 3), "full", 0)
    assert mb.put("m", 4, 600) is None and mb.next_deadline_ns() == 700
    assert mb.poll(699) == [] and [b.items for b in mb.poll(700)] == [(4,)]
    zero: MicroBatcher[str, int] = MicroBatcher(max_batch=8, max_wait_ns=0)
    assert zero.put("m", 1, 5) is None and zero.put("m", 2, 6) is None
    assert [b.items for b in zero.poll(6)] == [(1, 2)]


@settings(max_examples=100, deadline=None)
@given(events, st.integers(1, 16), st.integers(0, 5_000))
def test_add_after_put_and_poll_still_matches_add_alone(stream, max_batch, max_wait) -> None:
    """Mixing put/poll with add never leaves add's cached earliest deadline stale."""
    mixed: MicroBatcher[str, int] = MicroBatcher(max_batch, max_wait)
    ref: MicroBatcher[str, int] = MicroBatcher(max_batch, max_wait)
    now = 0
    for i, (gap, key) in enumerate(stream):
        now += gap
        if i % 3 == 0:
            got = mixed.poll(now)  # add() == poll, put, and a zero wait's flush of the new key
            if (b := mixed.put(key, i, now)) is not None:
                got.append(b)
            elif max_wait == 0:
                got += mixed.poll(now)
            assert [x.items for x in got] == [x.items for x in ref.add(key, i, now)]
        else:
            assert [x.items for x in mixed.add(key, i, now)] == [x.items for x in ref.add(key, i, now)]
        assert mixed.next_deadline_ns() == ref.next_deadline_ns()
