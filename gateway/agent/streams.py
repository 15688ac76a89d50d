"""Non-blocking reads from a character device, FIFO or stdin on the event loop.

A read in a worker thread could not be cancelled: on SIGTERM the agent would wait for the next sample
forever. So the descriptor is non-blocking and the loop waits for it to become readable. A FIFO is opened
read-write: the agent then counts as a writer itself, never sees end of file when the acquisition
program restarts, and a new writer's first frame simply follows (a torn frame is refused and counted).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path


def open_stream(path: Path) -> int:
    """A non-blocking descriptor for path ('-' = stdin). OSError propagates for the caller to word."""
    if str(path) == "-":
        fd = os.dup(0)
        os.set_blocking(fd, False)
        return fd
    flags = os.O_RDWR if stat.S_ISFIFO(path.stat().st_mode) else os.O_RDONLY
    return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)


async def read_some(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes, waiting until some are there; b'' only at end of file."""
    while True:
        try:
            return os.read(fd, limit)
        except BlockingIOError:
            pass
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():  # the reader may fire again before it is removed
        ready.set_result(None)
