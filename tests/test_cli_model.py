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


# --- --plot ------------------------------------------------------------------------------------------
def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = pytest.importorskip("matplotlib.image", reason="the plot extra (matplotlib) is not installed")
    png = tmp_path / "report.png"
    assert main(["model", "evaluate", "--data", str(DATA), "--commission", "100", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = image.imread(png)
    assert img.shape[0] == 500 and img.shape[1] == 1200  # 12 x 5 inches at 100 dpi
    assert img[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    assert "confusion" in capsys.readouterr().out  # the text report still prints


def test_plot_without_matplotlib_is_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "report.png"
    assert main(["model", "evaluate", "--data", str(DATA), "--commission", "100", "--plot", str(png)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and not png.exists()
    err = cap.err.strip()
    assert err.startswith("sgw: error:") and "sgw[plot]" in err and "\n" not in err


# --- CSV ---------------------------------------------------------------------------------------------
CSV = Path(__file__).parent / "data" / "recording_small.csv"


def _write_csv(path: Path, windows: np.ndarray, labels: np.ndarray, mids: np.ndarray, *,
               window_col: bool) -> None:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["machine_id", "label", "x", "y", "z", *(["window"] if window_col else [])])
        for i, (x, lab, mid) in enumerate(zip(windows, labels, mids, strict=True)):
            w.writerows([str(mid), lab, *(repr(float(v)) for v in s), *([i] if window_col else [])]
                        for s in x)


def test_shipped_csv_recording_is_cut_into_windows(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """recording_small.csv: pump-7 runs 300 healthy samples then 128 bearing ones, fan-2 130 healthy; an
    extra column (t_s) and a capitalised header name. Whole 128-sample windows only, never across a
    label change: pump-7 2 healthy + 1 bearing (44 samples dropped), fan-2 1 healthy (2 dropped)."""
    out = tmp_path / "rec.npz"
    assert main(["model", "import-csv", str(CSV), str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["windows"] == 4 and s["machines"] == 2 and s["dropped_samples"] == 46
    assert s["labels"] == {"bearing": 1, "healthy": 3}
    z = np.load(out)
    assert z["labels"].tolist() == ["healthy", "healthy", "bearing", "healthy"]
    assert z["machine_ids"].tolist() == ["pump-7", "pump-7", "pump-7", "fan-2"]
    small = np.load(DATA)
    h0 = small["windows"][(small["machine_ids"] == 0) & (small["labels"] == "healthy")]
    b0 = small["windows"][(small["machine_ids"] == 0) & (small["labels"] == "bearing")]
    np.testing.assert_array_equal(z["windows"][[0, 1, 2]], np.stack([h0[0], h0[1], b0[0]]).astype(np.float32))
    # refused without --force, and the file is left as it was
    before = out.read_bytes()
    assert main(["model", "import-csv", str(CSV), str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("window_col", [False, True])
def test_evaluate_reads_csv_as_the_npz_it_came_from(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    window_col: bool) -> None:
    z = np.load(DATA)
    csv_path = tmp_path / "fleet_small.csv"
    _write_csv(csv_path, z["windows"], z["labels"], z["machine_ids"], window_col=window_col)
    assert main(["model", "evaluate", "--data", str(DATA), "--commission", "100", "--json"]) == 0
    from_npz = json.loads(capsys.readouterr().out)
    assert main(["model", "evaluate", "--data", str(csv_path), "--commission", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_npz


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty file"),
    ("machine_id,label,x,y\n", "lacks column(s) z"),
    ("machine_id,label,x,y,z\nm,healthy,1,2\n", ":2: 4 columns"),
    ("machine_id,label,x,y,z\nm,healthy,1,2,zz\n", ":2: x, y, z must be numbers"),
    ("machine_id,label,x,y,z\nm,healthy,1,2,nan\n", ":2: x, y, z must be finite"),
    ("machine_id,label,x,y,z\n,healthy,1,2,3\n", ":2: empty machine_id"),
    ("machine_id,label,x,y,z\n" + "m,healthy,1,2,3\n" * 100, "no whole 128-sample window"),
    ("machine_id,label,x,y,z,window\n" + "m,healthy,1,2,3,0\n" * 100, "has 100 rows, expected 128"),
    ("machine_id,label,x,y,z,window\n" + "m,healthy,1,2,3,0\n" * 129, ":130: window '0' of machine 'm'"),
    ("machine_id,label,x,y,z,window\n" + "m,healthy,1,2,3,0\n" * 3 + "m,bearing,1,2,3,0\n", "changes label"),
])
def test_bad_csv_is_one_line_error_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   text: str, why: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    out = tmp_path / "out.npz"
    assert main(["model", "import-csv", str(bad), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sgw: error: {bad}") and why in err and "\n" not in err
    assert not out.exists() and not out.with_name("out.npz.tmp").exists()
