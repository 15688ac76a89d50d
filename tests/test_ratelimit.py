"""Per-device token buckets: burst, refill, independence, clock steps, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.ratelimit import TokenBuckets
from gateway.errors import ConfigError

S = 1_000_000_000  # ns per second
T0 = 1_800_000_000 * S


def test_burst_then_refill_at_rate() -> None:
    tb = TokenBuckets(rate=10.0, burst=5, max_devices=10)
    assert [tb.allow("a", T0) for _ in range(6)] == [True] * 5 + [False]
    assert tb.allow("a", T0 + S // 20) is False       # half a token
    assert tb.allow("a", T0 + S // 10) is True        # one token after 100 ms
    assert tb.allow("a", T0 + S // 10) is False
    assert sum(tb.allow("a", T0 + 100 * S) for _ in range(10)) == 5  # refill caps at burst


def test_devices_are_independent() -> None:
    tb = TokenBuckets(rate=1.0, burst=1, max_devices=10)
    assert tb.allow("a", T0) and not tb.allow("a", T0)
    assert tb.allow("b", T0)


def test_clock_stepping_back_neither_refills_nor_breaks() -> None:
    tb = TokenBuckets(rate=1.0, burst=2, max_devices=10)
    assert tb.allow("a", T0) and tb.allow("a", T0)
    assert not tb.allow("a", T0 - 3600 * S)
    assert not tb.allow("a", T0 + S // 2)   # measured from the latest time seen, not the step back
    assert tb.allow("a", T0 + S)


def test_memory_is_bounded_and_lru_evicted() -> None:
    tb = TokenBuckets(rate=1.0, burst=1, max_devices=3)
    for d in ("a", "b", "c"):
        assert tb.allow(d, T0)
    assert not tb.allow("a", T0)  # touches "a": "b" is now the least recently used
    for i in range(100):
        tb.allow(f"flood-{i}", T0)
        assert len(tb) <= 3
    tb2 = TokenBuckets(rate=1.0, burst=1, max_devices=3)
    for d in ("a", "b", "c"):
        tb2.allow(d, T0)
    tb2.allow("a", T0)
    tb2.allow("d", T0)  # evicts "b", keeps the recently used "a" (still empty)
    assert not tb2.allow("a", T0)
    assert tb2.allow("b", T0)  # "b" was forgotten: a fresh, full bucket


def test_forget() -> None:
    tb = TokenBuckets(rate=1.0, burst=1, max_devices=3)
    tb.allow("a", T0)
    tb.forget("a")
    assert len(tb) == 0 and tb.allow("a", T0)


@pytest.mark.parametrize(("rate", "burst", "max_devices"), [(0, 1, 1), (-1, 1, 1), (1, 0.5, 1), (1, 1, 0),
                                                            (float("nan"), 1, 1)])
def test_bad_configuration(rate: float, burst: float, max_devices: int) -> None:
    with pytest.raises(ConfigError):
        TokenBuckets(rate, burst, max_devices)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.5, 1000), burst=st.integers(1, 50),
       gaps=st.lists(st.integers(0, 2 * S), min_size=1, max_size=200))
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int, gaps: list[int]) -> None:
    tb = TokenBuckets(rate, burst, max_devices=4)
    now, allowed = T0, 0
    for gap in gaps:
        now += gap
        allowed += tb.allow("a", now)
    assert allowed <= burst + rate * (now - T0) / S + 1e-6
    # and it is not stingy: after a long rest a full burst is available again
    assert sum(tb.allow("a", now + int(burst / rate * S) + S) for _ in range(burst)) == burst
