"""`[source] type = "pipe"`: the documented frame and CSV formats, refusals by reason, gaps, and a FIFO fed
by separate writer processes that pack frames themselves from the spec (struct + zlib, not sgw's encoder).
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from gateway.agent import pipe_format as P
from gateway.agent.capture import Captured
from gateway.agent.config import SourceSection
from gateway.agent.metrics import AgentMetrics
from gateway.agent.pipe import PipeSource
from gateway.agent.sources import make_source
from gateway.errors import ConfigError
from tests.conftest import SgwEnv
from tests.support.agent import ROOT, agent_toml, running_agent, scrape, wait_for
from tests.support.mosquitto import free_port

RATE = 1000.0
T0 = 1_764_000_000_000_000_000


def frame(
    n: int = 8,
    *,
    seq: int = 0,
    start: int = T0,
    rate: float = RATE,
    enc: int = 2,
    scale: float = 1.0,
    version: int = 1,
    axes: int = 3,
    flags: int = 0,
    count: int | None = None,
    values: np.ndarray | None = None,
) -> bytes:
    """A frame packed straight from the table in pipe_format's docstring."""
    dtype = "<i2" if enc == 1 else "<f4"
    data = values if values is not None else np.arange(n * 3, dtype=np.float64).reshape(n, 3) + seq * 100
    body = (
        struct.pack(
            "<4sBBBBIffQI",
            b"SGWF",
            version,
            enc,
            axes,
            flags,
            n if count is None else count,
            rate,
            scale,
            start,
            seq,
        )
        + np.asarray(data, dtype=dtype).tobytes()
    )
    return body + struct.pack("<I", zlib.crc32(body))


def test_encode_frame_matches_the_spec() -> None:
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    assert P.encode_frame(x, seq=0, start_ns=T0, sample_rate_hz=RATE) == frame(values=x)
    assert len(frame()) == 32 + 8 * 3 * 4 + 4


def test_frames_in_any_chunking() -> None:
    stream = frame(seq=0) + frame(seq=1, start=T0 + 8_000_000, enc=1, scale=0.5)
    whole = P.FrameReader(RATE).feed(stream)
    reader = P.FrameReader(RATE)
    bytewise = [item for b in stream for item in reader.feed(bytes([b]))]
    for got in (whole, bytewise):
        assert [f.seq for f in got if isinstance(f, P.Frame)] == [0, 1]
    f1 = whole[1]
    assert isinstance(f1, P.Frame) and f1.start_ns == T0 + 8_000_000
    assert f1.samples.dtype == np.float32 and f1.samples[1].tolist() == [51.5, 52.0, 52.5]  # raw * scale


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (frame(version=2), "bad_version"),
        (frame(enc=3), "bad_encoding"),
        (frame(axes=2), "bad_axes"),
        (frame(flags=1), "bad_flags"),
        (frame(count=0), "bad_count"),
        (frame(count=P.MAX_COUNT + 1), "bad_count"),  # a huge claimed length is refused before any wait
        (frame()[:-1] + b"\x00", "bad_crc"),
        (frame(rate=800.0), "bad_rate"),
        (frame(scale=0.0), "bad_scale"),
        (frame(scale=float("nan")), "bad_scale"),
        (frame(start=0), "bad_time"),
        (frame(values=np.full((8, 3), np.inf)), "non_finite"),
        (b"\x00garbage!" * 5, "bad_magic"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_malformed_frame_is_refused_and_the_next_one_read(bad: bytes, reason: str) -> None:
    got = P.FrameReader(RATE).feed(frame(seq=0) + bad + frame(seq=5))
    assert [g if isinstance(g, str) else g.seq for g in got] == [0, reason, 5]


def test_a_torn_frame_costs_only_itself() -> None:
    torn = frame(seq=1)[:40]
    got = P.FrameReader(RATE).feed(frame(seq=0) + torn + frame(seq=2))
    assert [g if isinstance(g, str) else g.seq for g in got] == [0, "bad_crc", 2]


def test_csv_lines() -> None:
    reader = P.CsvReader()
    text = (
        b"t,x,y,z\n1764000000.0,0.1,0.2,0.3\n1764000000.1,1,2\n1764000000.2,a,b,c\n"
        b"1764000000.3,nan,0,0\n" + b"9" * 300 + b"\n-1,0,0,0\n1764000000.4,0,0,1\n"
    )
    got = reader.feed(text[:17]) + reader.feed(text[17:])
    assert got == [
        (1_764_000_000_000_000_000, 0.1, 0.2, 0.3),
        "csv_fields",
        "csv_number",
        "non_finite",
        "csv_too_long",
        "bad_time",
        (1_764_000_000_400_000_000, 0.0, 0.0, 1.0),
    ]
    # An endless line is refused once, without buffering it, and the next line is read.
    reader = P.CsvReader()
    assert reader.feed(b"1" * 1000) == ["csv_too_long"]
    got = reader.feed(b"1" * 1000 + b"\n1764000000.0,0,0,0\n")
    assert got == [(1_764_000_000_000_000_000, 0.0, 0.0, 0.0)]


WRITER = textwrap.dedent("""
    import struct, sys, zlib
    path, part = sys.argv[1], sys.argv[2]

    def frame(seq, rate=1000.0, crc_ok=True):
        n = 8
        vals = [float(seq * 100 + i) for i in range(n * 3)]
        body = struct.pack("<4sBBBBIffQI", b"SGWF", 1, 2, 3, 0, n, rate, 1.0, T0 + seq * n * 1_000_000, seq)
        body += struct.pack("<%df" % (n * 3), *vals)
        crc = zlib.crc32(body) ^ (0 if crc_ok else 1)
        return body + struct.pack("<I", crc)

    T0 = 1_764_000_000_000_000_000
    with open(path, "wb", buffering=0) as fifo:
        if part == "1":
            for seq in range(6):
                fifo.write(frame(seq))
            fifo.write(b"not a frame")
            fifo.write(frame(6, crc_ok=False))
            fifo.write(frame(7, rate=800.0))
            for seq in range(8, 12):
                fifo.write(frame(seq))
            fifo.write(frame(12)[:50])  # the acquisition program dies mid-frame
        else:
            for seq in range(13, 17):
                fifo.write(frame(seq))
""")


def _collect(src: PipeSource, n: int, timeout: float = 20.0) -> list[Captured]:
    async def main() -> list[Captured]:
        out: list[Captured] = []
        gen = src.windows()
        try:
            async with asyncio.timeout(timeout):
                async for c in gen:
                    out.append(c)
                    if len(out) == n:
                        break
        finally:
            await gen.aclose()
        return out

    return asyncio.run(main())


def test_fifo_fed_by_separate_processes(tmp_path: Path) -> None:
    fifo = tmp_path / "accel.fifo"
    os.mkfifo(fifo)
    src = make_source(SourceSection(type="pipe", path=fifo, sample_rate_hz=RATE, window=16), kind="vibration")
    assert isinstance(src, PipeSource)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    # Two writer processes one after the other: the FIFO outlives the first (which dies mid-frame).
    for part in ("1", "2"):
        subprocess.run([sys.executable, str(script), str(fifo), part], check=True, timeout=30)
    got = _collect(src, 7)
    good = [*range(6), *range(8, 12), *range(13, 17)]
    want = np.concatenate([np.arange(24, dtype=np.float32).reshape(8, 3) + s * 100 for s in good])
    assert np.array_equal(np.concatenate([c.samples for c in got]), want)
    assert [c.start_ns for c in got[:4]] == [T0, T0 + 16_000_000, T0 + 32_000_000, T0 + 64_000_000]
    assert [c.gap for c in got] == [False, False, False, True, False, True, False]
    assert src.stats.refused == {"bad_magic": 1, "bad_crc": 2, "bad_rate": 1}
    assert src.stats.gaps == 2
    metrics = AgentMetrics("vibration")
    metrics.sync_source(src.stats)
    metrics.sync_source(src.stats)  # mirrored once, not twice
    value = metrics.registry.get_sample_value
    assert value("sgw_agent_source_refused_total", {"reason": "bad_crc"}) == 2
    assert value("sgw_agent_source_gaps_total") == 2
    assert value("sgw_agent_source_overruns_total") == 0


def test_csv_from_a_process_through_the_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "temp.fifo"
    os.mkfifo(fifo)
    src = PipeSource(path=fifo, fmt="csv", sample_rate_hz=10.0, window=16)
    lines = ["t,x,y,z"] + [f"{1764000000 + i / 10:.1f},{i},0,1" for i in range(20)]
    lines[8] = "oops,a,b,c"
    lines.insert(12, "1764000000.9,1,2,3,4")
    lines[-4:] = [f"{1764000005 + i / 10:.1f},{i},0,1" for i in range(4)]  # the sensor paused 3 s
    code = f"import sys; open(sys.argv[1], 'w').write({chr(10).join(lines) + chr(10)!r})"
    subprocess.run([sys.executable, "-c", code, str(fifo)], check=True, timeout=30)
    (got,) = _collect(src, 1)
    assert got.start_ns == 1_764_000_000_000_000_000 and got.gap
    assert src.stats.refused == {"csv_number": 1, "csv_fields": 1}
    assert src.stats.gaps == 2  # the refused line leaves a hole too


def test_stdin_ends_the_source_at_end_of_file(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import asyncio
        from pathlib import Path
        from gateway.agent.pipe import PipeSource

        async def main():
            src = PipeSource(path=Path(), fmt="frames", sample_rate_hz=1000.0, window=16)
            n = len([c async for c in src.windows()])
            print(n, src.stats.refused)

        asyncio.run(main())
    """)
    data = b"".join(frame(seq=s, start=T0 + s * 8_000_000) for s in range(5)) + b"junk"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=data, cwd=ROOT, capture_output=True, timeout=60, check=True
    )
    assert proc.stdout.decode().strip() == "2 {'bad_magic': 1}"


def test_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"source\.path: no FIFO or file"):
        SourceSection(type="pipe", path=tmp_path / "nope.fifo")
    with pytest.raises(ConfigError, match=r"source\.device: required"):
        SourceSection(type="iio")
    with pytest.raises(ConfigError, match="'temp' is not an accel channel"):
        SourceSection(type="iio", device="adxl355", channels=["accel_x", "accel_y", "temp"])
    assert SourceSection(type="pipe").path == Path()  # stdin


AGENT_WRITER = textwrap.dedent("""
    import struct, sys, time, zlib
    import numpy as np
    path, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    t0 = int(sys.argv[4])
    rng = np.random.default_rng(first)

    def frame(seq):
        x = rng.normal(0.0, 0.05, size=(128, 3)).astype("<f4")
        body = struct.pack("<4sBBBBIffQI", b"SGWF", 1, 2, 3, 0, 128, 1600.0, 1.0, t0 + seq * 80_000_000, seq)
        body += x.tobytes()
        return body + struct.pack("<I", zlib.crc32(body))

    with open(path, "wb", buffering=0) as fifo:
        for seq in range(first, first + n):
            fifo.write(frame(seq))
            if seq == first + 2:
                fifo.write(b"\\xff" * 64)            # garbage
                bad = bytearray(frame(seq + 1000))
                bad[40] ^= 0xFF                      # a flipped sample byte
                fifo.write(bytes(bad))
            time.sleep(0.01)
""")


def test_agent_keeps_running_through_malformed_frames(sgw_env: SgwEnv, tmp_path: Path) -> None:
    """The real agent process on a FIFO: refusals show in its metrics, windows keep flowing, SIGTERM is 0."""
    fifo = tmp_path / "accel.fifo"
    os.mkfifo(fifo)
    port = free_port()
    cfg = agent_toml(
        sgw_env.prov, "dev-0004", tmp_path, source={"type": "pipe", "path": str(fifo)}, metrics={"port": port}
    )
    script = tmp_path / "writer.py"
    script.write_text(AGENT_WRITER)
    t0 = time.time_ns() - 5_000_000_000
    with running_agent(cfg, tmp_path / "agent.log", "--heartbeat-s", "3600") as agent:
        wait_for(lambda: _scrape_or_empty(port) != {}, 60, "the metrics endpoint", agent=agent)
        for first in (0, 10):  # two writer processes, one after the other
            subprocess.run(
                [sys.executable, str(script), str(fifo), str(first), "10", str(t0)],
                check=True,
                timeout=60,
                cwd=ROOT,
            )

        def seen() -> bool:
            m = _scrape_or_empty(port)
            return (
                m.get("sgw_agent_windows_seen_total", 0) >= 20
                and m.get('sgw_agent_source_refused_total{reason="bad_crc"}', 0) >= 2
            )

        wait_for(seen, 60, "20 windows and the refusals counted", agent=agent, step=0.2)
        m = scrape(port)
        assert m['sgw_agent_source_refused_total{reason="bad_magic"}'] == 2
        assert m['sgw_agent_source_refused_total{reason="bad_crc"}'] == 2
        assert m["sgw_agent_windows_seen_total"] == 20
        assert m["sgw_agent_source_gaps_total"] == 0  # refused frames were extra, no seq was skipped
        assert agent.proc.poll() is None
        assert agent.stop() == 0
    assert "pipe input refused" in agent.log()


def _scrape_or_empty(port: int) -> dict[str, float]:
    try:
        return scrape(port)
    except OSError:
        return {}
