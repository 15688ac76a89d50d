"""The result flow (gateway/core/result_flow.py) without paho or a store: hypothesis drives it through any
order of stored batches, hand-overs that succeed or are refused, PUBACKs (right, unknown, and QoS 0
completions on a wrapped mid), deferred rounds and reconnects, and checks after every step:

- never more than `max_unconfirmed` handed over without a PUBACK;
- every stored batch is in exactly one place: handed, waiting in the store, or confirmed; none is
  confirmed twice or lost;
- waiting batches go out oldest first, and a new one never overtakes a waiting one;
- a QoS 0 completion never confirms a result; an ack tag of an earlier connection is never ackable.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.result_flow import MID_MASK, ResultFlow


def test_tags_of_an_earlier_connection_are_void() -> None:
    flow = ResultFlow()
    tag = flow.tag(7)
    assert flow.ackable(tag) == 7
    flow.connected()
    assert flow.ackable(tag) is None and flow.ackable(flow.tag(7)) == 7


def test_a_wrapped_qos0_mid_does_not_confirm_a_result() -> None:
    flow = ResultFlow()
    assert flow.stored(1)
    flow.handed(1, 5)
    flow.qos0_sent(5)
    assert flow.on_publish(5) is None and 5 in flow.awaiting  # the QoS 0 completion
    assert flow.on_publish(5) == 1  # the real PUBACK


_steps = st.lists(st.one_of(
    st.tuples(st.just("store"), st.booleans()),  # a batch is durable; True: the client takes it
    st.tuples(st.just("puback"), st.integers(0, 50)),
    st.tuples(st.just("qos0")),
    st.tuples(st.just("deferred"), st.booleans()),  # a round of waiting batches; False: client refuses
    st.tuples(st.just("connect")),
), max_size=120)


@settings(max_examples=300, deadline=None)
@given(_steps, st.integers(1, 4))
def test_any_order_keeps_the_bound_the_order_and_every_batch(steps: list[tuple], bound: int) -> None:
    flow = ResultFlow(max_unconfirmed=bound)
    next_id, next_mid = 1, 1
    stored: list[int] = []
    confirmed: list[int] = []
    handed_order: list[int] = []  # pending ids in the order they were handed over

    def hand(pending_id: int, ok: bool) -> bool:
        nonlocal next_mid
        if not ok:
            flow.refused(pending_id)
            return False
        flow.handed(pending_id, next_mid)
        next_mid = (next_mid % MID_MASK) + 1
        handed_order.append(pending_id)
        return True

    for step in steps:
        kind = step[0]
        if kind == "store":
            pid = next_id
            next_id += 1
            stored.append(pid)
            if flow.stored(pid):
                hand(pid, step[1])
        elif kind == "puback":
            mids = sorted(flow.awaiting)
            mid = mids[step[1] % len(mids)] if mids and step[1] < 40 else 60_000 + step[1]
            got = flow.on_publish(mid)
            if got is not None:
                assert got not in confirmed, "confirmed twice"
                confirmed.append(got)
        elif kind == "qos0":
            flow.qos0_sent(next_mid)  # a QoS 0 publish takes the next mid ...
            before = dict(flow.awaiting)
            assert flow.on_publish(next_mid) is None  # ... and its completion confirms nothing
            assert flow.awaiting == before
            next_mid = (next_mid % MID_MASK) + 1
        elif kind == "deferred":
            flow.retry()
            while (pid := flow.next_deferred()) is not None:
                if not hand(pid, step[1]):
                    break
        elif kind == "connect":
            flow.connected()
        # Always:
        assert len(flow.awaiting) <= bound
        places = list(flow.awaiting.values()) + list(flow.deferred) + confirmed
        assert sorted(places) == stored, "a batch was lost or is in two places"
        assert list(flow.deferred) == sorted(flow.deferred), "waiting batches out of order"
    firsts = list(dict.fromkeys(handed_order))  # each batch's first hand-over, in time order
    assert firsts == sorted(firsts), "a newer batch went out before an older one"
