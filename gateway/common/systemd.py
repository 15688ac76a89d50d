"""sd_notify without libsystemd: READY, WATCHDOG, STOPPING and STATUS over $NOTIFY_SOCKET.

The protocol is one datagram of newline-separated assignments to an AF_UNIX socket; outside systemd
(no NOTIFY_SOCKET) every call is a no-op, so the services run the same by hand and in tests.
"""

from __future__ import annotations

import os
import socket


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    # A leading '@' names an abstract socket, which Python spells with a NUL byte.
    return "\0" + addr[1:] if addr.startswith("@") else addr


def notify(*assignments: str) -> bool:
    """Sends e.g. notify("READY=1", "STATUS=serving"). Returns False when not under systemd."""
    addr = _address()
    if addr is None:
        return False
    msg = "\n".join(assignments).encode()
    # Non-blocking: a notify socket nobody reads must never stall the service's event loop; a
    # notification that cannot be queued is dropped, and the next watchdog ping tries again.
    kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    with socket.socket(socket.AF_UNIX, kind) as sock:
        try:
            sock.connect(addr)
            sock.send(msg)
        except OSError:
            return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec (systemd's advice), or None when the watchdog is off for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2_000_000, 0.01)
    except ValueError:
        return None
