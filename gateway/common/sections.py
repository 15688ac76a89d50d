"""Config sections the agent and the gateway share, key for key and message for message.

Only what is genuinely the same lives here: `[metrics]` (the services differ only in the default port,
which each overrides). `[log]` and `[mqtt]` look alike but are not: the gateway validates log values with
its own messages where the agent relies on the loader's, and the two `[mqtt]` tables differ in keys,
defaults and ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.common.config import require_range


@dataclass(frozen=True, kw_only=True)
class MetricsSection:
    """`[metrics]`: the Prometheus endpoint; port 0 = off."""

    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        require_range("metrics.port", self.port, 0, 65535)
