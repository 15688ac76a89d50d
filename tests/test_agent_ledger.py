"""gateway/agent/ledger.py: the --ledger format written and read in one place; a kill mid-write loses only
the torn line, never the next run's first one."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gateway.agent.ledger import Ledger, Line, read


def _write(path: Path, *seqs: int, epoch: int = 1) -> None:
    led = Ledger(path)
    for seq in seqs:
        led.append(device="dev-1", window_seq=seq, reason="anomaly", label="bearing" if seq else None,
                   epoch=epoch, counter=seq)
    led.close()


def test_lines_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    _write(path, 0, 1)
    assert read(path) == [Line("dev-1", 0, "anomaly", None, 1, 0),
                          Line("dev-1", 1, "anomaly", "bearing", 1, 1)]
    assert read(path)[1].key == ("dev-1", 1, 1) and read(path)[1].window == ("dev-1", 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert read(tmp_path / "missing") == []


def test_a_torn_line_is_skipped_and_the_next_run_starts_its_own(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    _write(path, 0, 1)
    with path.open("ab") as f:  # a SIGKILL in the middle of a write
        f.write(b'{"device":"dev-1","window_se')
    assert [line.window_seq for line in read(path)] == [0, 1]
    _write(path, 0, epoch=2)  # the restarted agent
    assert [(line.epoch, line.window_seq) for line in read(path)] == [(1, 0), (1, 1), (2, 0)]


WRONG_TYPE = '{"device": 1, "window_seq": 0, "reason": "a", "label": null, "epoch": 1, "counter": 0}'


@pytest.mark.parametrize("bad", ['{"device": "dev-1"}', WRONG_TYPE, "[1, 2]"])
def test_a_whole_line_that_is_not_a_ledger_line_is_an_error(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "ledger.jsonl"
    _write(path, 0)
    with path.open("a") as f:
        f.write(bad + "\n")
    with pytest.raises(ValueError, match="line 2 is not a ledger line"):
        read(path)
