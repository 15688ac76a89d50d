"""Logging for the services: one event per line on stderr, text for journald or JSON for log shippers.

Structured fields travel in `extra={"fields": {...}}`. Values that look like secrets are never logged: callers
pass ids, reasons and counts, never keys or payload bytes, and bytes values are refused outright here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")


def _safe(value: Any) -> Any:
    # Payloads and keys are bytes; a log line must never carry them.
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# Fields on every line this process writes (a gateway worker's index: N workers share one journal).
_PROCESS_FIELDS: dict[str, Any] = {}


def tag_process(**fields: str | int) -> None:
    _PROCESS_FIELDS.update(fields)


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    own = fields if isinstance(fields, Mapping) else {}
    return {**_PROCESS_FIELDS, **own} if _PROCESS_FIELDS else own


class TextFormatter(logging.Formatter):
    """`level logger: message key=value ...`: journald adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{record.levelname.lower()} {record.name}: {record.getMessage()}"]
        parts.extend(f"{k}={_safe(v)}" for k, v in _fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info).splitlines()[-1])
        return line.replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _fields(record).items():
            doc[k] = _safe(v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(doc, separators=(",", ":"))


def setup_logging(level: str = "info", fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """At most one line per key per interval; suppressed lines are counted into the next one.

    A hostile device must not be able to flood the journal with rejections.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0, max_keys: int = 4096) -> None:
        self._logger = logger
        self._interval = interval_s
        self._max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}

    def emit(self, key: str, msg: str, fields: Mapping[str, Any] | None = None, *,
             level: int = logging.WARNING) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last < self._interval:
            if len(self._last) < self._max_keys or key in self._last:
                self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) >= self._max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        out = dict(fields or {})
        if suppressed:
            out["suppressed"] = suppressed
        self._logger.log(level, msg, extra={"fields": out})
