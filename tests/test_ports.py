"""gateway/common/ports.py: ports drawn outside the ephemeral range, disjoint per test worker."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.common import ports
from gateway.errors import LocalError


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_draws_are_distinct_bindable_and_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ports.SLICE_ENV, raising=False)
    drawn = ports.free_ports(20)
    assert len(set(drawn)) == 20
    assert all(p < _ephemeral_low() for p in drawn)
    for p in drawn:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_two_slices_never_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[set[int]] = []
    for index in (0, 1):
        monkeypatch.setenv(ports.SLICE_ENV, f"{index}/2")
        seen.append({ports.free_port() for _ in range(200)})
    assert seen[0] and seen[1]
    assert max(seen[0]) < min(seen[1])


def test_a_port_in_use_is_never_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ports.SLICE_ENV, "0/1")
    held = []
    try:
        for p in ports.free_ports(50):
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            s.listen()
            held.append(s)
        busy = {s.getsockname()[1] for s in held}
        assert not busy & set(ports.free_ports(200))
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("value", ["2/2", "x", "1", "-1/2"])
def test_a_bad_slice_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ports.SLICE_ENV, value)
    with pytest.raises(LocalError, match=ports.SLICE_ENV):
        ports.free_port()
