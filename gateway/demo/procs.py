"""Child processes of the demo: started with their output in a log file, stopped in order, never leaked.

Children run in their own session so a Ctrl-C in the terminal reaches only the demo, which then stops
them in dependency order (agents flush before the gateway goes, the gateway drains before the broker
goes). On Linux each child also gets PR_SET_PDEATHSIG, so even a SIGKILLed demo leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import SgwError

_PR_SET_PDEATHSIG = 1


class DemoError(SgwError):
    """A demo step failed (a service did not start, a command failed); the message says which and why."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: only async-signal-safe work (a prctl call) happens here.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def sgw_argv(*args: str) -> list[str]:
    """The same sgw that runs the demo, whatever PATH says, loading only the command it runs."""
    return [sys.executable, "-m", "gateway.demo.launch", *args]


def run_sgw(args: Sequence[str], *, timeout_s: float = 120.0, env: Mapping[str, str] | None = None) -> str:
    """Runs one short sgw command; its stderr's last lines become the error if it fails."""
    try:
        done = subprocess.run(
            sgw_argv(*args), capture_output=True, text=True, timeout=timeout_s, check=False,
            env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DemoError(f"'sgw {' '.join(args)}' did not finish within {timeout_s:g} s") from None
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or f"exit code {done.returncode}"
        raise DemoError(f"'sgw {' '.join(args[:3])} ...' failed: {tail}")
    return done.stdout


def find_mosquitto() -> str | None:
    """mosquitto lives in /usr/sbin on Debian, which is not on an ordinary user's PATH."""
    for candidate in (os.environ.get("SGW_MOSQUITTO"), shutil.which("mosquitto")):
        if candidate:
            return candidate
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        path = Path(folder) / "mosquitto"
        if os.access(path, os.X_OK):
            return str(path)
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process from /proc (None elsewhere or once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = raw[raw.rfind(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


@dataclass
class Child:
    name: str
    role: str  # broker | gateway | agent | ...: the stop order and the CPU report group by it
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)
    last_cpu_s: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float:
        now = cpu_seconds(self.proc.pid) if self.alive() else None
        if now is not None:
            self.last_cpu_s = now
        return self.last_cpu_s

    def describe_exit(self) -> str:
        rc = self.proc.poll()
        why = tail(self.log)
        return f"{self.name} exited with code {rc}" + (f": {why}" if why else f" (log: {self.log})")


class Processes:
    """Every child the demo starts; `stop_all` is always reached (the runner calls it in `finally`)."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, role: str, argv: Sequence[str], *, cwd: Path | None = None,
              env: Mapping[str, str] | None = None) -> Child:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log = self._log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                env=dict(env) if env is not None else None, start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only a prctl call, no locks or allocation
            )
        child = Child(name, role, proc, log)
        self.children.append(child)
        return child

    def of_role(self, role: str) -> list[Child]:
        return [c for c in self.children if c.role == role]

    def stop(self, children: Iterable[Child], *, grace_s: float = 10.0) -> list[str]:
        """SIGTERM all, wait up to grace_s, then SIGKILL what is left. Returns the names that needed it."""
        live = [c for c in children if c.alive()]
        for c in live:
            c.cpu_s()  # the last reading before it goes
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        killed: list[str] = []
        for c in live:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                c.proc.wait()
                killed.append(c.name)
        return killed

    def stop_all(self, order: Sequence[str], *, grace_s: float = 10.0) -> list[str]:
        """Stops by role in `order`, then anything not named there."""
        killed: list[str] = []
        for role in order:
            killed += self.stop(self.of_role(role), grace_s=grace_s)
        killed += self.stop([c for c in self.children if c.role not in order], grace_s=grace_s)
        return killed


def wait_until(what: str, ready: Callable[[], bool], *, timeout_s: float, watch: Iterable[Child] = (),
               interval_s: float = 0.1) -> None:
    """Polls `ready` until it holds; fails early, with the child's last log lines, if a watched child dies."""
    watched = list(watch)
    deadline = time.monotonic() + timeout_s
    while True:
        for c in watched:
            if not c.alive():
                raise DemoError(f"{what}: {c.describe_exit()}")
        if ready():
            return
        if time.monotonic() >= deadline:
            hint = "; ".join(f"{c.name}: {tail(c.log, 3) or 'no output'}" for c in watched)
            raise DemoError(f"{what}: not ready after {timeout_s:g} s" + (f" ({hint})" if hint else ""))
        time.sleep(interval_s)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(url: str, timeout_s: float = 2.0) -> str | None:
    """The body of a local HTTP GET (our own /metrics endpoints), or None if it is not answering."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"the demo only scrapes its own loopback endpoints, not {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback http only
            body: bytes = resp.read()
            return body.decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
