"""One `sgw.v1.ResultBatch` from its serialized `InferenceResult`s, pure.

The shell encodes one result per window before the batch transaction; the result store then frames the
results of the windows that transaction kept (a window another instance already processed gets none)
with this function, in the same transaction that records them, and never calls back into the shell to
build it. The framing is protobuf's own (field 1 the gateway id, field 2 once per result, lengths as
varints), so the bytes equal `ResultBatch(...).SerializeToString()` (tests/test_core_results.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.core.envelope import varint

_GATEWAY_ID = b"\x0a"  # field 1, length-delimited
_RESULT = b"\x12"  # field 2, length-delimited


def result_batch(gateway_id: str, results: Iterable[bytes]) -> bytes:
    gid = gateway_id.encode("utf-8")
    parts = [_GATEWAY_ID, varint(len(gid)), gid] if gid else []
    for r in results:
        parts += (_RESULT, varint(len(r)), r)
    return b"".join(parts)
