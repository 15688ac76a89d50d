"""`[source] type = "iio"` against a faithful IIO sysfs tree and a FIFO standing in for /dev/iio:deviceN.

The tree has what a real driver exposes (name, scan_elements/ with _en/_index/_type, shared-by-type
_scale, per-channel _offset, sampling_frequency + _available, buffer/ with enable/length/watermark,
current_timestamp_clock, a temperature channel left enabled, a trigger directory to ignore). The buffer
bytes are written as the kernel lays them out (iio_layout.encode).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gateway.agent import iio_layout as L
from gateway.agent.capture import Captured
from gateway.agent.config import SourceSection
from gateway.agent.iio import IioSource
from gateway.agent.sources import ReplaySource, make_source
from gateway.errors import SourceError
from tests.conftest import SgwEnv
from tests.support.agent import ROOT
from tests.support.provision import run_cli

RATE = 1000.0
WINDOW = 16
SCALE = 0.000038245  # ADXL355 at +-2 g: 3.9 ug per LSB, in m/s^2
S16 = "le:s16/16>>0"
S12 = "be:s12/16>>4"


@dataclass
class Tree:
    sysfs: Path
    dev: Path
    device: Path  # sysfs/iio:deviceN

    @property
    def node(self) -> Path:
        return self.dev / self.device.name

    def value(self, rel: str) -> str:
        return (self.device / rel).read_text().strip()


def make_tree(
    root: Path,
    *,
    accel_type: str = S16,
    timestamp: bool = True,
    name: str = "adxl355",
    number: int = 0,
    available: str | None = "4000 2000 1000 500 250 125 62.5",
) -> Tree:
    sysfs, dev = root / "sys", root / "dev"
    d = sysfs / f"iio:device{number}"
    files = {
        "name": name,
        "in_accel_scale": f"{SCALE:.9f}",
        "in_accel_x_offset": "0",
        "in_accel_y_offset": "3",
        "in_accel_z_offset": "-2",
        "in_accel_sampling_frequency": "4000.000000",
        "current_timestamp_clock": "monotonic",
        "buffer/enable": "0",
        "buffer/length": "2",
        "buffer/watermark": "1",
        "trigger/current_trigger": "",
    }
    if available is not None:
        files["in_accel_sampling_frequency_available"] = available
    elements = [(f"accel_{a}", i, accel_type, "0") for i, a in enumerate("xyz")]
    elements.append(("temp", 3, S12, "1"))  # left enabled by someone else: must be switched off
    if timestamp:
        elements.append(("timestamp", 4, "le:s64/64>>0", "0"))
    for ch, index, typ, en in elements:
        files[f"scan_elements/in_{ch}_en"] = en
        files[f"scan_elements/in_{ch}_index"] = str(index)
        files[f"scan_elements/in_{ch}_type"] = typ
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text + "\n")
    (sysfs / "trigger0").mkdir()
    (sysfs / "trigger0" / "name").write_text("adxl355-dev0\n")
    dev.mkdir(parents=True, exist_ok=True)
    os.mkfifo(dev / d.name)
    return Tree(sysfs, dev, d)


def source(tree: Tree, **kw: object) -> IioSource:
    args: dict[str, object] = {
        "device": "adxl355",
        "channels": ["accel_x", "accel_y", "accel_z"],
        "sample_rate_hz": RATE,
        "window": WINDOW,
        "sysfs_root": tree.sysfs,
        "dev_root": tree.dev,
        "buffer_length": 4096,
    }
    args.update(kw)
    return IioSource(**args)  # type: ignore[arg-type]


def layout_of(accel_type: str, timestamp: bool) -> L.Layout:
    chans = [
        L.Channel(f"accel_{a}", i, L.parse_type(accel_type), SCALE, off)
        for i, (a, off) in enumerate(zip("xyz", (0.0, 3.0, -2.0), strict=True))
    ]
    ts = L.Channel("timestamp", 4, L.parse_type("le:s64/64>>0")) if timestamp else None
    return L.layout(chans, ts)


def raw_samples(n: int, bits: int, seed: int = 0) -> np.ndarray:
    hi = (1 << (bits - 1)) - 1
    return np.random.default_rng(seed).integers(-hi - 1, hi + 1, size=(n, 3), dtype=np.int64)


def expected_g(raw: np.ndarray) -> np.ndarray:
    """What the windows must hold: (raw + offset) * scale in m/s^2, in g, computed here independently."""
    offsets = np.array([0.0, 3.0, -2.0])
    return ((raw.astype(np.float64) + offsets) * SCALE / 9.80665).astype(np.float32)


def feed(tree: Tree, data: bytes) -> None:
    """Writes the buffer bytes into the device stand-in (the source holds it open, so this never blocks)."""
    fd = os.open(tree.node, os.O_WRONLY | os.O_NONBLOCK)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def collect(src: IioSource, n: int, timeout: float = 10.0) -> list[Captured]:
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


def stamps(
    n: int, start: int = 1_764_000_000_000_000_000, gap_after: int | None = None, gap_ns: int = 0
) -> np.ndarray:
    t = start + np.arange(n, dtype=np.int64) * int(1e9 / RATE)
    if gap_after is not None:
        t[gap_after:] += gap_ns
    return t


def test_s16_with_timestamp_channel(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    src = source(tree)
    # Setup happened in the constructor: exactly our channels, realtime clock, rate, buffer length.
    assert [tree.value(f"scan_elements/in_{c}_en") for c in ("accel_x", "accel_y", "accel_z")] == ["1"] * 3
    assert tree.value("scan_elements/in_temp_en") == "0"
    assert tree.value("scan_elements/in_timestamp_en") == "1"
    assert tree.value("current_timestamp_clock") == "realtime"
    assert tree.value("in_accel_sampling_frequency") == "1000"
    assert tree.value("buffer/length") == "4096" and tree.value("buffer/watermark") == str(WINDOW)
    assert src.has_timestamp and src.layout.scan_bytes == 16
    raw = raw_samples(3 * WINDOW + 5, 16)
    t = stamps(len(raw))
    feed(tree, L.encode(raw, layout_of(S16, True), t))
    got = collect(src, 3)
    assert np.array_equal(np.concatenate([c.samples for c in got]), expected_g(raw[: 3 * WINDOW]))
    assert [c.start_ns for c in got] == [int(t[0]), int(t[WINDOW]), int(t[2 * WINDOW])]
    assert not any(c.gap for c in got)
    assert src.stats.gaps == 0 and src.stats.overruns == 0
    assert tree.value("buffer/enable") == "0", "the buffer is switched off when the source stops"


def test_be_s12_without_timestamp_uses_the_clock_and_the_rate(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, accel_type=S12, timestamp=False, name="lsm6dsx", number=3)
    src = source(tree, device="3")
    assert not src.has_timestamp and src.layout.scan_bytes == 6  # three 16-bit words, temp switched off
    raw = raw_samples(2 * WINDOW, 12, seed=1)
    before = time.time_ns()
    feed(tree, L.encode(raw, layout_of(S12, False)))
    got = collect(src, 2)
    after = time.time_ns()
    assert np.array_equal(np.concatenate([c.samples for c in got]), expected_g(raw))
    # One read: the last scan is 'now', the first is (n - 1) periods earlier; windows are contiguous.
    assert before - 2 * WINDOW * 1_000_000 <= got[0].start_ns <= after
    assert got[1].start_ns - got[0].start_ns == WINDOW * 1_000_000
    assert src.stats.gaps == 0


def test_overrun_and_gap_are_counted_and_flagged(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    length = 2 * WINDOW
    src = source(tree, buffer_length=length)
    assert src.buffer_length == length
    # The kernel buffer filled (a read returns all `length` scans) and the driver dropped 7 scans:
    # the timestamps jump by 8 periods where the next read begins.
    raw = raw_samples(length + 20, 16, seed=2)
    t = stamps(len(raw), gap_after=length, gap_ns=7_000_000)
    feed(tree, L.encode(raw, layout_of(S16, True), t))
    got = collect(src, 3)
    assert src.stats.overruns == 1
    assert src.stats.gaps == 1, "the overrun and the timestamp jump are one break"
    assert [c.gap for c in got] == [False, False, True]
    assert got[2].start_ns == int(t[length])
    # A jump in the timestamps alone (no full buffer) is a gap, not an overrun.
    tree2 = make_tree(tmp_path / "b")
    src2 = source(tree2)
    t2 = stamps(2 * WINDOW, gap_after=WINDOW + 3, gap_ns=50_000_000)
    feed(tree2, L.encode(raw_samples(2 * WINDOW, 16), layout_of(S16, True), t2))
    got2 = collect(src2, 2)
    assert [c.gap for c in got2] == [False, True]
    assert (src2.stats.gaps, src2.stats.overruns) == (1, 0)


def test_recorded_buffer_is_bit_identical_to_replay(tmp_path: Path) -> None:
    """A recorded IIO buffer through the iio source == the same samples (.npy) through the replay source."""
    tree = make_tree(tmp_path)
    raw = raw_samples(10 * WINDOW + 3, 16, seed=3)
    recording = L.encode(raw, layout_of(S16, True), stamps(len(raw)))
    (tmp_path / "buffer.bin").write_bytes(recording)
    np.save(tmp_path / "same.npy", expected_g(raw))
    src = source(tree)
    feed(tree, (tmp_path / "buffer.bin").read_bytes())
    live = collect(src, 10)

    async def replay() -> list[Captured]:
        rs = ReplaySource(path=tmp_path / "same.npy", sample_rate_hz=RATE, window=WINDOW, speed=0.0)
        return [c async for c in rs.windows()]

    replayed = asyncio.run(replay())
    assert len(replayed) == len(live) == 10
    for a, b in zip(live, replayed, strict=True):
        assert a.samples.dtype == b.samples.dtype == np.float32 and a.samples.shape == b.samples.shape
        assert a.samples.tobytes() == b.samples.tobytes()


def test_make_source_builds_it_from_the_config(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    cfg = SourceSection(
        type="iio",
        device="iio:device0",
        sample_rate_hz=RATE,
        window=WINDOW,
        sysfs_root=tree.sysfs,
        dev_root=tree.dev,
    )
    src = make_source(cfg, kind="vibration")
    assert isinstance(src, IioSource) and src.axes == 3
    assert tree.value("buffer/length") == str(8 * WINDOW)
    src.close()


# -- errors: one line each, a typed SourceError -------------------------------------------------------


def test_missing_device_lists_what_is_there(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    found = r"\(found: adxl355 \(iio:device0\)\)"
    with pytest.raises(SourceError, match=rf"no IIO device 'adxl345' under .* {found}"):
        source(tree, device="adxl345")
    with pytest.raises(SourceError, match="no IIO device '7'"):
        source(tree, device="7")
    tree.node.unlink()
    with pytest.raises(SourceError, match=r"has no device node .*iio:device0"):
        source(tree)


def test_unsupported_channel_type(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, accel_type="le:s24/24>>0")
    with pytest.raises(SourceError, match=r"adxl355 accel_x: unsupported scan type 'le:s24/24>>0'"):
        source(tree)
    good = make_tree(tmp_path / "b")
    with pytest.raises(SourceError, match=r"no buffered channel 'accel_w' \(has: accel_x, accel_y"):
        source(good, channels=["accel_x", "accel_y", "accel_w"])


def test_rate_not_supported(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    with pytest.raises(SourceError, match=r"adxl355 cannot sample at 1600 Hz \(it offers 4000 2000 1000 500"):
        source(tree, sample_rate_hz=1600.0)
    assert tree.value("in_accel_sampling_frequency") == "4000.000000", "nothing written for a bad rate"
    # The range form of _available.
    (tree.device / "in_accel_sampling_frequency_available").write_text("[1 1 800]\n")
    with pytest.raises(SourceError, match=r"cannot sample at 1000 Hz \(it offers 1\.\.800\)"):
        source(tree)


def test_device_wide_sampling_frequency_is_used_without_a_per_type_one(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, available=None)
    (tree.device / "in_accel_sampling_frequency").unlink()
    (tree.device / "sampling_frequency").write_text("400.000000\n")
    source(tree).close()
    assert tree.value("sampling_frequency") == "1000"
    (tree.device / "sampling_frequency").unlink()
    with pytest.raises(SourceError, match="adxl355 has no sampling_frequency to set"):
        source(tree)


def _construct_without_privileges(tree: Tree) -> tuple[int, str]:
    """Builds the source in a child that cannot bypass file modes: (exit code, its SourceError line)."""
    code = (
        "import sys; from pathlib import Path; from gateway.agent.iio import IioSource\n"
        "from gateway.errors import SourceError\n"
        "try:\n"
        "    IioSource(device='adxl355', channels=['accel_x', 'accel_y', 'accel_z'],"
        f" sample_rate_hz={RATE},"
        f" window={WINDOW}, sysfs_root=Path({str(tree.sysfs)!r}), dev_root=Path({str(tree.dev)!r}))\n"
        "except SourceError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    # root reads anything; drop every capability (CAP_DAC_OVERRIDE) so the mode bits apply as they would.
    prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make the device unreadable")
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, proc.stdout.strip()


def test_permission_denied_names_the_device_allow_line(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    tree.node.chmod(0o000)  # as /dev/iio:device0 is to a service user without a udev rule or DeviceAllow=
    rc, line = _construct_without_privileges(tree)
    assert rc == 3
    assert f"permission denied opening {tree.node}" in line
    assert f"`DeviceAllow={tree.node} r`" in line


def test_read_only_sysfs_is_fine_when_already_configured(tmp_path: Path) -> None:
    """Under the unit sysfs is read-only: a device set up beforehand needs no writes; one that is not
    gets an error naming the attribute."""
    tree = make_tree(tmp_path)
    source(tree, buffer_length=0).close()  # configures it (as a udev rule or ExecStartPre=+ would)
    for p in tree.device.rglob("*"):
        if p.is_file():
            p.chmod(0o444)
    assert _construct_without_privileges(tree) == (0, "")  # nothing needed writing
    attr = tree.device / "in_accel_sampling_frequency"
    attr.chmod(0o644)
    attr.write_text("4000.000000\n")
    attr.chmod(0o444)
    rc, line = _construct_without_privileges(tree)
    assert rc == 3
    assert line.startswith(f"source: permission denied writing '1000' to {attr}; configure the device")


def test_cli_prints_the_source_error_in_one_line(sgw_env: SgwEnv, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(sgw_env.prov.bundle("dev-0003"), bundle)
    tree = make_tree(tmp_path / "hw")
    path = bundle / "agent.toml"
    # The template lists device = "" already (sgw device add writes every [source] key).
    text = path.read_text().replace(
        'type = "simulated"',
        (f'type = "iio"\nsysfs_root = "{tree.sysfs}"\ndev_root = "{tree.dev}"'),
        1,
    ).replace('device = ""', 'device = "adxl355"', 1)
    path.write_text(text)
    rc, _out, err = run_cli(["agent", "--config", str(path)])
    assert rc == 2, err
    assert err.strip().splitlines() == [
        (
            "sgw: error: source.sample_rate_hz: adxl355 cannot sample at 1600 Hz "
            "(it offers 4000 2000 1000 500 250 125 62.5)"
        )
    ]
    assert not (bundle / "outbox.db").exists()


def test_a_buffer_started_beforehand_is_read_and_left_running(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    source(tree, buffer_length=0).close()
    (tree.device / "buffer" / "enable").write_text("1\n")  # ExecStartPre=+ set it up and started it
    src = source(tree, buffer_length=0)
    assert src.running_before
    raw = raw_samples(WINDOW, 16, seed=4)
    feed(tree, L.encode(raw, layout_of(S16, True), stamps(WINDOW)))
    (got,) = collect(src, 1)
    assert np.array_equal(got.samples, expected_g(raw))
    assert tree.value("buffer/enable") == "1"
    # A setting that differs stops the running buffer first, then changes it.
    (tree.device / "buffer" / "length").write_text("64\n")
    src = source(tree, buffer_length=0)
    assert not src.running_before and tree.value("buffer/length") == str(8 * WINDOW)
    assert tree.value("buffer/enable") == "0"
    src.close()
