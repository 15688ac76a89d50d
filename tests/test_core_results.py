"""The hand framing of a ResultBatch is protobuf's own: the same bytes as SerializeToString, parsed back
whole, for any gateway id and any results (hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.results import result_batch
from gateway.pb import messages_pb2 as pb

_results = st.builds(
    pb.InferenceResult,
    device_id=st.text(alphabet="abcdefghij-0123456789", max_size=64),
    window_seq=st.integers(0, 2**64 - 1), epoch=st.integers(0, 2**64 - 1), counter=st.integers(0, 2**64 - 1),
    label=st.text(max_size=20), scores=st.lists(st.floats(width=32, allow_nan=False), max_size=8),
    confidence=st.floats(width=32, allow_nan=False), gap=st.booleans(),
)


@given(st.text(max_size=48), st.lists(_results, max_size=70))
def test_framing_equals_protobufs_own(gateway_id: str, results: list[pb.InferenceResult]) -> None:
    want = pb.ResultBatch(gateway_id=gateway_id, results=results).SerializeToString()
    got = result_batch(gateway_id, [r.SerializeToString() for r in results])
    assert got == want
    back = pb.ResultBatch.FromString(got)
    assert back.gateway_id == gateway_id and list(back.results) == results
