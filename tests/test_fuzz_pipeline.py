"""Fuzzing the gateway's whole untrusted-input path: `Pipeline.feed(topic, payload, now)` with the real
Opener, token buckets and sample decoder, over the envelope AND the protobuf inside it.

Opener.open alone is fuzzed in test_core_fuzz.py; here the fuzz reaches past the AEAD, because the
harness holds a device key and *seals* fuzzed plaintexts: random bytes, mutated Plaintext protobufs and
structured Plaintexts with hostile field values (shapes of 2^32, NaN scales, wrong encodings, empty
oneofs). Seeds come from tests/corpus/ (regenerate with `python -m tests.test_fuzz_pipeline`).

Invariants: no exception escapes `feed`; every event is Accepted, Rejected (a Reason) or BatchReady;
anything accepted is a window of the route's shape with finite samples, or a status; and memory stays
bounded over many messages from many claimed devices. Bounded time: a few thousand examples, ~30 s.
"""

from __future__ import annotations

import gc
import math
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.core import envelope as ev
from gateway.core import keys
from gateway.core.codec import encode_window
from gateway.core.pipeline import Accepted, BatchReady, Pipeline, Rejected, Route
from gateway.core.ratelimit import TokenBuckets
from gateway.core.reasons import Reason
from gateway.core.session import DeviceKeys, KeyEntry, Opener, Sealer
from gateway.core.topics import topic_for
from gateway.pb import envelope_pb2
from gateway.pb import messages_pb2 as pb

CORPUS = Path(__file__).parent / "corpus"
NOW = 1_800_000_000_000_000_000
SHAPE = (128, 3)
GW = keys.private_from_bytes(bytes(range(32)))
DEV = keys.private_from_bytes(bytes(range(32, 64)))
EPH = keys.private_from_bytes(bytes(range(64, 96)))
OTHER_PUB = keys.public_bytes(keys.private_from_bytes(bytes(range(96, 128))))
DEVICE = "dev-fuzz"
OTHER = "dev-other"
REGISTRY = {
    DEVICE: DeviceKeys("active", {1: KeyEntry(keys.public_bytes(DEV))}),
    OTHER: DeviceKeys("active", {1: KeyEntry(OTHER_PUB)}),
    "dev-revoked": DeviceKeys("revoked", {1: KeyEntry(keys.public_bytes(DEV))}),
}
MAX_BYTES = 8192
FUZZ = settings(max_examples=600, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def sealer(epoch: int = 7, counter: int = 0) -> Sealer:
    return Sealer(device_id=DEVICE, device_key=DEV, device_key_id=1, gateway_public=keys.public_bytes(GW),
                  gateway_key_id=1, epoch=epoch, ephemeral=EPH, first_counter=counter)


def pipeline(**kw: Any) -> Pipeline:
    opts: dict[str, Any] = {
        "opener": Opener(gateway_keys={1: GW}, lookup=REGISTRY.get, max_message_bytes=MAX_BYTES,
                         max_sessions=64),
        "limiter": TokenBuckets(1e9, 1e9, 256), "routes": {"vibration": Route("classifier", SHAPE)},
        "max_batch": 16, "queue_max": 64,
    }
    opts.update(kw)
    return Pipeline(**opts)


def check(p: Pipeline, topic: str, payload: bytes, now: int = NOW) -> list[object]:
    events = p.feed(topic, payload, now)  # an exception escaping here fails the test
    assert isinstance(events, list) and events
    for e in events:
        assert isinstance(e, Accepted | Rejected | BatchReady), e
        if isinstance(e, Rejected):
            assert isinstance(e.reason, Reason)
        if isinstance(e, BatchReady):
            for item in e.items:
                assert item.samples.shape == SHAPE and np.isfinite(item.samples).all()
    for b in p.poll(now + 10**9):  # deadlines never raise either
        assert all(i.samples.shape == SHAPE for i in b.items)
    p.release(p.queued)
    return events


def window_plain(seq: int = 0, **fields: Any) -> pb.Plaintext:
    rng = np.random.default_rng(seq)
    w = encode_window(rng.normal(0, 0.3, size=SHAPE).astype(np.float32), kind="vibration",
                      sample_rate_hz=1600.0, start_ns=NOW - 10**8, window_seq=seq)
    for k, v in fields.items():
        if k == "shape":
            del w.shape[:]
            w.shape.extend(v)
        else:
            setattr(w, k, v)
    return pb.Plaintext(sealed_at_ns=NOW, window=w)


# -- the seed corpus --------------------------------------------------------------------------------------
def corpus_items() -> dict[str, bytes]:
    """Deterministic seeds (fixed keys and ephemeral): envelopes sealed by `sealer()` in counter order,
    and the Plaintexts inside them. `python -m tests.test_fuzz_pipeline` writes them to tests/corpus/."""
    plains: dict[str, pb.Plaintext] = {
        "window-int16": window_plain(0),
        "window-float32": pb.Plaintext(sealed_at_ns=NOW, window=pb.TelemetryWindow(
            kind=pb.SENSOR_KIND_VIBRATION, sample_rate_hz=1600.0, start_ns=NOW - 10**8, shape=list(SHAPE),
            encoding=pb.SAMPLE_ENCODING_FLOAT32, samples=np.zeros(SHAPE, "<f4").tobytes(), window_seq=1)),
        "window-nan-float32": pb.Plaintext(sealed_at_ns=NOW, window=pb.TelemetryWindow(
            kind=pb.SENSOR_KIND_VIBRATION, sample_rate_hz=1600.0, shape=list(SHAPE),
            encoding=pb.SAMPLE_ENCODING_FLOAT32, samples=np.full(SHAPE, np.nan, "<f4").tobytes())),
        "window-huge-shape": window_plain(2, shape=[2**32 - 1, 2**32 - 1]),
        "window-3d-shape": window_plain(3, shape=[128, 3, 1]),
        "window-nan-scale": window_plain(4, scale=math.nan),
        "window-zero-rate": window_plain(5, sample_rate_hz=0.0),
        "window-unknown-encoding": window_plain(6, encoding=7),
        "window-unroutable-kind": window_plain(7, kind=pb.SENSOR_KIND_TEMPERATURE),
        "window-future": pb.Plaintext(sealed_at_ns=NOW + 10**12, window=window_plain(8).window),
        "status-birth": pb.Plaintext(sealed_at_ns=NOW,
                                     status=pb.DeviceStatus(state=pb.DeviceStatus.STATE_BIRTH)),
        "empty-body": pb.Plaintext(sealed_at_ns=NOW),
    }
    s = sealer()
    out: dict[str, bytes] = {}
    for name, plain in plains.items():
        raw = plain.SerializeToString()
        out[f"plaintext-{name}.bin"] = raw
        out[f"envelope-{name}.bin"] = s.seal(raw)
    out["envelope-not-protobuf-inside.bin"] = s.seal(b"\xff\xff\xff\xff")
    out["garbage-ff.bin"] = b"\xff" * 40
    out["garbage-header-only.bin"] = out["envelope-window-int16.bin"][:60]
    return out


def write_corpus() -> None:
    CORPUS.mkdir(exist_ok=True)
    for name, data in corpus_items().items():
        (CORPUS / name).write_bytes(data)


# The files when they exist (test_corpus_seeds_reach_every_stage fails if they are missing or stale).
_SEEDS = {f.name: f.read_bytes() for f in sorted(CORPUS.glob("*.bin"))} or corpus_items()


def load_corpus(prefix: str) -> list[bytes]:
    return [data for name, data in sorted(_SEEDS.items()) if name.startswith(prefix)]


ENVELOPES = load_corpus("envelope-")
PLAINTEXTS = load_corpus("plaintext-")
GARBAGE = load_corpus("garbage-")


def test_corpus_seeds_reach_every_stage() -> None:
    """The seeds are current (same bytes as corpus_items) and cover acceptance and the deep rejections."""
    files = {f.name: f.read_bytes() for f in CORPUS.glob("*.bin")}
    assert files == corpus_items(), "tests/corpus/ is missing or stale: python -m tests.test_fuzz_pipeline"
    got: set[str] = set()
    for raw in ENVELOPES:  # a fresh pipeline each: every seed is judged on its own, not as a replay
        for e in check(pipeline(), topic_for(DEVICE), raw):
            got.add("accepted" if isinstance(e, Accepted) else str(getattr(e, "reason", "batch")))
    assert {"accepted", "decode_error", "malformed", "unroutable", "clock_skew"} <= got, got


# -- the fuzzers -----------------------------------------------------------------------------------------
topics = st.one_of(
    st.just(topic_for(DEVICE)), st.just(topic_for(OTHER)), st.just("sgw/v1/dev//up"),
    st.builds(lambda s: f"sgw/v1/dev/{s}/up", st.text(max_size=80)), st.text(max_size=100),
)


@FUZZ
@given(topics, st.binary(max_size=MAX_BYTES + 200))
@example(topic_for(DEVICE), b"")
def test_any_topic_any_bytes(topic: str, raw: bytes) -> None:
    check(pipeline(), topic, raw)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("duplicate"), st.integers(0, 10_000), st.integers(1, 64)),
)


def mutate(raw: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    b = bytearray(raw)
    for op in ops:
        i = int(op[1]) % (len(b) + 1)
        if op[0] == "flip" and i < len(b):
            b[i] ^= 1 << int(op[2])
        elif op[0] == "set" and i < len(b):
            b[i] = int(op[2])
        elif op[0] == "cut":
            del b[i:i + int(op[2])]
        elif op[0] == "insert":
            b[i:i] = op[2]
        elif op[0] == "truncate":
            del b[i:]
        elif op[0] == "duplicate":
            b[i:i] = b[i:i + int(op[2])]
    return bytes(b)


@FUZZ
@given(st.sampled_from(ENVELOPES + GARBAGE), st.lists(mutation, min_size=1, max_size=5), topics)
def test_mutated_envelopes(seed: bytes, ops: list[tuple[Any, ...]], topic: str) -> None:
    p = pipeline()
    check(p, topic, mutate(seed, ops))
    for raw in ENVELOPES[:2]:  # the pipeline still works for genuine traffic afterwards
        check(p, topic_for(DEVICE), raw)


@FUZZ
@given(st.sampled_from(PLAINTEXTS), st.lists(mutation, min_size=1, max_size=5))
def test_sealed_mutated_plaintexts(seed: bytes, ops: list[tuple[Any, ...]]) -> None:
    """Authenticated, fresh, and the protobuf inside is hostile: the decoder's turn."""
    check(pipeline(), topic_for(DEVICE), sealer().seal(mutate(seed, ops)))


@FUZZ
@given(st.binary(max_size=MAX_BYTES - 200))
def test_sealed_random_plaintexts(raw: bytes) -> None:
    check(pipeline(), topic_for(DEVICE), sealer().seal(raw))


u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
f32 = st.floats(width=32)
windows = st.builds(
    pb.TelemetryWindow, kind=st.integers(0, 4), sample_rate_hz=f32, start_ns=u64,
    shape=st.lists(u32 | st.sampled_from([0, 1, 3, 128, 384]), max_size=4), encoding=st.integers(0, 4),
    scale=f32, samples=st.binary(max_size=1600) | st.sampled_from([bytes(768), bytes(1536)]),
    prefilter_score=f32, prefilter_version=st.text(max_size=20), window_seq=u64, reason=st.integers(0, 3),
)
statuses = st.builds(pb.DeviceStatus, state=st.integers(0, 4), agent_version=st.text(max_size=20),
                     uptime_s=u64, windows_seen=u64, outbox_messages=u64, dropped=u64)


@FUZZ
@given(u64, st.one_of(windows, statuses, st.none()))
def test_sealed_structured_plaintexts(sealed_at: int, body: Any) -> None:
    plain = pb.Plaintext(sealed_at_ns=sealed_at)
    if isinstance(body, pb.TelemetryWindow):
        plain.window.CopyFrom(body)
    elif isinstance(body, pb.DeviceStatus):
        plain.status.CopyFrom(body)
    check(pipeline(), topic_for(DEVICE), sealer().seal(plain.SerializeToString()))


# -- memory ----------------------------------------------------------------------------------------------
def test_memory_stays_bounded_under_hostile_traffic() -> None:
    """30k messages: garbage under 20k distinct topic ids, forgeries claiming 5k distinct devices or
    the real one with a fresh ephemeral each, and sealed hostile plaintexts. Every per-device
    structure stays within its bound and the traced heap does not grow with the message count."""
    p = pipeline(limiter=TokenBuckets(1e9, 1e9, 256))
    s = sealer(epoch=9)
    forger_key = keys.private_from_bytes(bytes(range(128, 160)))
    forger = Sealer(device_id=DEVICE, device_key=forger_key, device_key_id=1,
                    gateway_public=keys.public_bytes(GW), gateway_key_id=1, epoch=10)
    rng = np.random.default_rng(1)

    def batch(n: int, offset: int) -> None:
        for i in range(offset, offset + n):
            kind = i % 4
            if kind == 0:
                check(p, f"sgw/v1/dev/id-{i % 20_000}/up", rng.bytes(int(rng.integers(0, 300))))
            elif kind == 1 and i % 8 == 1:  # the real device's id, a wrong key and a new ephemeral each
                f = Sealer(device_id=DEVICE, device_key=forger_key, device_key_id=1,
                           gateway_public=keys.public_bytes(GW), gateway_key_id=1, epoch=10 + i)
                check(p, topic_for(DEVICE), f.seal(b"x"))
            elif kind == 1:
                env = forger.seal(b"x")
                head, ct = ev.split_envelope(env) or (b"", b"")
                header = pb_header(head, f"claim-{i % 5000}")
                check(p, f"sgw/v1/dev/claim-{i % 5000}/up", ev.encode_envelope(header, ct))
            elif kind == 2:
                check(p, topic_for(DEVICE), s.seal(rng.bytes(int(rng.integers(0, 200)))))
            else:
                check(p, topic_for(DEVICE), s.seal(window_plain(i).SerializeToString()))

    batch(5_000, 0)  # warm-up: caches and interned strings settle
    gc.collect()
    tracemalloc.start()
    try:
        batch(5_000, 5_000)
        gc.collect()
        first, _ = tracemalloc.get_traced_memory()
        batch(20_000, 10_000)
        gc.collect()
        second, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = second - first
    opener = p._opener
    sizes = {"buckets": len(p._limiter), "last_seen": len(p.last_seen),  # type: ignore[arg-type]
             "windows": len(opener._windows), "sessions": len(opener._sessions),  # type: ignore[attr-defined]
             "static": len(opener._static), "queued": p.queued}  # type: ignore[attr-defined]
    print(f"\nmemory: traced heap {growth / 1024:+.1f} KiB over 20k messages after warm-up; {sizes}")
    assert sizes["buckets"] <= 256
    assert sizes["last_seen"] <= 1 and sizes["windows"] <= 1 and sizes["sessions"] <= 1
    assert sizes["static"] <= len(REGISTRY)
    assert growth < 1024 * 1024, f"heap grew {growth} bytes over 20k hostile messages"


def pb_header(head: bytes, device_id: str) -> bytes:
    h = envelope_pb2.Header.FromString(head)
    h.device_id = device_id
    return h.SerializeToString()


if __name__ == "__main__":
    write_corpus()
    print(f"wrote {len(corpus_items())} seeds to {CORPUS}", file=sys.stderr)
