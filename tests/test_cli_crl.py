"""`sgw ca crl --check --json`: one {path, next_update, days_left, ok} per CRL copy mosquitto may read,
the same exit code as the text form, and the problems still on stderr."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from tests.support.cli import run_cli
from tests.support.provision import provision


def _check(home: Path, *extra: str) -> tuple[int, list[dict[str, Any]], str]:
    rc, out, err = run_cli(["ca", "crl", "--dir", str(home), "--check", "--json", *extra])
    data = json.loads(out)
    assert isinstance(data, list)
    return rc, data, err


def test_check_json_lists_every_copy_with_its_validity(tmp_path: Path) -> None:
    prov = provision(tmp_path / "home", [])
    rc, _, err = run_cli(["broker", "config", "--dir", str(prov.home), "--out", str(tmp_path / "broker"),
                          "--port", "18883", "--run-as-root", "--force"])
    assert rc == 0, err
    rc, data, err = _check(prov.home)
    assert rc == 0 and err == "", err
    assert [Path(d["path"]).name for d in data] == ["crl.pem", "crl.pem"]
    assert Path(data[0]["path"]) == prov.home / "ca" / "crl.pem"
    assert Path(data[1]["path"]).resolve().is_relative_to((tmp_path / "broker").resolve())
    for d in data:
        assert set(d) == {"path", "next_update", "days_left", "ok"}
        assert d["ok"] is True
        next_update = dt.datetime.fromisoformat(d["next_update"])
        assert next_update.tzinfo is not None
        left = (next_update - dt.datetime.now(dt.UTC)).total_seconds() / 86400
        assert isinstance(d["days_left"], float) and abs(d["days_left"] - left) < 0.1
        assert 300 < d["days_left"] <= 366


def test_check_json_flags_short_validity_and_unreadable_copies_and_exits_1(tmp_path: Path) -> None:
    prov = provision(tmp_path / "home", [])
    rc, _, err = run_cli(["broker", "config", "--dir", str(prov.home), "--out", str(tmp_path / "broker"),
                          "--port", "18883", "--run-as-root", "--force"])
    assert rc == 0, err
    rc, data, err = _check(prov.home, "--days", "10000")
    assert rc == 1 and all(d["ok"] is False and d["days_left"] is not None for d in data), data
    assert err.count("expires") == len(data) == 2

    broker_copy = Path(data[1]["path"])
    broker_copy.write_text("not a CRL\n")
    rc, data, err = _check(prov.home)
    assert rc == 1
    assert data[0]["ok"] is True
    assert data[1] == {"path": str(broker_copy), "next_update": None, "days_left": None, "ok": False}
    assert "unreadable" in err


def test_text_form_unchanged_and_json_needs_check(tmp_path: Path) -> None:
    prov = provision(tmp_path / "home", [])
    rc, out, _ = run_cli(["ca", "crl", "--dir", str(prov.home), "--check"])
    assert rc == 0 and out.startswith("CRL ") and "valid until" in out
    rc, out, err = run_cli(["ca", "crl", "--dir", str(prov.home), "--json"])
    assert rc == 2 and out == "" and "--json goes with --check" in err
