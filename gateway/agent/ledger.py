"""`sgw agent --ledger PATH`: one JSON line per forwarded window, for audits and end-to-end tests. The
one home of the format: the agent writes it (`Ledger`), the demo and the tests read it (`read`).

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
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.errors import ConfigError


@dataclass(frozen=True)
class Line:
    device: str
    window_seq: int  # the sensor window's number in this agent run
    reason: str  # anomaly | summary
    label: str | None  # the simulator's true state of the machine for that window, when known
    epoch: int
    counter: int

    @property
    def key(self) -> tuple[str, int, int]:
        """(device, epoch, counter): the idempotency key its result carries."""
        return (self.device, self.epoch, self.counter)

    @property
    def window(self) -> tuple[str, int]:
        return (self.device, self.window_seq)


def encode(line: Line) -> bytes:
    return json.dumps(asdict(line), separators=(",", ":")).encode() + b"\n"


def _decode(text: str) -> Line:
    doc = json.loads(text)
    line = Line(**doc)  # TypeError: a key missing or unknown
    ints = (line.window_seq, line.epoch, line.counter)
    if not (isinstance(line.device, str) and isinstance(line.reason, str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in ints)
            and (line.label is None or isinstance(line.label, str))):
        raise ValueError("a field has the wrong type")
    return line


def read(path: Path) -> list[Line]:
    """Every line of a ledger file; none if the file is missing. A torn line (the agent was killed
    mid-write: not JSON) is skipped; a JSON line that is not a ledger line raises ValueError naming it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for n, row in enumerate(text.splitlines(), 1):
        try:
            out.append(_decode(row))
        except json.JSONDecodeError:
            continue  # torn: cut short by a kill mid-write (the next run starts a line of its own)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: line {n} is not a ledger line ({exc})") from None
    return out


class Ledger:
    def __init__(self, path: Path, *, batch: int = 64, interval_s: float = 1.0) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            size = os.fstat(self._fd).st_size
            # A line torn by a kill of the previous run ends here, so this run's first line is not glued
            # to it (and lost with it).
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                os.write(self._fd, b"\n")
        except OSError as exc:
            raise ConfigError(f"--ledger: cannot open {path}: {exc.strerror or exc}") from None
        self._buf: list[bytes] = []
        self._batch = batch
        self._interval = interval_s
        self._last = time.monotonic()

    def append(self, *, device: str, window_seq: int, reason: str, label: str | None, epoch: int,
               counter: int) -> None:
        self._buf.append(encode(Line(device, window_seq, reason, label, epoch, counter)))
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
