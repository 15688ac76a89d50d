"""The edge agent: source -> prefilter -> seal -> outbox -> MQTT, as one asyncio TaskGroup.

Tasks (named, so a traceback says which part failed):
  source     reads windows from the sensor source into a small bounded queue
  filter     scores each window at batch 1; seals anomalies and periodic summaries into the outbox
  publisher  one MQTT connection at a time; replays the outbox oldest first with bounded in-flight;
             deletes on the gateway's receipt (or PUBACK); resends what no receipt covered; reconnects
             with jittered backoff
  status     seals a HEARTBEAT into the outbox every heartbeat interval
  metrics    refreshes gauges, expires old messages, flushes the ledger
  watchdog   systemd WATCHDOG=1 from the event loop (only when systemd asked for it)

Sessions: one Sealer per process start. Its epoch is max(stored + 1, now in ms) and is fsynced into the
outbox database before the first seal, so no (key, nonce) is ever reused. Every message is sealed when it is
accepted and stored sealed, so a replay after a reconnect sends the same bytes again and the gateway's replay
window drops what it already has.

Status: BIRTH on every connect (through the outbox, so it stays in order), HEARTBEAT periodically, DEATH
on clean shutdown, and a sealed DEATH as the MQTT will. The will takes a counter at connect time and is
only published if the connection dies, so the gateway sees a gap of one counter per connection: expected.
The will is left out while the outbox holds messages of an older session (published first, it would move
the gateway to the new epoch, which then refuses them as stale_session) or a backlog spanning more than
WILL_SAFE_SPAN counters (its counter would push them out of the gateway's replay window).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy.typing as npt

from gateway import __version__
from gateway.agent import gateway_key
from gateway.agent.capture import Captured
from gateway.agent.commands import Outcome
from gateway.agent.config import AgentConfig, E2eKeys
from gateway.agent.ledger import Ledger
from gateway.agent.link import Connected, ConnectFailedError, Down, Downlink, Link, Puback, refusal_reason
from gateway.agent.metrics import AgentMetrics
from gateway.agent.models import AgentModels, ChunkResult
from gateway.agent.outbox import Outbox
from gateway.agent.publisher import Admit, Delivery, Publisher
from gateway.agent.receipts import AgentDownlink
from gateway.agent.rotation import KeyRotation, Proposal, rotation_paths
from gateway.agent.sources import Source
from gateway.agent.windowing import SourceStats
from gateway.common import systemd
from gateway.common.backoff import Backoff
from gateway.common.logs import RateLimitedLog
from gateway.core import suites
from gateway.core.codec import encode_window
from gateway.core.session import Sealer
from gateway.errors import ConfigError, ProvisioningError
from gateway.inference.engine import Prefilter
from gateway.pb import downlink_pb2 as dpb
from gateway.pb import messages_pb2 as pb

log = logging.getLogger("sgw.agent")

MAX_INFLIGHT = 256  # our own cap under the broker's Receive Maximum: enough to fill a loopback pipe
SEQ_BLOCK = 1 << 16  # window_seq is reserved in blocks: one fsync per ~87 min at 12.5 windows/s
ACK_COMMIT_BATCH = 256
ACK_COMMIT_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 10.0
EXIT_RESTART = 75  # reboot-agent: EX_TEMPFAIL, so systemd (Restart=on-failure) starts the agent again
# Half the gateway's replay window (2048 counters by default): with a will attached only while the queued
# backlog spans less than this, a will published mid-replay never pushes queued messages out of the window.
WILL_SAFE_SPAN = 1024


class Scorer(Protocol):
    """The prefilter as the agent needs it (gateway.inference.engine.Prefilter fits)."""

    def score(self, window: npt.ArrayLike) -> float: ...
    def is_anomalous(self, score: float) -> bool: ...


@dataclass(frozen=True)
class AgentOptions:
    heartbeat_s: float = 30.0
    flush_timeout_s: float = 10.0
    prefilter_version: str = ""
    exit_when_source_ends: bool = True
    max_inflight: int = MAX_INFLIGHT
    # The gateway rate-limits each device (default 200 msg/s, burst 400) and does not retry what it
    # refuses, so a backlog replayed after an outage is paced under that. 0 = unpaced.
    publish_rate: float = 100.0
    publish_burst: int = 200
    config_path: Path | None = None  # agent.toml, which a rotation started on the device rewrites


class Agent:
    def __init__(self, cfg: AgentConfig, *, e2e: E2eKeys, scorer: Scorer, source: Source, outbox: Outbox,
                 metrics: AgentMetrics, ledger: Ledger | None = None,
                 options: AgentOptions | None = None, clock_ns: Callable[[], int] = time.time_ns,
                 models: AgentModels | None = None,
                 fits: Callable[[Prefilter], str | None] | None = None) -> None:
        self.cfg = cfg
        self.opts = options or AgentOptions()
        self._e2e = e2e
        self._scorer = scorer
        self._learns = hasattr(scorer, "progress")  # a CommissioningScorer: its progress is a metric
        self._source = source
        self.outbox = outbox
        self.metrics = metrics
        self._ledger = ledger
        self._now = clock_ns
        self._started_mono = time.monotonic()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._draining = False
        self._drained = asyncio.Event()
        self._dropped_log = RateLimitedLog(log, interval_s=10.0)
        self.seen = 0
        self.forwarded = 0
        self._anomalous = False  # the last window's verdict (kept out of the self-test's healthy windows)
        period_s = source.window / source.sample_rate_hz
        self._summary_every = max(1, round(cfg.filter.summary_interval_s / period_s))
        self._since_forward = 0
        # Session state: durable before the first seal.
        self.epoch = outbox.next_epoch(self._now() // 1_000_000)
        self._next_seq = outbox.get_meta("window_seq")
        self._seq_reserved = self._next_seq + SEQ_BLOCK
        outbox.set_meta(window_seq=self._seq_reserved)
        self.sealer = Sealer(
            device_id=cfg.device.id, device_key=e2e.device_key, device_key_id=cfg.e2e.device_key_id,
            gateway_public=e2e.gateway_public, gateway_key_id=cfg.e2e.gateway_key_id, epoch=self.epoch,
            suite=cfg.e2e.suite_number, gateway_kem_public=e2e.gateway_kem_public,
        )
        self.publish_rate = self.opts.publish_rate  # set-config may change it
        self.exit_code = 0
        self._by_receipt = cfg.outbox.delete_on == "receipt"
        self._sent_upto = 0  # the newest outbox id published by this process (what is sent again is counted)
        self.downlink = AgentDownlink(cfg, e2e, outbox, metrics)
        self._rotation = (KeyRotation(rotation_paths(cfg, self.opts.config_path), cfg.e2e.device_key_id)
                          if self.opts.config_path is not None else None)
        pending = self._rotation.pending() if self._rotation is not None else None
        if pending is not None:  # the registry may already seal commands to the new key
            self.downlink.opener.add_device_key(pending.key_id, pending.e2e_key)
        self.models = models
        self._fits = fits

    # -- lifecycle ---------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        log.info("agent starting", extra={"fields": {
            "device": self.cfg.device.id, "epoch": self.epoch, "outbox_messages": self.outbox.messages,
            "suite": self.cfg.e2e.suite,
            "source": self.cfg.source.type, "version": __version__}})
        queue: asyncio.Queue[Captured | None] = asyncio.Queue(maxsize=16)
        try:
            async with asyncio.TaskGroup() as tg:
                source = tg.create_task(self._source_task(queue), name="source")
                filt = tg.create_task(self._filter_task(queue), name="filter")
                publisher = tg.create_task(self._publisher_task(), name="publisher")
                status = tg.create_task(self._status_task(), name="status")
                metrics = tg.create_task(self._metrics_task(), name="metrics")
                watchdog = tg.create_task(self._watchdog_task(), name="watchdog")
                systemd.ready(f"device {self.cfg.device.id}")
                await self._stop.wait()
                systemd.stopping()
                log.info("agent stopping: flushing the outbox",
                         extra={"fields": {"outbox_messages": self.outbox.messages,
                                           "timeout_s": self.opts.flush_timeout_s}})
                for task in (source, filt, status):
                    task.cancel()
                await asyncio.gather(source, filt, status, return_exceptions=True)
                self._seal_status(pb.DeviceStatus.STATE_DEATH)
                self._draining = True
                self._wake.set()
                try:
                    async with asyncio.timeout(self.opts.flush_timeout_s):
                        await self._drained.wait()
                except TimeoutError:
                    log.warning("flush timed out; the rest stays in the outbox for the next start",
                                extra={"fields": {"outbox_messages": self.outbox.messages}})
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
                metrics.cancel()
                watchdog.cancel()
        finally:
            self._close()
        log.info("agent stopped", extra={"fields": {
            "seen": self.seen, "forwarded": self.forwarded, "outbox_messages": self.outbox.messages,
            "exit_code": self.exit_code}})
        return self.exit_code

    def _close(self) -> None:
        # A clean stop records the exact next window_seq; a crash leaves the reserved block's end.
        with contextlib.suppress(Exception):
            self.outbox.set_meta(window_seq=self._next_seq)
        self.outbox.commit_acks()
        self._update_gauges()
        self.outbox.close()
        if self._ledger is not None:
            self._ledger.close()

    # -- source and filter ---------------------------------------------------------------------------
    async def _source_task(self, queue: asyncio.Queue[Captured | None]) -> None:
        async for captured in self._source.windows():
            await queue.put(captured)
        await queue.put(None)

    async def _filter_task(self, queue: asyncio.Queue[Captured | None]) -> None:
        while (captured := await queue.get()) is not None:
            self.process(captured)
        log.info("source ended", extra={"fields": {"seen": self.seen}})
        if self.opts.exit_when_source_ends:
            self.request_stop()

    def process(self, captured: Captured) -> str | None:
        """One window through the prefilter; returns the forward reason, or None if it stays here."""
        self._anomalous = False
        reason = self._forward(captured)
        if self.models is not None and isinstance(self._scorer, Prefilter):
            # after the window is judged and sealed with the version that scored it
            undone = self.models.observe(captured.samples, self._anomalous, self._fits)
            if undone is not None:
                self._use(undone)
        return reason

    def _forward(self, captured: Captured) -> str | None:
        seq = self._take_seq()
        self.seen += 1
        self.metrics.windows_seen.inc()
        score = self._scorer.score(captured.samples)
        if self._learns:
            learning, progress = self._learning()
            self.metrics.commissioning.set(1.0 if learning else 0.0)
            self.metrics.commissioning_progress.set(progress)
        # a CommissioningScorer's threshold (read after score: the window that completes commissioning
        # is still scored 0.0, unjudged, and must not carry the new threshold); a prefilter has none
        threshold = float(getattr(self._scorer, "baseline_threshold", 0.0)) if score != 0.0 else 0.0
        self._since_forward += 1
        if self._scorer.is_anomalous(score):
            self._anomalous = True
            reason = "anomaly"
        elif self._since_forward >= self._summary_every:
            reason = "summary"
        else:
            self.metrics.windows_filtered.inc()
            return None
        self._since_forward = 0
        window = encode_window(
            captured.samples, kind=self._source.kind, sample_rate_hz=self._source.sample_rate_hz,
            start_ns=captured.start_ns, window_seq=seq, score=score,
            prefilter_version=self.opts.prefilter_version, reason=reason, gap=captured.gap,
            baseline_threshold=threshold,
        )
        counter = self._seal_store(pb.Plaintext(sealed_at_ns=self._now(), window=window))
        if counter is None:
            return None
        self.forwarded += 1
        self.metrics.windows_forwarded.labels(reason=reason).inc()
        if self._ledger is not None:
            self._ledger.append(device=self.cfg.device.id, window_seq=seq, reason=reason,
                                label=captured.label, epoch=self.epoch, counter=counter)
        return reason

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        if self._next_seq > self._seq_reserved:
            self._seq_reserved = self._next_seq + SEQ_BLOCK
            self.outbox.set_meta(window_seq=self._seq_reserved)
        return seq

    def _seal_store(self, plaintext: pb.Plaintext) -> int | None:
        """Seal and commit to the outbox; the counter used, or None if the outbox refused it."""
        counter = self.sealer.next_counter
        sealed = self.sealer.seal(plaintext.SerializeToString())
        rowid = self.outbox.put(sealed, created_ns=self._now(), epoch=self.epoch, counter=counter)
        self.metrics.sync_dropped(self.outbox.dropped)
        if rowid is None:
            self._dropped_log.emit("refused", "outbox full: refused the newest message",
                                   {"policy": self.outbox.policy, "refused": self.outbox.dropped["refused"]})
            return None
        if self.outbox.dropped["full"]:
            self._dropped_log.emit("full", "outbox full: dropped the oldest messages",
                                   {"policy": self.outbox.policy, "dropped": self.outbox.dropped["full"]})
        self._wake.set()
        return counter

    # -- status messages ---------------------------------------------------------------------------------
    def _learning(self) -> tuple[bool, float]:
        """(commissioning, progress 0-1): a CommissioningScorer (gateway/agent/baseline.py) reports its
        learning; a prefilter has none, so it counts as done."""
        return (bool(getattr(self._scorer, "commissioning", False)),
                float(getattr(self._scorer, "progress", 1.0)))

    def _status(self, state: pb.DeviceStatus.State.ValueType) -> pb.Plaintext:
        back = self.models.rolled_back if self.models is not None else None
        learning, progress = self._learning()
        return pb.Plaintext(sealed_at_ns=self._now(), status=pb.DeviceStatus(
            state=state, agent_version=__version__, uptime_s=int(time.monotonic() - self._started_mono),
            windows_seen=self.seen, windows_forwarded=self.forwarded, outbox_messages=self.outbox.messages,
            outbox_bytes=self.outbox.bytes, dropped=sum(self.outbox.dropped.values()),
            commissioning=learning, commissioning_progress=progress,
            model_version=self.models.version if self.models is not None else self.opts.prefilter_version,
            model_staged=self.models.staged if self.models is not None else "",
            model_probation=self.models.probation_text if self.models is not None else "",
            model_rolled_back_from=back.from_version if back is not None else "",
            model_rollback_reason=back.reason if back is not None else "",
        ))

    # -- commands (gateway/agent/commands.py Controls) ----------------------------------------------
    def status_now(self) -> pb.DeviceStatus:
        return self._status(pb.DeviceStatus.STATE_HEARTBEAT).status

    def apply_setting(self, key: str, value: float | str) -> None:
        if key == "filter.summary_interval_s":
            period_s = self._source.window / self._source.sample_rate_hz
            self._summary_every = max(1, round(float(value) / period_s))
        elif key == "publish_rate":
            self.publish_rate = float(value)  # from the next connection's replay on
        elif key == "log.level":
            logging.getLogger().setLevel(str(value).upper())

    def recommission(self) -> str | None:
        again = getattr(self._scorer, "recommission", None)
        if again is None:
            return "commissioning is off on this device ([commission] enabled = false)"
        again()
        return None

    def request_restart(self) -> None:
        """Drain (the reply included) and exit EXIT_RESTART: systemd's Restart=on-failure starts it again."""
        self.exit_code = EXIT_RESTART
        self.request_stop()

    def _rotation_or_refuse(self) -> KeyRotation:
        if self._rotation is None:
            raise ProvisioningError("this agent runs without a config file; rotate with 'sgw device rotate'")
        return self._rotation

    def rotation_begin(self) -> Proposal:
        proposal = self._rotation_or_refuse().begin()
        self.downlink.opener.add_device_key(proposal.key_id, proposal.e2e_key)
        return proposal

    def rotation_commit(self, key_id: int, certificate_der: bytes) -> None:
        self._rotation_or_refuse().commit(key_id, certificate_der)

    def update_gateway_key(self, key_id: int, public: bytes, mlkem_public: bytes, until_ms: int) -> None:
        if key_id == self.cfg.e2e.gateway_key_id:
            raise ProvisioningError(f"gateway key {key_id} is already the one this agent seals with")
        if self.cfg.e2e.suite_number == suites.HYBRID and not mlkem_public:
            raise ProvisioningError("this agent seals with x25519-mlkem768: the new key lacks ML-KEM")
        gateway_key.install(self.cfg, key_id=key_id, public=public, mlkem_public=mlkem_public,
                            trusted=self.downlink.trusted, until_ms=until_ms)
        try:  # receipts sealed with the new key open while this agent drains before its restart
            self.downlink.opener.add_gateway_key(key_id, public, others_until_ns=until_ms * 1_000_000)
        except ConfigError as exc:
            raise ProvisioningError(str(exc)) from None

    def set_suite(self, suite: int) -> None:
        gateway_key.set_suite(self.cfg, suite)

    def model_chunk(self, chunk: dpb.ModelChunk) -> tuple[str | None, dict[str, str]]:
        """A piece of a model release (gateway/agent/models.py). A completed, verified release that fits
        this source replaces the prefilter here, between two windows: this runs on the event loop."""
        if self.models is None:
            return "model releases are not handled by this agent", {}
        try:
            result = self.models.chunk(chunk, self.models.version, self._fits)
        except OSError as exc:
            return f"cannot stage the release: {exc.strerror or exc}", {}
        return self._switched(result)

    def model_rollback(self) -> tuple[str | None, dict[str, str]]:
        if self.models is None:
            return "model releases are not handled by this agent", {}
        try:
            return self._switched(self.models.rollback(self._fits))
        except OSError as exc:
            return f"cannot roll back: {exc.strerror or exc}", {}

    def _switched(self, result: ChunkResult) -> tuple[str | None, dict[str, str]]:
        assert self.models is not None  # noqa: S101 - only called with models
        if result.switched is not None:
            self._use(result.switched)
        return result.error, result.values

    def _use(self, prefilter: Prefilter) -> None:
        assert self.models is not None  # noqa: S101 - only called with models
        if isinstance(self._scorer, Prefilter):
            self._scorer = prefilter  # between two windows: this runs on the event loop
            self.opts = dataclasses.replace(self.opts, prefilter_version=self.models.version)

    def _seal_status(self, state: pb.DeviceStatus.State.ValueType) -> None:
        self._seal_store(self._status(state))

    async def _status_task(self) -> None:
        while True:
            await asyncio.sleep(self.opts.heartbeat_s)
            self._seal_status(pb.DeviceStatus.STATE_HEARTBEAT)

    # -- publisher ---------------------------------------------------------------------------------------
    async def _publisher_task(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(initial_s=0.2, max_s=30.0)
        connections = 0
        while True:
            if self._draining and self.outbox.messages == 0:
                self._drained.set()
                return
            link = Link(self.cfg, loop, self._wake)
            # Reserved counter: the will is sealed now and only published if this connection dies.
            will = None
            if self._will_is_safe():
                will = self.sealer.seal(self._status(pb.DeviceStatus.STATE_DEATH).SerializeToString())
            try:
                connected = await link.connect(will, CONNECT_TIMEOUT_S)
            except asyncio.CancelledError:
                await link.close(timeout_s=2.0)
                raise
            except ConnectFailedError as exc:
                await link.close(timeout_s=2.0)
                delay = backoff.next_delay()
                if not self._refused(str(exc), delay):
                    self._dropped_log.emit("connect", "broker unreachable; retrying",
                                           {"error": str(exc), "retry_in_s": round(delay, 2)})
                await asyncio.sleep(delay)
                continue
            connections += 1
            if connections > 1:
                self.metrics.reconnects.inc()
            self.metrics.connected.set(1)
            log.info("connected", extra={"fields": {"host": self.cfg.mqtt.host, "port": self.cfg.mqtt.port,
                                                     "receive_maximum": connected.receive_maximum,
                                                     "outbox_messages": self.outbox.messages}})
            if not self._draining:
                self._seal_status(pb.DeviceStatus.STATE_BIRTH)
            try:
                reason = await self._pump(link, connected, backoff)
            finally:
                self.metrics.connected.set(0)
                self.outbox.commit_acks()
                await link.close()
            if reason == "drained":
                self._drained.set()
                return
            delay = backoff.next_delay()
            if not self._refused(reason, delay):
                log.warning("disconnected; reconnecting", extra={"fields": {"reason": reason,
                                                                              "retry_in_s": round(delay, 2)}})
            await asyncio.sleep(delay)

    def _refused(self, error: str, retry_in_s: float) -> bool:
        """Count and log a refusal by the broker (revoked, not authorised, kicked); False for other errors.

        What the outbox holds stays there: a refused device deletes nothing as delivered."""
        reason = refusal_reason(error)
        if reason is None:
            return False
        self.metrics.connect_refused.labels(reason=reason).inc()
        self._dropped_log.emit(
            f"refused:{reason}", "the broker refused this device; keeping the outbox and retrying "
            "(if the certificate was revoked, ask the operator: sgw device show ID)",
            {"reason": reason, "error": error, "outbox_messages": self.outbox.messages,
             "retry_in_s": round(retry_in_s, 2)}, level=logging.ERROR)
        return True

    def _will_is_safe(self) -> bool:
        """A will jumps the gateway's replay window to its counter (or epoch) if the connection dies
        before the backlog is through; everything queued must then still fit inside that window."""
        if self.outbox.has_older_epoch(self.epoch):
            return False
        oldest = self.outbox.oldest_counter(self.epoch)
        return oldest is None or self.sealer.next_counter - oldest < WILL_SAFE_SPAN

    async def _pump(self, link: Link, connected: Connected, backoff: Backoff) -> str:
        """Publishes the outbox in order until the link drops ('down: ...') or a drain completes. What may
        go and what each PUBACK means is the sans-IO Publisher's (gateway/agent/publisher.py: the epoch
        fence, the receive maximum, pacing, 0x10 and the receipt timer); this loop does the IO: outbox
        reads and deletes, the link, metrics, logs and waiting."""
        pub = Publisher(window=min(connected.receive_maximum, self.opts.max_inflight),
                        receipt_timeout_s=self.cfg.outbox.receipt_timeout_s if self._by_receipt else None,
                        rate=self.publish_rate, burst=self.opts.publish_burst)
        last_commit = time.monotonic()
        while True:
            if pub.backing_off:
                self.outbox.commit_acks()
                delay = backoff.next_delay()
                self._dropped_log.emit("unheard", "no subscriber on the device topic (gateway down?); "
                                       "keeping the messages and retrying",
                                       {"unheard": pub.unheard, "retry_in_s": round(delay, 2)})
                await asyncio.sleep(delay)
                pub.retry()
            room = pub.room(time.monotonic())
            if room.resend and pub.waiting is not None:
                # No receipt within the timeout: the gateway (or the broker's copy) lost them, or the
                # receipt was lost.
                self._dropped_log.emit("resend", "no receipt within the timeout; sending again",
                                       {"unreceipted": room.resend, "next_timeout_s": pub.waiting.timeout_s})
            throttled = False
            if room.count > 0 and link.up and self.outbox.newest_id > room.after_id:
                for row in self.outbox.after(room.after_id, room.count):
                    admit = pub.admit(row, time.monotonic_ns())
                    if admit is not Admit.SEND:
                        throttled = admit is Admit.PACED
                        break
                    mid = link.publish(row.payload)
                    if mid is None:
                        break
                    pub.sent(mid, row, time.monotonic())
                    if row.id <= self._sent_upto:
                        self.metrics.resent.inc()  # after a timeout, or again on a new connection
                    else:
                        self._sent_upto = row.id
            while not link.events.empty():
                event = link.events.get_nowait()
                if isinstance(event, Puback):
                    acked = pub.on_puback(event.mid, ok=event.ok, unheard=event.unheard)
                    if acked.outcome is Delivery.REFUSED:
                        # The broker refused it (e.g. not authorised): keep it and retry on a new connection.
                        return f"puback refused: {event.reason}"
                    done_row = acked.row
                    if acked.outcome is Delivery.DELIVERED and done_row is not None:
                        if acked.delete:
                            self.outbox.ack(done_row.outbox_id)
                        latency_s = (self._now() - done_row.created_ns) / 1e9
                        self.metrics.publish_latency.observe(max(0.0, latency_s))
                        backoff.reset()  # a delivered PUBACK proves the whole path works
                elif isinstance(event, Downlink):
                    done = self.downlink.handle(event.topic, event.payload, self._now(), self)
                    if isinstance(done, Outcome):
                        # The reply travels like any uplink message: sealed, through the outbox, receipted.
                        self._seal_store(pb.Plaintext(sealed_at_ns=self._now(),
                                                      command_reply=done.reply.SerializeToString()))
                    elif done is not None:
                        pub.settle(done.ids)
                elif isinstance(event, Down):
                    return f"down: {event.reason}"
            if pub.unreceipted is not None:
                self.metrics.unreceipted.set(pub.unreceipted)
            now = time.monotonic()
            if (self.outbox.pending_acks() >= ACK_COMMIT_BATCH
                    or (self.outbox.pending_acks() and now - last_commit >= ACK_COMMIT_INTERVAL_S)
                    or (self._draining and not pub.inflight)):
                self.outbox.commit_acks()
                last_commit = now
            if self._draining and not pub.inflight and self.outbox.messages == 0:
                return "drained"
            if not link.up and not pub.inflight:
                return "down: publish failed"
            if pub.backing_off:
                continue  # straight to the backoff wait above
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0 / pub.rate if throttled else ACK_COMMIT_INTERVAL_S):
                    await self._wake.wait()

    # -- housekeeping ------------------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        m = self.metrics
        m.outbox_messages.set(self.outbox.messages)
        m.outbox_bytes.set(self.outbox.bytes)
        oldest = self.outbox.oldest_created_ns() if self.outbox.messages else None
        m.outbox_oldest_age.set(0.0 if oldest is None else max(0.0, (self._now() - oldest) / 1e9))
        m.sync_dropped(self.outbox.dropped)
        stats = getattr(self._source, "stats", None)  # live sources only
        if isinstance(stats, SourceStats):
            m.sync_source(stats)

    async def _metrics_task(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks % 10 == 0:
                expired = self.outbox.expire(self._now())
                if expired:
                    self._dropped_log.emit("expired", "outbox: expired old messages",
                                           {"expired": self.outbox.dropped["expired"]})
            self._update_gauges()
            if self._ledger is not None:
                self._ledger.flush()

    async def _watchdog_task(self) -> None:
        interval = systemd.watchdog_interval_s()
        if interval is None:
            await asyncio.Event().wait()  # no watchdog asked for: idle until cancelled
            return
        while True:
            systemd.watchdog()
            await asyncio.sleep(interval)
