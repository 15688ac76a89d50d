"""ReplayWindow against a reference model, shuffled delivery through the Opener, persistence."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import keys
from gateway.core.reasons import Reason
from gateway.core.replay import MIN_WIDTH, ReplayWindow
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Rejected, Sealer
from gateway.errors import LocalError

NOW = 1_800_000_000_000_000_000
GW = keys.private_from_bytes(bytes(range(32)))
DEV = keys.private_from_bytes(bytes(range(32, 64)))
W = MIN_WIDTH


class Model:
    """The obvious, slow definition the bitmap must agree with."""

    def __init__(self, width: int) -> None:
        self.width, self.epoch, self.seen = width, -1, set[int]()

    def offer(self, epoch: int, counter: int) -> Reason | None:
        if epoch < self.epoch:
            return Reason.STALE_SESSION
        if epoch > self.epoch:
            self.epoch, self.seen = epoch, {counter}
            return None
        top = max(self.seen)
        if counter in self.seen or counter <= top - self.width:
            return Reason.REPLAY
        self.seen.add(counter)
        return None


def offer(w: ReplayWindow, epoch: int, counter: int) -> Reason | None:
    verdict = w.check(epoch, counter)
    if verdict is None:
        w.commit(epoch, counter)
    return verdict


events = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3 * W)) | st.tuples(st.just(2), st.integers(0, 40))
    | st.tuples(st.just(3), st.integers(0, 40 * W)),
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(events)
def test_window_matches_reference_model(seq: list[tuple[int, int]]) -> None:
    w, m = ReplayWindow(W), Model(W)
    for epoch, counter in seq:
        assert offer(w, epoch, counter) == m.offer(epoch, counter), (epoch, counter)
    assert ReplayWindow.from_bytes(w.to_bytes()).to_bytes() == w.to_bytes()


def test_window_edges() -> None:
    w = ReplayWindow(W)
    assert offer(w, 0, 5000) is None
    assert offer(w, 0, 5000) is Reason.REPLAY
    assert offer(w, 0, 5000 - W) is Reason.REPLAY       # just outside the window
    assert offer(w, 0, 5000 - W + 1) is None            # oldest slot inside it, once
    assert offer(w, 0, 5000 - W + 1) is Reason.REPLAY
    assert offer(w, 0, 5000 + 10 * W) is None           # a jump further than the width clears the map
    assert offer(w, 0, 5000 + 10 * W - 1) is None
    assert offer(w, 1, 0) is None                       # new epoch: counters restart
    assert offer(w, 0, 1 << 40) is Reason.STALE_SESSION
    with pytest.raises(LocalError):
        w.commit(0, 1)


def test_commit_older_than_window_is_refused_not_a_huge_shift() -> None:
    w = ReplayWindow(W)
    w.commit(0, 1 << 60)
    with pytest.raises(LocalError):
        w.commit(0, 0)


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 300))
def test_shuffled_delivery_inside_window_accepts_each_exactly_once(rnd: random.Random, n: int) -> None:
    reg = {"dev-1": DeviceKeys("active", {1: KeyEntry(keys.public_bytes(DEV))})}
    o = Opener(gateway_keys={1: GW}, lookup=reg.get, window_bits=W)
    s = Sealer(device_id="dev-1", device_key=DEV, device_key_id=1, gateway_public=keys.public_bytes(GW),
               gateway_key_id=1, epoch=1)
    sent = [s.seal(i.to_bytes(4, "big")) for i in range(n)]
    deliveries = sent + rnd.sample(sent, k=min(n, 50))  # shuffled, with duplicates mixed in
    rnd.shuffle(deliveries)
    accepted: list[int] = []
    for raw in deliveries:
        got = o.open(raw, NOW)
        if isinstance(got, Opened):
            accepted.append(got.counter)
        else:
            # a duplicate: refused as a replay, and marked as seen (so the gateway can receipt the resend)
            assert isinstance(got, Rejected)
            assert (got.reason, got.device_id, got.seen) == (Reason.REPLAY, "dev-1", True)
    assert sorted(accepted) == list(range(n))


def test_state_survives_restart_through_bytes() -> None:
    reg = {"dev-1": DeviceKeys("active", {1: KeyEntry(keys.public_bytes(DEV))})}
    s = Sealer(device_id="dev-1", device_key=DEV, device_key_id=1, gateway_public=keys.public_bytes(GW),
               gateway_key_id=1, epoch=3)
    msgs = [s.seal(b"m") for _ in range(5)]
    o = Opener(gateway_keys={1: GW}, lookup=reg.get)
    for raw in (msgs[0], msgs[2]):
        assert isinstance(o.open(raw, NOW), Opened)
    state = o._windows["dev-1"].to_bytes()  # what the gateway's store persists for it
    # A restarted gateway with a wider window: the old messages stay rejected, the gap still opens once.
    o2 = Opener(gateway_keys={1: GW}, lookup=reg.get, window_bits=4096)
    o2.load_replay_state("dev-1", state)
    assert isinstance(o2.open(msgs[0], NOW), Rejected)
    assert isinstance(o2.open(msgs[2], NOW), Rejected)
    assert isinstance(o2.open(msgs[1], NOW), Opened)
    assert isinstance(o2.open(msgs[4], NOW), Opened)


def test_growing_marks_unknown_history_as_seen() -> None:
    w = ReplayWindow(W)
    offer(w, 0, 10 * W)
    wide = w.resized(4 * W)
    assert wide.check(0, 10 * W - W) is Reason.REPLAY      # forgotten by the old window: stays refused
    assert wide.check(0, 10 * W - 1) is None               # known free slot stays free
    narrow = wide.resized(W)
    assert narrow.check(0, 10 * W - 1) is None and narrow.check(0, 10 * W) is Reason.REPLAY


def test_fresh_window_round_trips() -> None:
    w = ReplayWindow.from_bytes(ReplayWindow(W).to_bytes())
    assert w.check(0, 0) is None and w.epoch == -1


@pytest.mark.parametrize("corrupt", [
    lambda b: b[:-1], lambda b: b + b"\x00", lambda b: b"xxxx" + b[4:], lambda b: b[:4] + b"\x02" + b[5:],
    lambda b: b[:5] + b"\x03" + b[6:],                    # unknown flag
    lambda b: b[:-1] + bytes((b[-1] & 0xFE,)),            # top counter not marked as seen
    lambda b: b[:6] + (100).to_bytes(4, "big") + b[10:],  # impossible width
    lambda b: b"", lambda b: b * 40,
])
def test_corrupt_state_is_refused(corrupt: object) -> None:
    w = ReplayWindow(W)
    offer(w, 2, 7)
    good = w.to_bytes()
    assert ReplayWindow.from_bytes(good).to_bytes() == good
    with pytest.raises(LocalError):
        ReplayWindow.from_bytes(corrupt(good))  # type: ignore[operator]


def test_state_without_session_must_be_empty() -> None:
    empty = ReplayWindow(W).to_bytes()
    with pytest.raises(LocalError):
        ReplayWindow.from_bytes(empty[:-1] + b"\x01")


@pytest.mark.parametrize("width", [0, 64, 1000, MIN_WIDTH + 1, 1 << 20])
def test_width_is_validated(width: int) -> None:
    with pytest.raises(LocalError):
        ReplayWindow(width)
