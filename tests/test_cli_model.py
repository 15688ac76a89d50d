"""`sgw model evaluate` on the small labelled data set shipped in tests/data (3 held-out machines of the
physical fleet, seed 990001: 100 healthy commissioning windows each, then 12 windows of every label)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.cli.main import main

DATA = Path(__file__).parent / "data" / "fleet_small.npz"


def test_json_report_counts_every_window(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "evaluate", "--data", str(DATA), "--commission", "100", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["machines"] == 3 and r["data_windows"] == 552 and r["judged_windows"] == 252
    fwd = r["forwarded"]
    assert set(fwd) == {"healthy", "imbalance", "misalignment", "looseness", "bearing", "shift", "gear"}
    assert fwd["healthy"] <= 0.1 and min(v for k, v in fwd.items() if k != "healthy") >= 0.8
    conf = r["classifier"]["confusion"]
    labels = np.load(DATA)["labels"]
    assert {k: sum(v.values()) for k, v in conf.items()} == {k: int((labels == k).sum()) for k in conf}
    assert "gear" in conf and "gear" not in r["classifier"]["per_class_recall"]


def test_human_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "evaluate", "--data", str(DATA), "--commission", "100"]) == 0
    out = capsys.readouterr().out
    assert "forwarded by the per-device baseline" in out and "confusion" in out and "gear" in out


def test_too_few_healthy_windows_skips_the_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "evaluate", "--data", str(DATA), "--commission", "150", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["machines_skipped_too_few_healthy"] == ["0", "1", "2"] and r["judged_windows"] == 0


@pytest.mark.parametrize("case", ["missing", "shape", "not_npz", "nan"])
def test_bad_data_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    bad = tmp_path / "bad.npz"
    w = np.zeros((4, 128, 3), np.float32)
    if case == "missing":
        np.savez(bad, windows=w, labels=np.array(["healthy"] * 4))
    elif case == "shape":
        np.savez(bad, windows=np.zeros((4, 64, 3)), labels=np.array(["h"] * 4), machine_ids=np.zeros(4))
    elif case == "nan":
        w[0, 0, 0] = np.nan
        np.savez(bad, windows=w, labels=np.array(["h"] * 4), machine_ids=np.zeros(4))
    else:
        bad.write_bytes(b"hello")
    assert main(["model", "evaluate", "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgw: error:") and str(bad) in err and "\n" not in err
