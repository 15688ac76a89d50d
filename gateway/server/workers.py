"""`[gateway] workers = N`: one supervisor process and N worker processes under one service.

Why processes: the gateway's receive path is Python and holds the GIL, so one process uses about one
core (docs/PERFORMANCE.md); a host with more cores runs more workers. Each worker is a complete
`sgw gateway` (`--worker K`, config from `config.for_worker`): its own identity (ids.worker_id, CN
sgw-gateway-<id>.w<K>; under `use_username_as_clientid` the CN is the MQTT client id, so workers sharing
one certificate would disconnect each other), its own persistent session in the instance's share group
(the broker spreads the telemetry over them), its own pending-result rows and downlink sender, and its
own metrics port (docs/OPERATIONS.md, "Workers", says why one per worker).

The supervisor is what systemd sees (main PID, Type=notify, NotifyAccess=main). Workers get a private
NOTIFY_SOCKET: their READY / WATCHDOG / STOPPING datagrams come here, attributed to a worker by the
sender's pid (SCM_CREDENTIALS), and the supervisor alone talks to systemd:
- READY=1 once every worker has been ready once; STATUS says how many are serving;
- a worker that exits is started again after a backoff (reset once it ran RESET_AFTER_S); exit code 2
  is a configuration error that would repeat, so it stops the whole service instead of looping;
- a worker that is not ready within START_TIMEOUT_S, or stops pinging its watchdog (its network thread
  stalled, service.STALL_S) for WORKER_WATCHDOG_S, is SIGKILLed and started again; nothing is lost:
  its unacked inputs stay in its session (redelivered to it on restart) and stored results are
  republished from the store;
- SIGTERM / SIGINT go to every worker (each drains as a single gateway does), SIGHUP too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from gateway.common import systemd
from gateway.common.backoff import Backoff

log = logging.getLogger("sgw.gateway")

START_TIMEOUT_S = 120.0  # model load and registry replay state of a large fleet
WORKER_WATCHDOG_S = 60.0  # like WatchdogSec= in sgw-gateway.service: the worker pings every 30 s
RESET_AFTER_S = 30.0  # a worker that ran this long since READY starts its backoff from the beginning
STOP_TIMEOUT_S = 19.0  # inside the unit's TimeoutStopSec=20s; a worker's own drain gives up after 10 s
CONFIG_ERROR = 2  # the CLI's exit code for a LocalError / ConfigError
_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked worker: SIGTERM (a clean drain) if the supervisor dies, so no worker outlives it
    outside systemd (under it, KillMode=mixed ends the rest of the unit too). Best effort: a sandbox
    that refuses prctl leaves it to systemd."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready_at: float | None = None
    last_ping: float = 0.0
    restart_at: float | None = 0.0  # due now; None while running
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.5, max_s=30.0))
    starts: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class Supervisor:
    def __init__(self, config: Path, count: int, passthrough: list[str]) -> None:
        self.config = config
        self.workers = [Worker(k) for k in range(1, count + 1)]
        self.passthrough = passthrough
        self._stop = False
        self._hup = False
        self._announced = False
        self._fatal: str | None = None
        self._unclean = False  # a worker did not exit 0 when asked to stop
        self._last_status = ""

    # -- signals ------------------------------------------------------------------------------------

    def _on_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self._stop = True

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._hup = True

    # -- workers ------------------------------------------------------------------------------------

    def _argv(self, w: Worker) -> list[str]:
        return [sys.executable, "-m", "gateway", "gateway", "--config", str(self.config),
                "--worker", str(w.index), *self.passthrough]

    def _spawn(self, w: Worker, env: dict[str, str], now: float) -> None:
        w.proc = subprocess.Popen(self._argv(w), env=env, stdin=subprocess.DEVNULL,
                                  preexec_fn=_die_with_parent)  # noqa: PLW1509 - one thread here
        w.started, w.last_ping, w.ready_at, w.restart_at = now, now, None, None
        w.starts += 1
        fields = {"worker": w.index, "pid": w.proc.pid, "start": w.starts}
        log.info("worker started", extra={"fields": fields})

    def _exited(self, w: Worker, now: float) -> None:
        assert w.proc is not None  # noqa: S101 - only called for a started worker
        code = w.proc.returncode
        w.proc = None
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        if self._stop:
            self._unclean = self._unclean or code != 0
            log.info("worker stopped", extra={"fields": {"worker": w.index, "how": how}})
            return
        if code == CONFIG_ERROR:
            self._fatal = f"worker {w.index}: configuration error ({how})"
            log.error("worker refused its configuration; stopping", extra={"fields": {"worker": w.index}})
            return
        if w.ready_at is not None and now - w.ready_at >= RESET_AFTER_S:
            w.backoff.reset()
        delay = w.backoff.next_delay()
        w.restart_at = now + delay
        log.warning("worker exited, restarting", extra={"fields": {"worker": w.index, "how": how,
                                                                    "restart_in_s": round(delay, 2)}})

    def _kill(self, w: Worker, why: str) -> None:
        if w.proc is not None and w.proc.poll() is None:
            log.error("worker unresponsive, killing it", extra={"fields": {"worker": w.index, "why": why}})
            w.proc.kill()

    def _notified(self, sock: socket.socket, now: float) -> None:
        while True:
            try:
                data, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
            except (BlockingIOError, InterruptedError):
                return
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CREDS.unpack(payload[:_CREDS.size])[0]
            w = next((w for w in self.workers if pid is not None and w.pid == pid), None)
            if w is None:
                continue  # not one of ours (or already reaped): ignored
            lines = data.decode(errors="replace").splitlines()
            if "READY=1" in lines and w.ready_at is None:
                w.ready_at = now
                log.info("worker ready", extra={"fields": {"worker": w.index, "pid": pid}})
            if "WATCHDOG=1" in lines or "READY=1" in lines:
                w.last_ping = now

    def _status(self) -> None:
        ready = sum(1 for w in self.workers if w.pid is not None and w.ready_at is not None)
        text = f"{ready}/{len(self.workers)} workers serving"
        if not self._announced and ready == len(self.workers):
            self._announced = True
            systemd.ready(text)
            log.info("gateway workers serving", extra={"fields": {"workers": len(self.workers)}})
        elif text != self._last_status:
            systemd.status(text)
        self._last_status = text

    # -- run ------------------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        watchdog = systemd.watchdog_interval_s()
        with tempfile.TemporaryDirectory(prefix="sgw-gateway-") as tmp:  # 0700: only our user reaches it
            path = str(Path(tmp) / "notify")
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            with socket.socket(socket.AF_UNIX, kind) as sock, selectors.DefaultSelector() as sel:
                sock.bind(path)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                sel.register(sock, selectors.EVENT_READ)
                env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "WATCHDOG_USEC")}
                env["NOTIFY_SOCKET"] = path
                env["WATCHDOG_USEC"] = str(int(WORKER_WATCHDOG_S * 1e6))
                self._loop(sock, sel, env, watchdog)
        if self._fatal is not None:
            sys.stderr.write(f"sgw: error: {self._fatal}\n")
            return CONFIG_ERROR
        return 1 if self._unclean else 0

    def _loop(self, sock: socket.socket, sel: selectors.BaseSelector, env: dict[str, str],
              watchdog: float | None) -> None:
        next_ping = 0.0
        while not self._stop and self._fatal is None:
            now = time.monotonic()
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    self._exited(w, now)
                if w.proc is None and w.restart_at is not None and now >= w.restart_at and not self._stop:
                    self._spawn(w, env, now)
                elif w.pid is not None:
                    if w.ready_at is None and now - w.started > START_TIMEOUT_S:
                        self._kill(w, f"not ready after {START_TIMEOUT_S:.0f} s")
                    elif w.ready_at is not None and now - w.last_ping > WORKER_WATCHDOG_S:
                        self._kill(w, f"no watchdog ping for {WORKER_WATCHDOG_S:.0f} s")
            if self._hup:
                self._hup = False
                self._signal_all(signal.SIGHUP)
            if watchdog is not None and now >= next_ping:
                systemd.watchdog()
                next_ping = now + watchdog
            self._status()
            if sel.select(timeout=0.2):
                self._notified(sock, time.monotonic())
        self._shutdown()

    def _signal_all(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.pid is not None and w.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def _shutdown(self) -> None:
        self._stop = True
        systemd.stopping()
        log.info("stopping: draining every worker", extra={"fields": {"workers": len(self.workers)}})
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                fields = {"worker": w.index, "timeout_s": STOP_TIMEOUT_S}
                log.error("worker did not drain in time, killing it", extra={"fields": fields})  # noqa: TRY400
                w.proc.kill()
                w.proc.wait(10)
            self._exited(w, time.monotonic())
        log.info("stopped")
