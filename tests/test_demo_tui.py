"""`sgw demo` with its live view: the rich view in a real pseudo-terminal, stopped with SIGINT, and the
render function on a sample reading.

The live run is what a user sees: the view redraws in the terminal, Ctrl-C (SIGINT to the demo) stops
every child in order, the summary is printed and the exit code is 0, and no mosquitto, gateway or agent
outlives the demo. The render test is fast and checks the fields the view promises.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest
from rich.console import Console

from gateway.demo.procs import find_mosquitto
from gateway.demo.tui import render
from gateway.demo.view import View

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r")
FOOTER = "Ctrl-C stops everything"
COLS, ROWS = 100, 60


def _plain(raw: bytes | bytearray) -> str:
    return ANSI.sub("", raw.decode("utf-8", errors="replace"))


def _read_for(fd: int, buf: bytearray, seconds: float) -> None:
    """Appends whatever the pty says for up to `seconds` (returns early at EOF)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer of the slave side is gone
            return
        if not chunk:
            return
        buf.extend(chunk)


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
def test_live_view_renders_in_a_terminal_and_sigint_stops_everything(tmp_path: Path) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    env = {**os.environ, "TERM": "xterm", "COLUMNS": str(COLS), "LINES": str(ROWS)}
    for var in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--devices", "2", "--state-dir", str(tmp_path / "state")],
        stdin=slave, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, env=env,
    )
    os.close(slave)
    screen = bytearray()
    children: list[psutil.Process] = []
    try:
        # Wait for a few frames of the live view with the gateway connected and results flowing in.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _read_for(master, screen, 0.5)
            assert proc.poll() is None, f"demo exited early ({proc.returncode}):\n{_plain(screen)[-3000:]}"
            text = _plain(screen)
            if text.count(FOOTER) >= 4 and "gateway connected" in text.rsplit("sgw demo", 1)[-1]:
                break
        text = _plain(screen)
        assert text.count(FOOTER) >= 4, f"live view did not render frames:\n{text[-3000:]}"
        frame = text.rsplit("sgw demo", 1)[-1]
        for needle in ("2 devices, 2 agents running", "gateway connected", "Traffic", "E2E latency",
                       "Rejections", "Outboxes", "Models", "metrics: http://127.0.0.1:"):
            assert needle in frame, f"{needle!r} missing from the last frame:\n{frame}"
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "mosquitto" in names and names.count("gateway.demo.launch agent") == 2, names
        assert "gateway.demo.launch gateway" in names, names

        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        while proc.poll() is None and time.monotonic() - stopped_at < 60:
            _read_for(master, screen, 0.2)
        assert proc.poll() is not None, f"demo still running 60 s after SIGINT:\n{_plain(screen)[-3000:]}"
        took = time.monotonic() - stopped_at
        _read_for(master, screen, 0.5)
        assert proc.stdout is not None
        summary = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for c in children:  # never leave a child behind, even when an assertion failed
            with contextlib.suppress(psutil.Error):
                c.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        os.close(master)
    log = _plain(screen)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{summary}\n{log[-3000:]}"
    assert "stopping (Ctrl-C)" in log and "stopping 2 agents" in log, log[-3000:]
    assert "had to SIGKILL" not in log, log[-3000:]
    assert summary.startswith("sgw demo: 2 devices for "), summary
    assert "(stopped by signal)" in summary and "lost 0" in summary and "duplicates 0" in summary, summary
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"children outlived the demo: {[(c.pid, c.cmdline()) for c in left]}"
    assert not any(c.is_running() for c in children), "a child was left unreaped"
    print(f"\ndemo live view: {log.count(FOOTER)} frames, stopped {took:.1f} s after SIGINT, "
          f"{len(children)} children all gone")


def test_render_shows_every_field_the_view_promises() -> None:
    v = View(
        elapsed_s=75.0, devices=3, agents_alive=3, metrics_url="http://127.0.0.1:9123/metrics",
        state_dir="/tmp/sgw-demo-x/home", gateway_up=True, gateway_connected=True,
        windows_seen_rate=37.5, forwarded_rate=3.25, gateway_in_rate=4.5, results_rate=4.25,
        windows_seen=3000, forwarded=750, gateway_accepted=740, gateway_rejected=12, results=731,
        faults={"bearing": 17, "imbalance": 5}, rejections={"replay": 7, "bad_auth": 5, "malformed": 0},
        latency_p50_ms=12.5, latency_p99_ms=48.25, latency_all_p50_ms=11.0, latency_all_p99_ms=61.0,
        outbox={"dev-0001": 4, "dev-0002": 0, "dev-0003": 9},
        backends=[("classifier", "cpu", "auto"), ("anomaly", "gpu", "gpu")],
        commissioning={"dev-0002": 0.4, "dev-0003": 0.75}, commissioned=1,
    )
    console = Console(width=COLS, record=True, force_terminal=False, color_system=None)
    console.print(render(v))
    out = console.export_text()

    def row(label: str, *cells: str) -> None:
        match = [ln for ln in out.splitlines() if re.search(rf"(^|\s){re.escape(label)}\s", ln)]
        assert match, f"no row {label!r}:\n{out}"
        assert any(all(c in ln for c in cells) for ln in match), f"row {label!r} lacks {cells}:\n{out}"

    assert "3 devices, 3 agents running" in out and "gateway connected" in out and "01:15" in out
    row("gateway in", "4.5", "752")            # messages/s in (and the total accepted + rejected)
    row("results out", "4.2", "731")           # messages/s out
    row("fraction", "25.0 %")                  # forwarded / seen
    row("bearing", "17")                       # faults by class
    row("imbalance", "5")
    row("replay", "7")                         # rejections by reason; zero counts are not shown
    row("bad_auth", "5")
    assert "malformed" not in out
    row("last 10 s", "12.5 ms", "48.2 ms")     # e2e p50 / p99
    row("whole run", "11.0 ms", "61.0 ms")
    row("all 3", "13")                         # outbox depth, total and the deepest devices
    row("dev-0003", "9")
    row("classifier", "cpu", "(auto)")         # accelerator per model (and what was asked for)
    row("anomaly", "gpu")
    assert "metrics: http://127.0.0.1:9123/metrics" in out
    row("commissioning:", "2 learning", "dev-0002 40%", "dev-0003 75%", "1 done")


def test_render_before_any_data_says_so() -> None:
    console = Console(width=COLS, record=True, force_terminal=False, color_system=None)
    console.print(render(View(devices=2, metrics_url="http://127.0.0.1:1/metrics")))
    out = console.export_text()
    for needle in ("gateway down", "none yet", "no agent metrics", "not reported yet", "metrics: http"):
        assert needle in out, f"{needle!r} missing:\n{out}"
