"""A hostile device with a valid certificate attacks while three honest agents stream through the real
broker and gateway. Each attack must be refused under its own reason and counted in
`sgw_gateway_rejections_total{reason}` (exactly: every other reason stays where it was), and no honest
window may be lost or get two results. Honest throughput and latency before and during the attacks
are printed (figures, not assertions: the machine is shared).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.hostile import PUBACK_NOT_AUTHORIZED, Bundle, HostileDevice
from tests.support.ledger import Seen, System, latency_ms, running_system

pytestmark = pytest.mark.slow  # whole-path processes: bounded, but tens of seconds

HONEST = ("dev-h1", "dev-h2", "dev-h3")
HOSTILE = "dev-evil"
IDLE = "dev-idle"  # provisioned, no agent: the device whose e2e key the attacker stole
SPEED = 2.0  # 25 windows/s per honest agent: also the hostile device's "normal rate"
NORMAL_RATE = 12.5 * SPEED
WINDOWS = 550  # 22 s of stream: the baseline and every attack happen inside it
PIPELINE = {"device_rate": 50.0, "device_burst": 100}  # twice an agent's rate, as a deployment would set
# An honest agent that fell behind replays its backlog paced at this (burst 2x): under the gateway's limit,
# or the gateway would refuse honest windows as rate_limited and they would be lost.
AGENT_PACE = ["--max-publish-rate", "40"]


class Attacks:
    """Runs one attack at a time and checks the gateway counted exactly what it should."""

    def __init__(self, system: System, hostile: HostileDevice) -> None:
        self.system = system
        self.hostile = hostile
        self.rows: list[tuple[str, str, int]] = []

    def hostile_results(self) -> int:
        return self.system.results_for(HOSTILE)

    def accepted(self, n: int) -> list[bytes]:
        """n honest messages of the hostile device, waited until their results are out."""
        before = self.hostile_results()
        envs = self.hostile.valid(n)
        self.system.wait_for(lambda: self.hostile_results() >= before + n, 20, "hostile's own results")
        return envs

    def expect(self, name: str, reason: str, n: int, attack: object) -> None:
        before = self.system.rejections()
        codes = attack() if callable(attack) else attack  # PUBACK codes from the broker
        assert all(c == 0 for c in codes), f"{name}: the broker refused {codes}"  # type: ignore[union-attr]

        def delta() -> dict[str, float]:
            now = self.system.rejections()
            return {k: now[k] - before.get(k, 0.0) for k in now if now[k] != before.get(k, 0.0)}

        self.system.wait_for(lambda: delta().get(reason, 0) >= n, 15, f"{name}: {n} x {reason}")
        time.sleep(0.3)  # anything else this attack caused would show by now
        assert delta() == {reason: n}, f"{name}: expected {{{reason!r}: {n}}}, counted {delta()}"
        self.rows.append((name, reason, n))
        time.sleep(0.3)  # the rate limiter's bucket refills: the next attack is judged on its own


def phase(seen: list[Seen], start_ns: int, end_ns: int) -> tuple[float, dict[str, float]]:
    inside = [s for s in seen if s.key[0] in HONEST and start_ns <= s.observed_ns < end_ns]
    return len(inside) / ((end_ns - start_ns) / 1e9), latency_ms(inside)


def test_hostile_device_is_refused_and_honest_devices_lose_nothing(tmp_path: Path) -> None:
    with running_system(tmp_path, HONEST, extra=(HOSTILE, IDLE), pipeline=PIPELINE) as system:
        assert system.sink is not None
        for d in HONEST:
            system.start_agent(d, windows=WINDOWS, speed=SPEED, extra_args=AGENT_PACE)
            system.ledger.declare_produced(d, range(WINDOWS))
        system.wait_for(lambda: all(system.results_for(d) >= 20 for d in HONEST), 60, "honest streams")
        hostile = HostileDevice(system.prov.bundle(HOSTILE), system.prov.identity(HOSTILE), system.port)
        try:
            a = Attacks(system, hostile)
            base_start = time.time_ns()
            time.sleep(4.0)
            attack_start = time.time_ns()

            # Another device's topic: the broker's ACL refuses it (PUBACK 0x87), the gateway sees nothing.
            before = system.rejections()
            codes = hostile.foreign_topic(HONEST[0], 3)
            assert codes == [PUBACK_NOT_AUTHORIZED] * 3, codes
            time.sleep(0.5)
            assert system.rejections() == before
            a.rows.append(("publish on another device's topic", "broker ACL 0x87", 3))

            first = a.accepted(5)
            a.expect("replay of accepted envelopes", "replay", 5, lambda: hostile.replay(first))
            a.expect("bit-flipped ciphertext/tag", "bad_auth", 5, lambda: hostile.bit_flipped(5))
            a.expect("truncated envelopes", "malformed", 5, lambda: hostile.truncated(5))
            a.expect("garbage bytes", "malformed", 5, lambda: hostile.garbage(5))
            a.expect("96 KiB envelope", "too_large", 2, lambda: hostile.oversized(2))
            # The topic is the broker-authenticated identity: a header naming anyone else is refused
            # before any key work or state change, whoever's key sealed it.
            a.expect("another device's id in the header, own key", "topic_mismatch", 3,
                     lambda: hostile.impersonate(HONEST[0], 3))
            a.expect("another device's id and stolen e2e key, own topic", "topic_mismatch", 3,
                     lambda: hostile.stolen_key(system.prov.bundle(IDLE), 3))

            # An earlier session, replayed (accepted ones) and released (withheld ones): stale.
            withheld = hostile.seal(3)
            hostile.new_session()
            a.accepted(2)
            a.expect("old session (lower epoch)", "stale_session", 8,
                     lambda: hostile.old_session([*first, *withheld]))

            # Key rotation: once the new key authenticated, the old key is dead even inside the grace.
            old_key = Bundle.load(system.prov.bundle(HOSTILE))
            withheld = hostile.seal(3)
            rc, _out, err = run_cli(["device", "rotate", HOSTILE, "--dir", str(system.prov.home),
                                     "--grace", "3600"])
            assert rc == 0, err
            time.sleep(1.0)  # the gateway polls the registry every 0.25 s
            hostile.new_session(reload_bundle=True)
            assert hostile.bundle.device_key_id == old_key.device_key_id + 1
            a.accepted(2)
            a.expect("old session after key rotation (withheld)", "bad_auth", 3,
                     lambda: hostile.old_session(withheld))
            rotated_out = old_key.sealer(int(time.time() * 1000) + 1)
            a.expect("new session with the rotated-out key", "bad_auth", 3,
                     lambda: hostile.old_session(hostile.seal(3, rotated_out)))

            # A flood at 10x its normal rate: the per-device bucket (50/s, burst 100) sheds the excess.
            before = system.rejections()
            results_before = a.hostile_results()
            sent, codes = hostile.flood(rate=10 * NORMAL_RATE, seconds=2.0)
            assert all(c == 0 for c in codes), set(codes)
            system.wait_for(lambda: a.hostile_results() - results_before
                            + system.rejections().get("rate_limited", 0) - before.get("rate_limited", 0)
                            >= sent, 30, "every flood message accepted or rate limited")
            limited = int(system.rejections().get("rate_limited", 0) - before.get("rate_limited", 0))
            now = system.rejections()
            assert {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)} == \
                {"rate_limited": limited}
            assert limited > sent / 2, f"only {limited} of {sent} flood messages were rate limited"
            a.rows.append((f"flood {sent} msgs at {10 * NORMAL_RATE:g}/s", "rate_limited", limited))
            attack_end = time.time_ns()
        finally:
            hostile.close()

        system.wait_agents(120)
        ledger = system.finish(results_timeout=60)
        ledger.results = [s for s in ledger.results if s.key[0] in HONEST]
        report = ledger.check()
        base_rate, base_lat = phase(ledger.results, base_start, attack_start)
        att_rate, att_lat = phase(ledger.results, attack_start, attack_end)
        print(f"\nhostile device: {report.summary()} (honest devices)")
        for name, reason, n in a.rows:
            print(f"  {name:52s} -> {reason:16s} x{n}")
        print(f"  honest results/s: baseline {base_rate:.1f}, under attack {att_rate:.1f} "
              f"(offered {len(HONEST) * NORMAL_RATE:g}/s)")
        for label, lat in (("baseline", base_lat), ("under attack", att_lat)):
            print(f"  honest latency {label}: processing p50 {lat['proc_p50']:.1f} ms p99 "
                  f"{lat['proc_p99']:.1f} ms; end to end p50 {lat['e2e_p50']:.1f} ms "
                  f"p99 {lat['e2e_p99']:.1f} ms")
