"""Issue 15: end-to-end receipts. An agent deletes a window only when a receipt sealed by the gateway says
it committed it; the broker's PUBACK only means "in flight". Real mosquitto, `sgw gateway`, `sgw agent`.

The two scenarios of the issue (each lost windows before receipts): the gateway away and the broker
SIGKILLed before any autosave; the broker's queue overflowing while the gateway is away. Both end with
lost = 0 and duplicated results = 0 by the agents' ledgers, and the agents' metrics show the resends.
Also: forged, replayed, reordered and foreign-device downlink messages are refused by the agent with a
typed reason and a metric, and one device cannot read another's cmd topic.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest

from gateway.core import keys
from gateway.core.downlink import DownlinkSealer, make_receipt
from gateway.core.topics import cmd_topic_for
from tests.support.agent import scrape
from tests.support.ledger import System, running_system
from tests.support.mosquitto import connect, disconnect, free_port, try_connect

pytestmark = pytest.mark.slow  # whole-path processes with outages of tens of seconds

DEVICE = "dev-r1"
SPEED = 2.0  # 25 windows/s
# mosquitto autosaves every 60 s; make "before any autosave" hold however long the test takes.
NO_AUTOSAVE = ("autosave_interval",), "autosave_interval 3600"


def agent_metric(port: int, name: str) -> float:
    return sum(v for k, v in scrape(port).items() if k == name or k.startswith(name + "{"))


def stream(system: System, windows: int, metrics_port: int, **outbox: object) -> None:
    system.start_agent(DEVICE, windows=windows, speed=SPEED, metrics_port=metrics_port,
                       outbox=dict(outbox) if outbox else None, flush_timeout_s=240.0)
    system.ledger.declare_produced(DEVICE, range(windows))
    system.wait_for(lambda: system.results_for(DEVICE) >= 50, 60, "first results")


class Sampler:
    """The agent's last readable counters: it exits (and its /metrics with it) once its outbox is empty."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.last = scrape(self.port)
            except OSError:
                continue

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        return self.last


def finish(system: System, label: str, sampler: Sampler) -> tuple[float, float]:
    system.wait_agents(240)
    last = sampler.stop()
    resent = last.get("sgw_agent_resent_total", 0.0)
    receipted = last.get("sgw_agent_windows_receipted_total", 0.0)
    ledger = system.finish(results_timeout=60)
    print(f"\n{label}: {ledger.report().summary()}; agent resent {resent:g}, receipted {receipted:g}")
    report = ledger.check()
    assert report.lost_total == 0
    return resent, receipted


@pytest.mark.parametrize("delete_on", ["receipt", "puback"])
def test_gateway_away_then_broker_sigkill_before_autosave(tmp_path: Path, delete_on: str) -> None:
    """With delete_on = "puback" (the rule before receipts) the same run must lose windows: the control
    that shows this scenario can fail."""
    drop, extra = NO_AUTOSAVE
    with running_system(tmp_path, [DEVICE], broker_drop=drop, broker_extra=extra) as system:
        port = free_port()
        stream(system, 900, port, delete_on=delete_on)
        sampler = Sampler(port)
        assert system.gateway.stop() == 0  # SIGTERM: drains; its persistent session queues in the broker
        time.sleep(15.0)  # ~375 windows PUBACKed by the broker, held only in its memory
        unreceipted = agent_metric(port, "sgw_agent_unreceipted")
        system.broker.kill()  # before any autosave: every queued window is gone from the broker
        system.broker.start()
        system.start_gateway()
        if delete_on == "puback":
            system.wait_agents(240)
            report = system.finish(results_timeout=30, idle_s=5).report()
            print(f"\ncontrol, delete on PUBACK: {report.summary()}")
            assert report.lost_total > 100, "the control run should lose what the broker dropped"
            return
        resent, _ = finish(system, "gateway away 15 s + broker SIGKILL", sampler)
        assert unreceipted > 100, "the windows sent while the gateway was away waited for a receipt"
        assert resent >= unreceipted * 0.9, (resent, unreceipted)


def test_broker_queue_overflow_while_gateway_away_loses_nothing(tmp_path: Path) -> None:
    with running_system(tmp_path, [DEVICE], broker_drop=("max_queued_messages",),
                        broker_extra="max_queued_messages 200") as system:
        port = free_port()
        stream(system, 1100, port, receipt_timeout_s=3.0)
        sampler = Sampler(port)
        assert system.gateway.stop() == 0
        time.sleep(25.0)  # ~625 windows for a queue of 200: mosquitto drops the rest, PUBACKed all
        system.start_gateway()
        resent, _ = finish(system, "gateway away 25 s, broker queue 200", sampler)
        assert "Outgoing messages are being dropped" in system.broker.log()
        assert resent > 400, resent


def test_results_committed_but_receipts_never_sent_are_receipted_by_the_next_gateway(tmp_path: Path) -> None:
    """The state a gateway SIGKILLed between committing a batch and sending its receipts leaves behind,
    made deterministic: a gateway with receipts off commits every window (results out) and receipts
    none; it is SIGKILLed, and a normal gateway takes over. The agent resends everything after its
    timeout, and the new gateway answers each resend with a receipt from the stored replay state, not a
    second result."""
    with running_system(tmp_path, [DEVICE]) as system:
        conf, metrics_port = system._gateway_args
        mute = conf.with_name("gateway-mute.toml")
        mute.write_text(conf.read_text().replace("receipts = true", "receipts = false"))
        assert "receipts = false" in mute.read_text()
        system.gateway.stop()
        system._gateway_args = (mute, metrics_port)
        system.start_gateway()
        port = free_port()
        sampler_port = port
        system.start_agent(DEVICE, windows=300, speed=SPEED, metrics_port=port,
                           outbox={"receipt_timeout_s": 2.0}, flush_timeout_s=240.0)
        system.ledger.declare_produced(DEVICE, range(300))
        sampler = Sampler(sampler_port)
        system.wait_for(lambda: system.results_for(DEVICE) >= 300, 60, "every window committed")
        unreceipted = sampler.last.get("sgw_agent_outbox_messages", 0.0)
        system.gateway.kill()
        system._gateway_args = (conf, metrics_port)
        system.start_gateway()
        resent, receipted = finish(system, "committed, receipts never sent, new gateway", sampler)
        assert unreceipted >= 250, "the agent kept every window the mute gateway committed"
        # The counters are the agent's last readable ones (it exits once receipted): a few may land
        # after the last scrape; lost 0 / duplicated 0 above is the check that matters.
        assert resent >= 300 and receipted >= 280, (resent, receipted)


# Loaded by the agent's interpreter (PYTHONPATH) before sgw starts: the receipt has been opened and
# applied to the outbox's pending deletions, and the process dies before they are committed.
_KILL_BEFORE_DELETION = """
import os, signal, time
from gateway.agent import outbox as _outbox

_commit = _outbox.Outbox.commit_acks
_at = time.monotonic() + float(os.environ["SGW_TEST_KILL_AFTER_S"])

def commit_acks(self):
    if self.pending_acks() and time.monotonic() >= _at:
        os.kill(os.getpid(), signal.SIGKILL)
    return _commit(self)

_outbox.Outbox.commit_acks = commit_acks
"""


def test_agent_sigkilled_between_a_receipt_and_its_deletion(tmp_path: Path) -> None:
    """Exactly between receiving a receipt and committing the deletions it allows (the first receipt
    that deletes something after 4 s, so the ledger has been flushed): after the restart the agent sends
    those windows again, and the gateway answers with receipts from its replay state, not second
    results: lost 0, duplicated 0, and the gateway counts the resends as replays."""
    failpoint = tmp_path / "failpoint"
    failpoint.mkdir()
    (failpoint / "sitecustomize.py").write_text(_KILL_BEFORE_DELETION)
    with running_system(tmp_path, [DEVICE]) as system:
        agent = system.start_agent(DEVICE, windows=400, speed=SPEED, outbox={"delete_on": "receipt"},
                                   env={"PYTHONPATH": str(failpoint), "SGW_TEST_KILL_AFTER_S": "4"})
        assert agent.proc.wait(60) == -signal.SIGKILL, agent.log()[-3000:]
        del system.agents[DEVICE]
        killed_epoch = max(e["epoch"] for e in system.forwarded() if e["device"] == DEVICE)
        system.ledger.crashed_epochs.add((DEVICE, killed_epoch))
        system.ledger.produced.pop(DEVICE, None)  # what was in memory at the kill was never accepted
        results_at_kill = system.results_for(DEVICE)
        replays_at_kill = _replays(system)
        port = free_port()
        system.start_agent(DEVICE, windows=50, speed=SPEED, run=1, metrics_port=port,
                           outbox={"delete_on": "receipt"}, flush_timeout_s=240.0)
        sampler = Sampler(port)
        system.wait_agents(240)
        last = sampler.stop()
        restarted = [e["window_seq"] for e in system.forwarded() if e["epoch"] > killed_epoch]
        system.ledger.declare_produced(DEVICE, range(min(restarted), min(restarted) + 50))
        ledger = system.finish(results_timeout=60)
        replays = _replays(system) - replays_at_kill
        print(f"\nagent SIGKILL between receipt and deletion: {ledger.report().summary()}; "
              f"{results_at_kill} results at the kill; {replays:g} sent again and receipted as replays")
        ledger.check(allow_unledgered_from_crash=True)
        # The killed receipt covered at least one window the outbox still held: sent again after the
        # restart, refused as a replay (no second result: checked above) and receipted.
        assert replays >= 1, "the receipted-but-kept windows went again"
        assert last.get("sgw_agent_windows_receipted_total", 0.0) >= replays


def _replays(system: System) -> float:
    m = re.search(r'(?m)^sgw_gateway_rejections_total{reason="replay"} (\S+)$', system.gateway.scrape())
    return float(m.group(1)) if m else 0.0


class _Downlink:
    """Sealed downlink messages as a gateway would make them, published on the cmd topic the way a broker
    (or anyone able to write there) could: forged, replayed, for another device."""

    def __init__(self, system: System) -> None:
        home = system.prov.home
        self.gateway_key = keys.private_from_bytes((home / "gateway" / "e2e.key").read_bytes())
        self.system = system
        # Its own identity: with the gateway's, the broker would make it the gateway's client id and the
        # two would displace each other. Another instance's certificate may write every cmd topic.
        self.client = connect(system.prov.identity("gateway:gw-test"), system.port)

    def sealer(self, epoch: int, *, key: object | None = None) -> DownlinkSealer:
        return DownlinkSealer(sender="gw-test", gateway_key=key or self.gateway_key,  # type: ignore[arg-type]
                              gateway_key_id=1, epoch=epoch)

    def receipt(self, sealer: DownlinkSealer, device: str, counter_range: tuple[int, int, int]) -> bytes:
        public = (self.system.prov.bundle(device) / "e2e.pub").read_bytes()
        return sealer.seal(make_receipt([counter_range]), device_id=device, device_public=public,
                           device_key_id=1)

    def publish(self, device: str, payload: bytes) -> None:
        info = self.client.publish(cmd_topic_for(device), payload, qos=1)
        info.wait_for_publish(10)

    def close(self) -> None:
        disconnect(self.client)


def test_forged_replayed_reordered_and_foreign_downlink_is_refused(tmp_path: Path) -> None:
    with running_system(tmp_path, [DEVICE, "dev-r2"], instances=("gw-test",)) as system:
        port = free_port()
        stream(system, 300, port)
        sampler = Sampler(port)
        d = _Downlink(system)
        try:
            def refused(reason: str) -> float:
                return scrape(port).get(f'sgw_agent_downlink_refused_total{{reason="{reason}"}}', 0.0)

            def expect(reason: str, payload: bytes, device: str = DEVICE) -> None:
                before = refused(reason)
                d.publish(device, payload)
                deadline = time.monotonic() + 10
                while refused(reason) <= before:
                    assert time.monotonic() < deadline, f"no {reason} refusal counted"
                    time.sleep(0.05)

            epoch = int(time.time() * 1000)
            s = d.sealer(epoch)
            # A receipt for counters far in the future: authentic, so accepted (deletes nothing).
            first = d.receipt(s, DEVICE, (1, 10**9, 10**9))
            second = d.receipt(s, DEVICE, (1, 10**9 + 1, 10**9 + 1))
            d.publish(DEVICE, second)
            time.sleep(0.5)
            expect("replay", second)  # the same message again
            # `first` has a lower counter than `second`, already accepted: inside the window it is a
            # reorder that is still accepted exactly once; sent twice, the second copy is a replay.
            d.publish(DEVICE, first)
            time.sleep(0.3)
            expect("replay", first)
            forged = bytearray(d.receipt(s, DEVICE, (1, 5, 5)))
            forged[-1] ^= 1
            expect("forged", bytes(forged))
            expect("forged", d.receipt(d.sealer(epoch + 1, key=keys.generate()), DEVICE, (1, 5, 5)))
            # Sealed for dev-r2, delivered on dev-r1's topic (a broker re-routing it).
            expect("wrong_device", d.receipt(s, "dev-r2", (1, 5, 5)), device=DEVICE)
            expect("stale_epoch", d.receipt(d.sealer(epoch - 10), DEVICE, (1, 6, 6)))
            expect("malformed", b"\x00not an envelope")

            # ACL: dev-r2 can neither read dev-r1's commands nor write to a cmd topic. mosquitto grants
            # the subscription and then delivers nothing through it.
            result = try_connect(system.prov.identity("dev-r2"), system.port)
            assert result.ok and result.client is not None
            got: list[bytes] = []
            codes: list[object] = []
            cli = result.client
            cli.on_message = lambda _c, _u, m: got.append(m.payload)
            cli.on_publish = lambda _c, _u, _m, rc, _p=None: codes.append(rc)
            cli.subscribe(cmd_topic_for(DEVICE), qos=1)
            time.sleep(0.3)
            d.publish(DEVICE, d.receipt(s, DEVICE, (1, 7, 7)))  # a real one for dev-r1, while r2 listens
            cli.publish(cmd_topic_for(DEVICE), b"x", qos=1).wait_for_publish(10)
            time.sleep(0.5)
            disconnect(cli)
            assert got == [], "dev-r2 read dev-r1's cmd topic"
            assert [getattr(c, "value", c) for c in codes] == [0x87], codes  # not authorized
        finally:
            d.close()
        finish(system, "downlink attacks", sampler)


@pytest.mark.parametrize("copies", [2])
def test_a_receipt_that_arrives_twice_or_late_changes_nothing(tmp_path: Path, copies: int) -> None:
    """The same receipt twice (broker duplicate) is refused as a replay; a receipt for windows already
    gone (late) deletes nothing else."""
    from gateway.agent.config import load_agent_config, load_e2e_keys
    from gateway.agent.metrics import AgentMetrics
    from gateway.agent.outbox import Outbox
    from gateway.agent.receipts import AgentDownlink
    from tests.support.provision import provision

    prov = provision(tmp_path / "home", [DEVICE])
    cfg = load_agent_config(prov.bundle(DEVICE) / "agent.toml")
    e2e = load_e2e_keys(cfg.e2e)
    outbox = Outbox(tmp_path / "o.db", max_bytes=1 << 20, max_age_s=3600, policy="drop_oldest")
    metrics = AgentMetrics("vibration")
    dl = AgentDownlink(cfg, e2e, outbox, metrics)
    controls = _NoControls()
    for c in range(10):
        outbox.put(b"x" * 10, created_ns=c, epoch=7, counter=c)
    gw = keys.private_from_bytes((prov.home / "gateway" / "e2e.key").read_bytes())
    s = DownlinkSealer(sender="gw-1", gateway_key=gw, gateway_key_id=1, epoch=1)
    public = (prov.bundle(DEVICE) / "e2e.pub").read_bytes()
    topic = cmd_topic_for(DEVICE)
    msg = s.seal(make_receipt([(7, 0, 4)]), device_id=DEVICE, device_public=public, device_key_id=1)
    applied = dl.handle(topic, msg, time.time_ns(), controls)
    assert applied is not None and applied.accepted == 5 and outbox.messages == 5
    for _ in range(copies - 1):
        assert dl.handle(topic, msg, time.time_ns(), controls) is None  # replay: refused, counted
    late = s.seal(make_receipt([(7, 0, 4)]), device_id=DEVICE, device_public=public, device_key_id=1)
    applied = dl.handle(topic, late, time.time_ns(), controls)
    assert applied is not None and applied.accepted == 0 and outbox.messages == 5
    rejected = s.seal(make_receipt([], [((7, 5, 6), 6)]), device_id=DEVICE, device_public=public,
                      device_key_id=1)
    applied = dl.handle(topic, rejected, time.time_ns(), controls)
    assert applied is not None and applied.rejected == 2 and outbox.messages == 3
    value = metrics.receipt_rejected.labels(reason="stale")._value.get()
    assert value == 2
    assert metrics.downlink_refused.labels(reason="replay")._value.get() == copies - 1
    outbox.close()


class _NoControls:
    """Receipts only here: a command reaching these would be a test bug."""

    def status_now(self) -> object:
        raise AssertionError("no command expected")

    def apply_setting(self, key: str, value: object) -> None:
        raise AssertionError("no command expected")

    def recommission(self) -> str | None:
        raise AssertionError("no command expected")

    def request_restart(self) -> None:
        raise AssertionError("no command expected")
