"""`[source] resample_hz`: a sensor at 2000 Hz (the ADXL355 cannot do 1600) feeding the 1600 Hz models.

The resampler against the analytic signal (pass band, stop band, sample count), independence from how
the input is chunked, gaps (never mixed into one interpolation, window flagged), and the real agent on a
2000 Hz pipe: refused with the hint without `resample_hz`, running with it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.agent.capture import Captured
from gateway.agent.resample import ResampledSource, Resampler, ratio
from gateway.errors import ConfigError
from tests.conftest import SgwEnv
from tests.support.agent import ROOT, agent_toml, running_agent, scrape, wait_for
from tests.support.cli import run_cli
from tests.support.mosquitto import free_port
from tests.test_agent_pipe import AGENT_WRITER

IN_HZ, OUT_HZ = 2000.0, 1600.0


def tone(f: float, n: int, rate: float = IN_HZ) -> np.ndarray:
    t = np.arange(n) / rate
    return np.stack([np.sin(2 * np.pi * f * t), 0.5 * np.cos(2 * np.pi * f * t), np.zeros(n)], axis=1)


def run(x: np.ndarray, chunk: int) -> np.ndarray:
    r = Resampler(IN_HZ, OUT_HZ, 3)
    parts = [r.push(x[i : i + chunk].astype(np.float32)) for i in range(0, len(x), chunk)]
    return np.concatenate([*parts, r.end()])


@pytest.mark.parametrize("f", [20.0, 180.0, 450.0, 650.0])
def test_pass_band_matches_the_signal_sampled_at_the_new_rate(f: float) -> None:
    y = run(tone(f, 20_000), 128)
    assert len(y) == 16_000  # exactly 4/5, nothing dropped at the ends
    want = tone(f, 16_000, OUT_HZ)
    mid = slice(100, -100)  # the held ends are not a steady tone
    assert np.max(np.abs(y[mid] - want[mid])) < 2e-3, f


@pytest.mark.parametrize("f", [850.0, 950.0])
def test_above_the_new_nyquist_is_removed_not_aliased(f: float) -> None:
    y = run(tone(f, 20_000), 128)
    assert np.sqrt(np.mean(y[100:-100, 0] ** 2)) < 1e-3 * np.sqrt(0.5)  # below -60 dB


def test_output_does_not_depend_on_how_the_input_is_chunked() -> None:
    x = np.random.default_rng(3).normal(size=(5_000, 3))
    a, b, c = run(x, 128), run(x, 7), run(x, 5_000)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_ratios_that_need_too_many_phases_are_refused() -> None:
    assert ratio(2000.0, 1600.0).denominator == 5
    assert ratio(4000.0, 1600.0) == ratio(1000.0, 400.0)
    with pytest.raises(ConfigError, match="not a simple ratio"):
        ratio(1999.0, 1600.0)


class _Windows:
    """Windows as a live source hands them over: contiguous, then one after a hole (flagged)."""

    kind, window, axes, sample_rate_hz = "vibration", 128, 3, IN_HZ

    def __init__(self, parts: list[tuple[int, np.ndarray, bool]]) -> None:
        self._parts = parts

    async def windows(self) -> AsyncIterator[Captured]:
        for start, x, gap in self._parts:
            for i in range(0, len(x), 128):
                yield Captured(start + int(i * 1e9 / IN_HZ), x[i : i + 128].astype(np.float32),
                               gap=gap and i == 0)


def test_a_gap_ends_one_stretch_and_flags_the_window_after_it() -> None:
    t0 = 1_764_000_000_000_000_000
    first, second = tone(100.0, 1280), np.full((1280, 3), 0.25)
    later = t0 + 10_000_000_000  # 10 s later
    src = ResampledSource(_Windows([(t0, first, False), (later, second, True)]), OUT_HZ)  # type: ignore[arg-type]

    async def collect() -> list[Captured]:
        return [w async for w in src.windows()]

    got = asyncio.run(collect())
    assert src.sample_rate_hz == OUT_HZ and all(w.samples.shape == (128, 3) for w in got)
    flagged = [i for i, w in enumerate(got) if w.gap]
    assert len(flagged) == 1
    after = got[flagged[0] + 1 :]
    # The second stretch is a constant: interpolation that reached across the hole would show the tone.
    assert after and all(np.allclose(w.samples, 0.25, atol=1e-6) for w in after)
    assert after[0].start_ns >= later
    assert got[0].start_ns == t0 and got[1].start_ns - got[0].start_ns == 80_000_000  # 128 at 1600 Hz


def test_agent_on_a_2000_hz_pipe_needs_resample_hz_and_runs_with_it(sgw_env: SgwEnv, tmp_path: Path) -> None:
    fifo = tmp_path / "adxl.fifo"
    os.mkfifo(fifo)
    source = {"type": "pipe", "path": str(fifo), "sample_rate_hz": IN_HZ}
    plain = agent_toml(sgw_env.prov, "dev-0004", tmp_path, name="plain.toml", source=source)
    rc, _out, err = run_cli(["agent", "--config", str(plain)])
    assert rc == 2 and "set [source] resample_hz = 1600" in err, err

    port = free_port()
    cfg = agent_toml(sgw_env.prov, "dev-0004", tmp_path, name="resampled.toml",
                     source={**source, "resample_hz": OUT_HZ}, metrics={"port": port})
    writer = tmp_path / "writer.py"
    # The pipe test's writer at the sensor's 2000 Hz: 128-sample frames, 64 ms apart.
    writer.write_text(AGENT_WRITER.replace("1600.0", "2000.0").replace("80_000_000", "64_000_000"))
    with running_agent(cfg, tmp_path / "agent.log", "--heartbeat-s", "3600") as agent:
        wait_for(lambda: _metrics(port) != {}, 60, "the metrics endpoint", agent=agent)
        subprocess.run([sys.executable, str(writer), str(fifo), "0", "25", str(1_764_000_000_000_000_000)],
                       check=True, timeout=60, cwd=ROOT)
        # 25 frames x 128 at 2000 Hz = 3200 samples -> 2560 at 1600 Hz = 20 windows, less the filter's
        # held-back tail (under one window) until the stream ends.
        wait_for(lambda: _metrics(port).get("sgw_agent_windows_seen_total", 0) >= 19, 60, "windows",
                 agent=agent, step=0.2)
        assert scrape(port)["sgw_agent_source_gaps_total"] == 0
        assert agent.stop() == 0


def _metrics(port: int) -> dict[str, float]:
    try:
        return scrape(port)
    except OSError:
        return {}
