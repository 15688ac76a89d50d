"""Config sections the agent and the gateway share, key for key and message for message.

Only what is genuinely the same lives here: `[metrics]` (the services differ only in the default port,
which each overrides) and `[log]` (its choices are Literal types, so the loader refuses a bad value with a
message naming the key). `[mqtt]` looks alike but is not: the two tables differ in keys, defaults and
ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.common.config import require_range
from gateway.common.logs import LogFormat, LogLevel


@dataclass(frozen=True, kw_only=True)
class MetricsSection:
    """`[metrics]`: the Prometheus endpoint; port 0 = off."""

    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        require_range("metrics.port", self.port, 0, 65535)


@dataclass(frozen=True, kw_only=True)
class LogSection:
    """`[log]`: one event per line on stderr; `json` for log shippers."""

    level: LogLevel = "info"
    format: LogFormat = "text"
