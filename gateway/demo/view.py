"""One reading of the whole demo, as the live view and the progress lines show it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class View:
    elapsed_s: float = 0.0
    devices: int = 0
    agents_alive: int = 0
    attack: bool = False
    metrics_url: str = ""
    state_dir: str = ""
    gateway_up: bool = False
    gateway_connected: bool = False
    # rates, per second
    windows_seen_rate: float = 0.0
    forwarded_rate: float = 0.0
    gateway_in_rate: float = 0.0
    results_rate: float = 0.0
    # totals
    windows_seen: float = 0.0
    forwarded: float = 0.0
    gateway_accepted: float = 0.0
    gateway_rejected: float = 0.0
    results: int = 0
    duplicates: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # predicted fault class -> results
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> label -> results
    rejections: dict[str, float] = field(default_factory=dict)
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_all_p50_ms: float | None = None
    latency_all_p99_ms: float | None = None
    outbox: dict[str, float] = field(default_factory=dict)  # device -> messages waiting
    backends: list[tuple[str, str, str]] = field(default_factory=list)  # (model, backend, requested)
    attack_sent: dict[str, int] = field(default_factory=dict)
    agent_reconnects: dict[str, float] = field(default_factory=dict)  # device -> sgw_agent_reconnects
    unreceipted: dict[str, float] = field(default_factory=dict)  # device -> PUBACKed, not yet receipted
    receipts_sent: float = 0.0  # sealed receipts the gateway sent
    command_replies: dict[str, float] = field(default_factory=dict)  # outcome -> replies at the gateway
    notes: list[str] = field(default_factory=list)
    scada: str = ""  # with --sparkplug: where a SCADA connects
    commissioning: dict[str, float] = field(default_factory=dict)  # device -> progress 0-1, while learning
    commissioned: int = 0  # devices whose baseline is in force

    @property
    def fraction_forwarded(self) -> float | None:
        return self.forwarded / self.windows_seen if self.windows_seen else None
