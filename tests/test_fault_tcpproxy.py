"""The fault-injection TCP proxy itself: pass, blackhole (held, then delivered intact), drop (RST), close."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.tcpproxy import TcpProxy


@pytest.fixture
def echo() -> Iterator[int]:
    """A loopback echo server; returns its port. Stopped (and its threads joined) after the test."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.05)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(c: socket.socket) -> None:
        c.settimeout(0.05)
        with c:
            while not stop.is_set():
                try:
                    data = c.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with contextlib.suppress(OSError):
                    c.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=serve, args=(c,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(5)
        for t in threads:
            t.join(5)
        srv.close()


def recv_exactly(s: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_pass_blackhole_resume_delivers_the_held_bytes_intact(echo: int) -> None:
    with TcpProxy(echo) as proxy, socket.create_connection(("127.0.0.1", proxy.port), 5) as c:
        c.sendall(b"hello")
        assert recv_exactly(c, 5) == b"hello"
        proxy.partition("blackhole")
        payload = bytes(range(256)) * 64  # 16 KiB, held in kernel buffers meanwhile
        c.sendall(payload)
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.recv(1)  # nothing comes back through a blackhole
        proxy.resume()
        assert recv_exactly(c, len(payload)) == payload
        assert proxy.bytes_up == 5 + len(payload)


def test_new_connection_during_blackhole_waits_and_then_works(echo: int) -> None:
    with TcpProxy(echo) as proxy:
        proxy.partition("blackhole")
        with socket.create_connection(("127.0.0.1", proxy.port), 5) as c:
            c.sendall(b"ping")
            c.settimeout(0.3)
            with pytest.raises(TimeoutError):
                c.recv(1)
            proxy.resume()
            assert recv_exactly(c, 4) == b"ping"


def test_drop_resets_open_and_new_connections_until_resume(echo: int) -> None:
    with TcpProxy(echo) as proxy:
        c = socket.create_connection(("127.0.0.1", proxy.port), 5)
        try:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            proxy.partition("drop")
            c.settimeout(5)
            with pytest.raises(ConnectionResetError):  # a reset, not an orderly EOF (b"")
                c.recv(1)
        finally:
            c.close()
        # The reset may surface on connect, send or receive.
        with pytest.raises((ConnectionResetError, BrokenPipeError)), \
                socket.create_connection(("127.0.0.1", proxy.port), 5) as c2:
            c2.settimeout(5)
            c2.sendall(b"y")
            c2.recv(1)
        proxy.resume()
        with socket.create_connection(("127.0.0.1", proxy.port), 5) as c3:
            c3.sendall(b"back")
            assert recv_exactly(c3, 4) == b"back"
        assert (proxy.connections, proxy.refused) == (2, 1)


def test_close_ends_every_connection_and_thread(echo: int) -> None:
    proxy = TcpProxy(echo)
    conns = [socket.create_connection(("127.0.0.1", proxy.port), 5) for _ in range(3)]
    try:
        for c in conns:
            c.sendall(b"z")
            assert recv_exactly(c, 1) == b"z"
        proxy.partition("blackhole")
        proxy.close()
        assert proxy.active == 0
        assert not any(t.is_alive() for t in proxy._threads)
    finally:
        for c in conns:
            c.close()
