"""The agent's sans-IO Publisher (gateway/agent/publisher.py), with no broker and no loop: its rules one by
one, then hypothesis drives it through arbitrary orders of publishes, PUBACKs (delivered, 0x10,
unknown mids), receipts and clock steps against a model of the outbox, and checks what must always hold:

- never more in flight than the window, never two sessions (epochs) in flight at once;
- in PUBACK mode a row is deleted only after a PUBACK said delivered for it, and each at most once;
- with receipts a PUBACK deletes nothing (only a receipt does);
- after 0x10 nothing new goes until every publish is answered, then the pass starts over from the oldest.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.agent.outbox import Row
from gateway.agent.publisher import Admit, Delivery, Publisher


def _row(i: int, epoch: int = 1) -> Row:
    return Row(i, 1000 + i, epoch, i, b"m%d" % i)


def test_the_epoch_fence_and_the_window() -> None:
    pub = Publisher(window=2, receipt_timeout_s=None, rate=0, burst=0)
    assert pub.room(0.0).count == 2
    pub.sent(1, _row(1, epoch=1), 0.0)
    assert pub.admit(_row(2, epoch=2), 0) is Admit.FENCE  # session 1 still in flight
    assert pub.admit(_row(2, epoch=1), 0) is Admit.SEND
    pub.sent(2, _row(2), 0.0)
    assert pub.room(0.0).count == 0
    acked = pub.on_puback(1, ok=True, unheard=False)
    assert acked.outcome is Delivery.DELIVERED and acked.delete and acked.row is not None
    assert acked.row.outbox_id == 1
    assert pub.on_puback(1, ok=True, unheard=False).outcome is Delivery.UNKNOWN  # a duplicate


def test_0x10_holds_the_pass_then_replays_from_the_oldest() -> None:
    pub = Publisher(window=8, receipt_timeout_s=None, rate=0, burst=0)
    for i in (1, 2):
        pub.sent(i, _row(i), 0.0)
    assert pub.on_puback(1, ok=True, unheard=True).outcome is Delivery.UNHEARD
    assert pub.room(0.0).count == 0 and not pub.backing_off  # 2 still in flight
    pub.on_puback(2, ok=True, unheard=False)
    assert pub.backing_off
    pub.retry()
    assert pub.room(0.0) == pub.room(0.0) and pub.room(0.0).after_id == 0 and pub.room(0.0).count == 8


def test_with_receipts_a_puback_deletes_nothing_and_the_timer_resends() -> None:
    pub = Publisher(window=8, receipt_timeout_s=30.0, rate=0, burst=0)
    pub.sent(1, _row(1), 0.0)
    pub.sent(2, _row(2), 0.0)
    assert not pub.on_puback(1, ok=True, unheard=False).delete
    pub.settle([1])
    room = pub.room(31.0)  # row 2 waited past the timeout
    assert room.resend == 1 and room.after_id == 0
    assert pub.on_puback(2, ok=False, unheard=False).outcome is Delivery.REFUSED


def test_pacing_stops_the_round() -> None:
    pub = Publisher(window=100, receipt_timeout_s=None, rate=10.0, burst=2)
    got = [pub.admit(_row(i), 0) for i in range(3)]
    assert got == [Admit.SEND, Admit.SEND, Admit.PACED]
    assert pub.admit(_row(3), 10**9) is Admit.SEND  # a second later the bucket has refilled


_steps = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 6)),
    st.tuples(st.just("puback"), st.integers(0, 40), st.sampled_from(["ok", "unheard", "unknown"])),
    st.tuples(st.just("receipt"), st.integers(0, 40)),
    st.tuples(st.just("tick"), st.floats(0.0, 20.0)),
    st.tuples(st.just("session")),
    st.tuples(st.just("backoff")),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(_steps, st.integers(1, 5), st.booleans())
def test_any_order_of_events_keeps_the_rules(steps: list[tuple], window: int, receipts: bool) -> None:
    pub = Publisher(window=window, receipt_timeout_s=10.0 if receipts else None, rate=0, burst=0)
    outbox: dict[int, Row] = {}  # what is stored, by id
    delivered: set[int] = set()  # outbox ids a PUBACK said delivered
    deleted: list[int] = []
    next_id, epoch, mid, now = 1, 1, 0, 0.0
    mids: dict[int, int] = {}  # mid -> outbox id
    for step in steps:
        kind = step[0]
        if kind == "session":
            epoch += 1
        elif kind == "tick":
            now += step[1]
        elif kind == "backoff" and pub.backing_off:
            pub.retry()
        elif kind == "publish":
            for _ in range(step[1]):
                outbox[next_id] = _row(next_id, epoch)
                next_id += 1
            room = pub.room(now)
            rows = [outbox[i] for i in sorted(outbox) if i > room.after_id][:room.count]
            for row in rows:
                if pub.admit(row, 0) is not Admit.SEND:
                    break
                mid += 1
                pub.sent(mid, row, now)
                mids[mid] = row.id
        elif kind == "puback":
            target = step[1] if step[2] == "unknown" else (sorted(pub.inflight)[step[1] % len(pub.inflight)]
                                                          if pub.inflight else 999_999)
            acked = pub.on_puback(target, ok=True, unheard=step[2] == "unheard")
            if step[2] == "unknown" and target not in mids:
                assert acked.outcome is Delivery.UNKNOWN
            if acked.outcome is Delivery.DELIVERED:
                assert acked.row is not None
                delivered.add(acked.row.outbox_id)
                assert acked.delete == (not receipts)  # with receipts only a receipt deletes
                if acked.delete:
                    assert acked.row.outbox_id in outbox, "deleted twice"
                    deleted.append(acked.row.outbox_id)
                    del outbox[acked.row.outbox_id]
        elif kind == "receipt" and receipts and outbox:
            rid = sorted(outbox)[step[1] % len(outbox)]
            pub.settle([rid])
        # Always:
        assert len(pub.inflight) <= pub.window
        assert len({f.epoch for f in pub.inflight.values()}) <= 1, "two sessions in flight"
        if pub.unheard:
            assert pub.room(now).count == 0
    assert set(deleted) <= delivered and len(deleted) == len(set(deleted))
