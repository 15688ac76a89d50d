"""A userspace TCP proxy on 127.0.0.1 that a test controls: the network between an agent and the broker.

    with TcpProxy(upstream_port=broker.port) as proxy:   # listens on proxy.port
        ...point the agent at proxy.port...
        proxy.partition("blackhole")   # nothing passes either way; connections stay open (cable pulled)
        proxy.partition("drop")        # every connection is reset now, new ones are reset at once
        proxy.resume()                 # traffic flows again (held bytes are delivered, like TCP would)

"blackhole" stops reading from both sides, so unsent bytes wait in the kernel's buffers exactly as
they would behind a dead link: if the partition is healed before either end gives up (MQTT keepalive,
TCP timeouts), the stream continues intact. Connections opened during a blackhole are accepted by the
kernel but not connected upstream until `resume()`, so a TLS handshake just hangs (a SYN to a
partitioned host would time out; this is the closest a userspace proxy gets). "drop" is a partition
that the endpoints notice at once: RST on every connection (SO_LINGER 0) and on every new one.

Threads: one accept loop, two pumps per connection. Every blocking call has a short timeout so
`close()` always ends every thread; counters (`connections`, `bytes_up`, `bytes_down`) are for tests.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Literal

HOST = "127.0.0.1"
_TICK = 0.05
_CHUNK = 65536
Mode = Literal["pass", "blackhole", "drop"]


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (what a firewall's REJECT or a crashed middlebox looks like)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Conn:
    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._ended: set[str] = set()

    def run(self) -> None:
        """Connect upstream (waiting while the link is down), then pump both ways until either side ends."""
        proxy = self.proxy
        while proxy.mode != "pass":
            if proxy.mode == "drop" or proxy.stopping.is_set() or self.closed.is_set():
                self.close(reset=True)
                return
            time.sleep(_TICK)
        try:
            self.upstream = socket.create_connection((proxy.upstream_host, proxy.upstream_port), timeout=5)
        except OSError:
            self.close(reset=True)
            return
        for s in (self.client, self.upstream):
            s.settimeout(_TICK)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        down = threading.Thread(target=self._pump, args=(self.upstream, self.client, "down"), daemon=True,
                                name="tcpproxy-down")
        down.start()
        self._pump(self.client, self.upstream, "up")
        down.join(5)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        proxy = self.proxy
        while not self.closed.is_set():
            mode = proxy.mode
            if mode == "drop":
                self.close(reset=True)
                return
            if mode == "blackhole":
                time.sleep(_TICK)  # read nothing: the sender's bytes wait in kernel buffers
                continue
            try:
                data = src.recv(_CHUNK)
            except TimeoutError:
                continue
            except OSError:
                self.close(reset=True)
                return
            if not data:  # orderly close from src: pass the FIN on, let the other pump finish
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                self._half_closed(direction)
                return
            if not self._send(dst, data):
                self.close(reset=True)
                return
            proxy.count(direction, len(data))

    def _send(self, dst: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if self.closed.is_set() or self.proxy.mode == "drop":
                return False
            if self.proxy.mode == "blackhole":
                time.sleep(_TICK)
                continue
            try:
                sent = dst.send(view)
            except TimeoutError:
                continue
            except OSError:
                return False
            view = view[sent:]
        return True

    def _half_closed(self, direction: str) -> None:
        with self._lock:
            self._ended.add(direction)
            both = len(self._ended) == 2
        if both:
            self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        for s in (self.client, self.upstream):
            if s is None:
                continue
            if reset:
                _reset(s)
            else:
                with contextlib.suppress(OSError):
                    s.close()
        self.proxy.forget(self)


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream_host`:`upstream_port` until `close()`."""

    def __init__(self, upstream_port: int, *, upstream_host: str = HOST, port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.mode: Mode = "pass"
        self.stopping = threading.Event()
        self.connections = 0  # accepted and forwarded since start
        self.refused = 0  # reset at once during a "drop" partition
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, port))
        self._listener.listen(64)
        self._listener.settimeout(_TICK)
        self.port: int = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="tcpproxy-accept")
        self._acceptor.start()

    # -- control -----------------------------------------------------------------------------------
    def partition(self, mode: Literal["blackhole", "drop"] = "blackhole") -> None:
        if mode not in ("blackhole", "drop"):
            raise ValueError(f"unknown partition mode {mode!r}")
        self.mode = mode
        if mode == "drop":
            for conn in self.open_connections():
                conn.close(reset=True)

    def resume(self) -> None:
        self.mode = "pass"

    def open_connections(self) -> list[_Conn]:
        with self._lock:
            return list(self._conns)

    @property
    def active(self) -> int:
        return len(self.open_connections())

    def close(self) -> None:
        """Stop accepting, reset every connection, join every thread (bounded)."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(5)
        for conn in self.open_connections():
            conn.close(reset=True)
        for t in list(self._threads):
            t.join(5)

    # -- internals --------------------------------------------------------------------------------------
    def count(self, direction: str, n: int) -> None:
        with self._lock:
            if direction == "up":
                self.bytes_up += n
            else:
                self.bytes_down += n

    def forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode == "drop":
                _reset(client)
                with self._lock:
                    self.refused += 1
                continue
            conn = _Conn(self, client)
            with self._lock:
                self.connections += 1
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=conn.run, daemon=True, name="tcpproxy-conn")
            self._threads.append(t)
            t.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
