"""`sgw agent --ledger PATH`: one JSON line per forwarded window, for audits and end-to-end tests.

{"device": id, "window_seq": n, "reason": "anomaly|summary", "label": <true label or null>,
 "epoch": e, "counter": c}

Lines are written after the window is committed to the outbox and fsynced in batches (every
`batch` lines or `interval_s`, and at shutdown), so after a SIGKILL or power loss the ledger may miss the
last second of windows, but never names one the outbox did not hold. It holds no sample data or keys.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gateway.errors import ConfigError


class Ledger:
    def __init__(self, path: Path, *, batch: int = 64, interval_s: float = 1.0) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise ConfigError(f"--ledger: cannot open {path}: {exc.strerror or exc}") from None
        self._buf: list[bytes] = []
        self._batch = batch
        self._interval = interval_s
        self._last = time.monotonic()

    def append(self, *, device: str, window_seq: int, reason: str, label: str | None, epoch: int,
               counter: int) -> None:
        doc = {"device": device, "window_seq": window_seq, "reason": reason, "label": label,
               "epoch": epoch, "counter": counter}
        self._buf.append(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        if len(self._buf) >= self._batch or time.monotonic() - self._last >= self._interval:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._buf:
            return
        data, self._buf = b"".join(self._buf), []
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        self.flush()
        os.close(self._fd)
