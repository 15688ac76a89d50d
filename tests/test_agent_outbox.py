"""The outbox alone: order, PUBACK deletion, bounds, expiry, session state, and durability under SIGKILL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.agent.outbox import Outbox
from gateway.errors import ConfigError
from tests.support.agent import ROOT


def _box(tmp_path: Path, **kw: object) -> Outbox:
    args: dict[str, object] = {"max_bytes": 1 << 20, "max_age_s": 3600.0, "policy": "drop_oldest"}
    args.update(kw)
    return Outbox(tmp_path / "o.db", **args)  # type: ignore[arg-type]


def test_order_ack_and_counts_survive_reopen(tmp_path: Path) -> None:
    box = _box(tmp_path)
    ids = [box.put(bytes([i]) * 100, created_ns=i, epoch=7, counter=i) for i in range(10)]
    assert box.messages == 10 and box.bytes == 1000
    rows = box.after(0, 4)
    assert [r.counter for r in rows] == [0, 1, 2, 3]
    assert [r.counter for r in box.after(rows[-1].id, 100)] == list(range(4, 10))
    for rid in ids[:3]:
        assert rid is not None
        box.ack(rid)
    assert box.commit_acks() == 3
    box.ack(ids[0])  # a duplicate PUBACK (or a dropped row) deletes nothing
    assert box.commit_acks() == 0
    box.close()
    again = _box(tmp_path)
    assert (again.messages, again.bytes) == (7, 700)
    assert [r.counter for r in again.after(0, 100)] == list(range(3, 10))
    assert not again.has_older_epoch(7) and again.has_older_epoch(8)
    again.close()


def test_epoch_is_persisted_and_never_reused(tmp_path: Path) -> None:
    box = _box(tmp_path)
    assert box.next_epoch(now_ms=1000) == 1000
    assert box.next_epoch(now_ms=1000) == 1001  # same millisecond: still new
    box.close()
    box = _box(tmp_path)
    assert box.next_epoch(now_ms=500) == 1002  # the clock went back: still new
    assert box.next_epoch(now_ms=5000) == 5000  # a reinstalled device is not stuck behind an old epoch
    box.close()


def test_drop_oldest_and_refuse_newest(tmp_path: Path) -> None:
    box = _box(tmp_path / "a", max_bytes=1000)
    for i in range(25):
        assert box.put(b"x" * 100, created_ns=i, epoch=1, counter=i) is not None
    assert box.messages == 10 and box.bytes == 1000
    assert box.dropped["full"] == 15
    assert [r.counter for r in box.after(0, 100)] == list(range(15, 25))
    assert box.put(b"y" * 2000, created_ns=0, epoch=1, counter=99) is None  # can never fit
    assert box.dropped["refused"] == 1
    box.close()
    box = _box(tmp_path / "b", max_bytes=1000, policy="refuse_newest")
    results = [box.put(b"x" * 100, created_ns=i, epoch=1, counter=i) for i in range(25)]
    assert sum(r is not None for r in results) == 10 and box.dropped["refused"] == 15
    assert [r.counter for r in box.after(0, 100)] == list(range(10))
    box.close()


def test_expire_by_age(tmp_path: Path) -> None:
    box = _box(tmp_path, max_age_s=10.0)
    for i in range(5):
        box.put(b"m", created_ns=i * 5_000_000_000, epoch=1, counter=i)
    assert box.expire(now_ns=24_000_000_000) == 3  # created at 0, 5 and 10 s: older than 10 s at 24 s
    assert [r.counter for r in box.after(0, 10)] == [3, 4]
    assert box.dropped["expired"] == 3 and box.messages == 2
    box.close()


def test_committed_puts_survive_sigkill(tmp_path: Path) -> None:
    """A child acknowledges each put on stdout after it returns; everything acknowledged must be there."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from gateway.agent.outbox import Outbox
        box = Outbox(Path({str(tmp_path / 'o.db')!r}), max_bytes=1 << 24, max_age_s=3600,
                     policy="drop_oldest")
        box.next_epoch(now_ms=1)
        for i in range(200):
            box.put(os.urandom(800), created_ns=i, epoch=1, counter=i)
            sys.stdout.write(f"{{i}}\\n"); sys.stdout.flush()
            if i == 150:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == -9, proc.stderr
    acked = [int(x) for x in proc.stdout.split()]
    assert acked[-1] == 150
    box = _box(tmp_path)
    assert [r.counter for r in box.after(0, 1000)] == acked
    assert box.next_epoch(now_ms=1) == 2
    box.close()


def test_one_agent_per_outbox(tmp_path: Path) -> None:
    box = _box(tmp_path)
    with pytest.raises(ConfigError, match="in use by another running agent"):
        _box(tmp_path)
    box.close()
    _box(tmp_path).close()  # released on close (and by the kernel if the process dies)
