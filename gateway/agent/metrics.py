"""The agent's Prometheus series (names fixed by docs/ARCHITECTURE.md), on an optional HTTP port.

Own registry, so tests can build several agents in one process and nothing global leaks in.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gateway import __version__
from gateway.agent.link import REFUSAL_REASONS
from gateway.agent.outbox import DROP_REASONS
from gateway.agent.pipe_format import REFUSE_REASONS
from gateway.agent.windowing import SourceStats
from gateway.core.downlink import COMMAND_KINDS, REJECT_REASON_NAMES
from gateway.core.reasons import DownlinkReason, ReleaseReason, RollbackReason
from gateway.errors import ConfigError

# Loopback publishes take ~0.1-1 ms; a backlog replayed after an outage takes seconds to hours.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0, 3600.0, float("inf"))


class AgentMetrics:
    def __init__(self, device_kind: str) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.windows_seen = Counter(
            "sgw_agent_windows_seen", "Windows read from the sensor source", registry=r
        )
        self.windows_forwarded = Counter(
            "sgw_agent_windows_forwarded", "Windows sealed into the outbox, by reason", ["reason"], registry=r
        )
        self.windows_filtered = Counter(
            "sgw_agent_windows_filtered", "Windows the prefilter kept on the device", registry=r
        )
        self.outbox_messages = Gauge(
            "sgw_agent_outbox_messages", "Messages waiting in the outbox", registry=r
        )
        self.outbox_bytes = Gauge("sgw_agent_outbox_bytes", "Payload bytes waiting in the outbox", registry=r)
        self.outbox_oldest_age = Gauge(
            "sgw_agent_outbox_oldest_age_seconds", "Age of the oldest message in the outbox", registry=r
        )
        self.outbox_dropped = Counter(
            "sgw_agent_outbox_dropped", "Messages the outbox dropped, by reason", ["reason"], registry=r
        )
        self.publish_latency = Histogram(
            "sgw_agent_publish_latency_seconds", "Sealed to PUBACK", buckets=LATENCY_BUCKETS, registry=r
        )
        self.reconnects = Counter("sgw_agent_reconnects", "Connections after the first", registry=r)
        self.connected = Gauge("sgw_agent_connected", "1 while connected to the broker", registry=r)
        self.receipts = Counter("sgw_agent_receipts", "Receipts from the gateway applied to the outbox",
                                registry=r)
        self.windows_receipted = Counter(
            "sgw_agent_windows_receipted", "Outbox messages the gateway confirmed it committed", registry=r
        )
        self.receipt_rejected = Counter(
            "sgw_agent_receipt_rejected", "Outbox messages the gateway refused for good (deleted), by reason",
            ["reason"], registry=r,
        )
        self.resent = Counter(
            "sgw_agent_resent", "Messages published again (no receipt within the timeout, or reconnected)",
            registry=r,
        )
        self.unreceipted = Gauge(
            "sgw_agent_unreceipted", "Messages PUBACKed by the broker and not yet receipted by the gateway",
            registry=r,
        )
        self.commands = Counter(
            "sgw_agent_commands", "Commands from the sealed downlink, by kind and outcome",
            ["kind", "outcome"], registry=r,
        )
        self.downlink_refused = Counter(
            "sgw_agent_downlink_refused", "Downlink messages refused (forged, replayed, ...), by reason",
            ["reason"], registry=r,
        )
        self.connect_refused = Counter(
            "sgw_agent_connect_refused",
            "Connections the broker refused or closed on purpose (e.g. a revoked certificate), by reason",
            ["reason"], registry=r,
        )
        self.model_refused = Counter(
            "sgw_agent_model_refused", "Model releases refused (unsigned, tampered, ...), by reason",
            ["reason"], registry=r,
        )
        self.model_switches = Counter(
            "sgw_agent_model_switches", "Switches to a newly deployed model release", registry=r
        )
        self.model_rollbacks = Counter(
            "sgw_agent_model_rollbacks",
            "Rollbacks the agent made by itself after an unconfirmed switch (load, misfit, selftest, "
            "crash_loop)", ["reason"], registry=r,
        )
        self.model_probation = Gauge(
            "sgw_agent_model_probation", "1 while the last model switch is on probation (not yet confirmed)",
            registry=r,
        )
        self.model_info = Gauge(
            "sgw_agent_model_info", "The model release that runs (1), by model and version",
            ["model", "version"], registry=r,
        )
        self.build_info = Gauge(
            "sgw_agent_build_info", "Agent version and sensor kind", ["version", "device_kind"], registry=r
        )
        self.commissioning = Gauge(
            "sgw_agent_commissioning", "1 while the agent learns its machine's normal (no anomalies yet)",
            registry=r,
        )
        self.commissioning_progress = Gauge(
            "sgw_agent_commissioning_progress", "Share of the commissioning windows collected (0-1)",
            registry=r,
        )
        self.source_overruns = Counter(
            "sgw_agent_source_overruns", "Reads that found the sensor's kernel buffer full", registry=r
        )
        self.source_gaps = Counter(
            "sgw_agent_source_gaps", "Breaks in the sensor's sample clock (overruns included)", registry=r
        )
        self.source_refused = Counter(
            "sgw_agent_source_refused", "Malformed frames or lines from a pipe source, by reason", ["reason"],
            registry=r,
        )
        self.build_info.labels(version=__version__, device_kind=device_kind).set(1)
        for reason in ("anomaly", "summary"):
            self.windows_forwarded.labels(reason=reason)
        for reason in DROP_REASONS:
            self.outbox_dropped.labels(reason=reason)
        for reason in REFUSAL_REASONS:
            self.connect_refused.labels(reason=reason)
        for reason in REJECT_REASON_NAMES:
            self.receipt_rejected.labels(reason=reason)
        for reason in DownlinkReason:
            self.downlink_refused.labels(reason=reason.value)
        for why in ReleaseReason:
            self.model_refused.labels(reason=why.value)
        for back in RollbackReason:
            self.model_rollbacks.labels(reason=back.value)
        for kind in COMMAND_KINDS:
            for outcome in ("ok", "error"):
                self.commands.labels(kind=kind, outcome=outcome)
        for reason in REFUSE_REASONS:
            self.source_refused.labels(reason=reason)
        self._dropped_seen: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._source_seen = SourceStats()

    def sync_dropped(self, dropped: dict[str, int]) -> None:
        """The outbox counts drops itself; mirror the increments since the last call."""
        for reason, total in dropped.items():
            delta = total - self._dropped_seen.get(reason, 0)
            if delta > 0:
                self.outbox_dropped.labels(reason=reason).inc(delta)
                self._dropped_seen[reason] = total

    def sync_source(self, stats: SourceStats) -> None:
        """Live sources (IIO, pipe) count overruns, gaps and refusals themselves; mirror the increments."""
        seen = self._source_seen
        if stats.overruns > seen.overruns:
            self.source_overruns.inc(stats.overruns - seen.overruns)
            seen.overruns = stats.overruns
        if stats.gaps > seen.gaps:
            self.source_gaps.inc(stats.gaps - seen.gaps)
            seen.gaps = stats.gaps
        for reason, total in stats.refused.items():
            delta = total - seen.refused.get(reason, 0)
            if delta > 0 and reason in REFUSE_REASONS:
                self.source_refused.labels(reason=reason).inc(delta)
                seen.refused[reason] = total

    def serve(self, host: str, port: int) -> None:
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"metrics.port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
