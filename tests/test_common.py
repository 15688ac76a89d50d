"""The shared edges: strict config loading, log lines, sd_notify, backoff."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from gateway.common import systemd
from gateway.common.backoff import Backoff
from gateway.common.config import file_field, load_toml
from gateway.common.logs import JsonFormatter, RateLimitedLog, TextFormatter
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Inner:
    key_file: Path = file_field()
    port: int = 1883
    rate: float = 1.0
    policy: Literal["drop_oldest", "refuse_newest"] = "drop_oldest"


@dataclass(frozen=True)
class Conf:
    inner: Inner
    names: list[str] = field(default_factory=list)
    flag: bool = False


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "k.key").write_bytes(b"x")
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_config_loads_and_resolves_paths(tmp_path: Path) -> None:
    conf = load_toml(_write(tmp_path, 'names = ["a"]\n[inner]\nkey_file = "k.key"\nrate = 2\n'), Conf)
    assert conf.names == ["a"]
    assert conf.inner.key_file == tmp_path / "k.key"
    assert conf.inner.rate == 2.0
    assert isinstance(conf.inner.rate, float)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[inner]\nkey_file = "k.key"\nbogus = 1\n', "inner.bogus: unknown key"),
        ('[inner]\nkey_file = "k.key"\nport = "x"\n', "inner.port: expected an integer"),
        ('[inner]\nkey_file = "k.key"\nport = true\n', "inner.port: expected an integer"),
        ('[inner]\nkey_file = "nope.key"\n', "inner.key_file: file not found"),
        ('[inner]\nkey_file = "k.key"\npolicy = "drop_all"\n', "inner.policy: expected one of"),
        ("flag = true\n", "inner: required key is missing"),
        ('[inner]\nkey_file = "k.key"\n[other]\n', "other: unknown key"),
        ("[inner\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_toml(_write(tmp_path, text), Conf)


NOBODY = 65534

# Runs in a child started as root: it imports everything first, then drops for good to nobody (no
# supplementary groups) before any config is read, so the key file is opened with nobody's rights and the
# kernel's permission check is real. Dropping after the imports keeps the child independent of whether
# nobody may read the interpreter (a venv whose python lives under /root, for instance).
_AS_NOBODY = f"""
import json, os, sys
from pathlib import Path
from gateway.common.config import load_toml
from gateway.errors import ConfigError
from tests.test_common import Conf
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
out = {{"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups()}}
try:
    conf = load_toml(Path(sys.argv[1]), Conf)
    out["loaded"] = str(conf.inner.key_file)
except ConfigError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def _load_as_nobody(config: Path) -> dict[str, object]:
    res = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(config)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    assert (out["uid"], out["euid"], out["gid"], out["groups"]) == (NOBODY, NOBODY, NOBODY, []), out
    return out


def test_config_unreadable_key_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        p = _write(tmp_path, '[inner]\nkey_file = "k.key"\n')
        (tmp_path / "k.key").chmod(0)
        with pytest.raises(ConfigError, match="permission denied"):
            load_toml(p, Conf)
        return
    # As root (how CI runs) the load happens in a child that has dropped to nobody. pytest's tmp_path is
    # private to root, so the config lives in a fresh world-traversable directory.
    with tempfile.TemporaryDirectory(prefix="sgw-nobody-") as d:
        home = Path(d)
        home.chmod(0o755)
        p = _write(home, '[inner]\nkey_file = "k.key"\n')
        p.chmod(0o644)
        key = home / "k.key"
        key.chmod(0o644)
        # Control: nobody reaches and loads the very same config while the key is readable ...
        assert _load_as_nobody(p).get("loaded") == str(key)
        # ... and is refused, with the key named, once the key is mode 0000.
        key.chmod(0)
        err = str(_load_as_nobody(p).get("error", ""))
        assert "permission denied" in err and "inner.key_file" in err, err


def _record(msg: str, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("sgw.test", logging.WARNING, __file__, 1, msg, None, None)
    rec.fields = fields
    return rec


def test_log_lines_are_single_and_never_carry_bytes() -> None:
    rec = _record("rejected\nsecond line", reason="bad_auth", payload=b"\x01secret")
    text = TextFormatter().format(rec)
    assert "\n" not in text
    assert "secret" not in text
    assert "payload=<7 bytes>" in text
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["reason"] == "bad_auth"
    assert doc["payload"] == "<7 bytes>"
    assert doc["level"] == "warning"


def test_rate_limited_log_counts_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("sgw.rl"), interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="sgw.rl"):
        for _ in range(100):
            log.emit("dev-1:replay", "rejected", {"reason": "replay"})
    assert len(caplog.records) == 1


def test_sd_notify_sends_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.ready("serving")
        assert server.recv(4096) == b"READY=1\nSTATUS=serving"
        assert systemd.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
        assert systemd.stopping()
        assert server.recv(4096) == b"STOPPING=1"


def test_sd_notify_is_a_noop_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.ready()
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval_s() == 2.0


def test_backoff_grows_with_jitter_and_caps() -> None:
    import random

    b = Backoff(initial_s=0.1, max_s=1.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(20)]
    assert all(0.05 <= d <= 1.05 for d in delays)
    assert len(set(delays)) > 10
    b.reset()
    assert b.next_delay() <= 0.15


def test_sd_notify_never_blocks_on_a_full_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        # Nobody reads: the queue fills and later sends must fail fast instead of blocking.
        results = [systemd.watchdog() for _ in range(2000)]
    assert results[0]
    assert not all(results)
