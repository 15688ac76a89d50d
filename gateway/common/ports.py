"""Free loopback ports for the demo, the tests and the benchmarks: the one home for choosing them.

Why not `bind(0)`: the kernel hands out port-0 binds *and* the local end of every outgoing connection from
the same ephemeral range (`net.ipv4.ip_local_port_range`). A port chosen with `bind(0)` and closed again
before the process that will listen on it starts can meanwhile become the source port of some client's
connection (a broker client, a scrape): the listener then fails with "Address already in use". Seen with two
test workers side by side. So ports are drawn below the ephemeral range, where no outgoing connection
lands, and each concurrent runner (a test worker) can be given its own slice of that range
(`SGW_PORT_SLICE=i/n`), so two runners never draw the same port. A draw is still checked by binding it.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from gateway.errors import LocalError

# Below this, ports are commonly assigned to services; the draw starts above it.
_LOW = 15000
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_FALLBACK_EPHEMERAL_LOW = 32768  # Linux's default when /proc is not readable
SLICE_ENV = "SGW_PORT_SLICE"


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def _span() -> range:
    """This runner's part of the non-ephemeral range."""
    low, high = _LOW, _ephemeral_low()
    if high - low < 1000:  # an unusual ip_local_port_range: fall back to the whole non-privileged range
        low, high = 1024, max(high, 2024)
    raw = os.environ.get(SLICE_ENV, "")
    if raw:
        try:
            index, count = (int(p) for p in raw.split("/", 1))
        except ValueError as e:
            raise LocalError(f"{SLICE_ENV}={raw!r}: expected INDEX/COUNT, e.g. 0/2") from e
        if not 0 <= index < count:
            raise LocalError(f"{SLICE_ENV}={raw!r}: INDEX must be in 0..COUNT-1")
        width = (high - low) // count
        low = low + index * width
        high = low + width
    return range(low, high)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that are free now, outside the ephemeral range; held at once while drawn."""
    span = _span()
    rng = random.SystemRandom()
    socks: list[socket.socket] = []
    try:
        for _ in range(64 * n):
            if len(socks) == n:
                break
            port = rng.choice(span)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise LocalError(f"could not find {n} free ports in {span.start}..{span.stop - 1} on {host}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
