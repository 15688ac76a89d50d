"""A real mosquitto for tests, started from `sgw broker config` output.

- `free_port()` picks a free loopback port (write it into the config and the bundles before starting).
- `start_broker(home, out, port=...)` runs `sgw broker config --run-as-root` (tests run as root here, and
  mosquitto drops to the `mosquitto` user otherwise, which cannot read pytest's 0700 temp folders) and
  starts mosquitto; returns a `Mosquitto` that is also a context manager (stops on exit).
- `Mosquitto` controls one broker by PID: `stop()`, `reload()` (SIGHUP, waits until the broker logged
  that it reloaded), `kill()` (SIGKILL), `pause()`/`resume()` (SIGSTOP/SIGCONT), `restart()` on the same
  port, `log()` for the broker's own log text.
- `connect(identity, port)` returns a connected paho MQTT 5 client with mutual TLS and its network loop
  running; `try_connect` returns the CONNACK outcome instead of raising.

mosquitto keeps already-connected clients after a reload that revokes their certificate; only new
connections are refused. Tests that check revocation must open a new connection after `reload()`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.common import ports
from tests.support.cli import run_cli

MOSQUITTO = os.environ.get("SGW_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A free port outside the ephemeral range, in this test worker's slice (see gateway/common/ports.py)."""
    return ports.free_port(host)


class Mosquitto:
    """One mosquitto process, controlled by PID. Its stderr log goes to `log_path`."""

    def __init__(self, conf: Path, *, port: int, host: str = HOST, log_path: Path | None = None) -> None:
        self.conf = Path(conf)
        self.port = port
        self.host = host
        self.log_path = log_path or self.conf.with_name("mosquitto.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "broker not started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the listener accepts TCP connections (and the process is still alive)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"mosquitto exited early:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.2):
                return
            time.sleep(0.02)
        raise TimeoutError(f"mosquitto not listening on {self.host}:{self.port}:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "broker not started"
        os.kill(self.proc.pid, sig)

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP: re-read ACL, CRL and certificates. Returns once mosquitto logged the reload."""
        before = self.log().count("Reloading config")
        self._signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log().count("Reloading config") <= before:
            if time.monotonic() > deadline:
                raise TimeoutError("mosquitto did not log 'Reloading config' after SIGHUP")
            time.sleep(0.02)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, no persistence save: simulates a crash."""
        if self.alive:
            self._signal(signal.SIGKILL)
            assert self.proc is not None
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (clean shutdown, persistence saved); SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused broker cannot handle SIGTERM
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)

    def __enter__(self) -> Mosquitto:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_broker(home: Path, out: Path, *, port: int, extra_conf: str = "", listen: str = HOST,
                 drop_conf: Sequence[str] = (), enroll_port: int | None = None) -> Mosquitto:
    """Generate a broker config with the real CLI (`sgw broker config --run-as-root`) and start it.

    `enroll_port` adds the zero-touch enrollment listener (`--enroll-port`).
    `extra_conf` lines are appended to mosquitto.conf (e.g. "queue_qos0_messages true"); lines starting
    with an option in `drop_conf` are removed (e.g. "max_qos", to stand for a broker without that limit).
    """
    rc, _, err = run_cli(["broker", "config", "--dir", str(home), "--out", str(out), "--port", str(port),
                          "--listen", listen, "--run-as-root", "--force",
                          *(["--enroll-port", str(enroll_port)] if enroll_port else [])])
    if rc != 0:
        raise RuntimeError(f"sgw broker config failed ({rc}): {err.strip()}")
    if drop_conf:
        conf = out / "mosquitto.conf"
        lines = conf.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.split(" ", 1)[0].strip() not in drop_conf]
        assert len(kept) == len(lines) - len(drop_conf), f"not all of {drop_conf} are in {conf}"
        conf.write_text("".join(kept))
    if extra_conf:
        with (out / "mosquitto.conf").open("a") as fh:
            fh.write("\n" + extra_conf.strip() + "\n")
    return Mosquitto(out / "mosquitto.conf", port=port, host=listen).start()


@dataclass(frozen=True)
class TLSIdentity:
    """The three files a TLS client needs. `name` is the certificate CN (the broker's username)."""

    name: str
    ca_file: Path
    cert_file: Path | None
    key_file: Path | None


@dataclass
class ConnectResult:
    ok: bool
    reason: str
    client: mqtt.Client | None


def _client(identity: TLSIdentity, client_id: str | None) -> mqtt.Client:
    cid = client_id or f"t-{identity.name}-{os.getpid()}-{time.monotonic_ns()}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(identity.ca_file))
    if identity.cert_file is not None and identity.key_file is not None:
        ctx.load_cert_chain(str(identity.cert_file), str(identity.key_file))
    client.tls_set_context(ctx)
    return client


def try_connect(identity: TLSIdentity, port: int, *, host: str = HOST, client_id: str | None = None,
                timeout: float = 10.0) -> ConnectResult:
    """Connect with mutual TLS; returns whether the broker accepted (never raises for a refusal)."""
    client = _client(identity, client_id)
    done = threading.Event()
    outcome: dict[str, object] = {}

    def on_connect(c: mqtt.Client, u: object, flags: object, rc: object, props: object = None) -> None:
        outcome["rc"] = rc
        done.set()

    def on_disconnect(c: mqtt.Client, u: object, flags: object, rc: object, props: object = None) -> None:
        outcome.setdefault("rc", rc)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(host, port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        return ConnectResult(False, f"{type(exc).__name__}: {exc}", None)
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        return ConnectResult(False, "timeout", None)
    rc = outcome.get("rc")
    if getattr(rc, "is_failure", True) or "rc" not in outcome or client.is_connected() is False:
        client.loop_stop()
        with contextlib.suppress(Exception):
            client.disconnect()
        return ConnectResult(False, str(rc), None)
    return ConnectResult(True, str(rc), client)


def connect(identity: TLSIdentity, port: int, *, host: str = HOST, client_id: str | None = None,
            timeout: float = 10.0) -> mqtt.Client:
    """A connected client with its loop running; call `disconnect(client)` when done."""
    result = try_connect(identity, port, host=host, client_id=client_id, timeout=timeout)
    if not result.ok or result.client is None:
        raise ConnectionError(f"{identity.name} could not connect: {result.reason}")
    return result.client


def disconnect(client: mqtt.Client) -> None:
    with contextlib.suppress(Exception):
        client.disconnect()
    client.loop_stop()
