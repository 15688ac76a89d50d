"""Soak: the whole path for a long time, watching for leaks. A script, not a CI test.

    python benchmarks/soak.py [--minutes 10] [--devices 4] [--speed 4] [--interval-s 30] [--out DIR]

Runs a private mosquitto, `sgw gateway` and `--devices` `sgw agent`s (every window a fault, so every
window is forwarded: 12.5 x speed windows/s per agent) plus a hostile device that sends a few garbage,
replayed and forged messages every second (so the rejection paths run too), for `--minutes`. Every
`--interval-s` it samples RSS and open file descriptors (psutil) of the gateway, each agent and the
broker, and the gateway's accepted/rejected counters. At the end the agents get SIGTERM (flush), and the
ledger (tests/support/ledger.py) must show lost = 0 and duplicated = 0 for the honest devices.

Output in --out (default benchmarks/results/soak/): soak.csv (every sample), soak.json (samples and
summary), soak.md (the table for docs/PERFORMANCE.md "Soak"). Every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.hostile import HostileDevice  # noqa: E402
from tests.support.ledger import System  # noqa: E402

HOSTILE = "dev-soak-evil"


def proc_stats(pid: int) -> tuple[float, int, float]:
    """(RSS MiB, open fds, CPU seconds) of a process; zeros if it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            return p.memory_info().rss / 2**20, p.num_fds(), cpu.user + cpu.system
    except psutil.Error:
        return 0.0, 0, 0.0


def gateway_counts(system: System) -> tuple[int, int]:
    text = system.scrape()
    acc = rej = 0
    for line in text.splitlines():
        m = re.match(r'sgw_gateway_messages_total\{outcome="(accepted|rejected)"\} (\S+)', line)
        if m:
            if m.group(1) == "accepted":
                acc = int(float(m.group(2)))
            else:
                rej = int(float(m.group(2)))
    return acc, rej


def hostile_loop(hostile: HostileDevice, stop: threading.Event, counts: dict[str, int]) -> None:
    captured = hostile.valid(1)
    while not stop.wait(1.0):
        with contextlib.suppress(Exception):  # a soak must not stop because the attacker hiccupped
            hostile.garbage(2)
            hostile.replay(captured)
            hostile.bit_flipped(1)
            counts["sent"] += 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--speed", type=float, default=4.0, help="source speed factor (12.5 windows/s x speed)")
    ap.add_argument("--interval-s", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sgw-soak-"))
    devices = [f"dev-soak-{i}" for i in range(args.devices)]
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    hostile_counts = {"sent": 0}
    # The gateway's default per-device limit (200/s, burst 400) sits above the agent's backlog pacing
    # (100/s, burst 200): a tighter gateway limit would refuse honest backlog replays as rate_limited.
    system = System(work, devices, extra=(HOSTILE,))
    ok = False
    hostile: HostileDevice | None = None
    thread: threading.Thread | None = None
    try:
        for d in devices:
            system.start_agent(d, windows=None, speed=args.speed, flush_timeout_s=60.0)
        system.wait_for(lambda: all(system.results_for(d) > 0 for d in devices), 60, "first results")
        hostile = HostileDevice(system.prov.bundle(HOSTILE), system.prov.identity(HOSTILE), system.port)
        thread = threading.Thread(target=hostile_loop, args=(hostile, stop, hostile_counts), daemon=True)
        thread.start()
        start = time.monotonic()
        end = start + args.minutes * 60
        next_sample = start
        print(f"soak: {args.devices} agents at {12.5 * args.speed:g} windows/s each for "
              f"{args.minutes:g} min; work dir {work}", flush=True)
        while True:
            now = time.monotonic()
            if now >= next_sample:
                row: dict[str, Any] = {"t_s": round(now - start, 1)}
                row["gw_rss_mib"], row["gw_fds"], row["gw_cpu_s"] = proc_stats(system.gateway.proc.pid)
                row["broker_rss_mib"], row["broker_fds"], _ = proc_stats(system.broker.pid)
                agent_stats = [proc_stats(a.proc.pid) for a in system.agents.values()]
                row["agent_rss_mib_max"] = max(s[0] for s in agent_stats)
                row["agent_rss_mib_min"] = min(s[0] for s in agent_stats)
                row["agent_fds_max"] = max(s[1] for s in agent_stats)
                row["agent_cpu_s_total"] = round(sum(s[2] for s in agent_stats), 1)
                row["accepted"], row["rejected"] = gateway_counts(system)
                row["rejections"] = {k: int(v) for k, v in system.rejections().items() if v}
                row["results"] = len(system.sink.key_set()) if system.sink else 0
                samples.append(row)
                print(json.dumps(row), flush=True)
                next_sample += args.interval_s
            if now >= end:
                break
            time.sleep(min(1.0, max(0.05, next_sample - time.monotonic())))
        stop.set()
        thread.join(30)
        for agent in system.agents.values():
            agent.proc.send_signal(signal.SIGTERM)
        system.wait_agents(120)
        ledger = system.finish(results_timeout=120)
        ledger.results = [r for r in ledger.results if r.key[0] in devices]  # not the hostile's own
        report = ledger.report()
        ledger.check()
        summary = summarize(samples, f"{report.summary()}; hostile messages {hostile_counts['sent']}", args)
        write(args.out, samples, summary)
        print(summary["text"])
        ok = True
        return 0
    finally:
        stop.set()
        if thread is not None:
            thread.join(30)
        if hostile is not None:
            hostile.close()
        system.close()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"soak failed: logs kept in {work}", file=sys.stderr)


def summarize(samples: list[dict[str, Any]], ledger: str, args: argparse.Namespace) -> dict[str, Any]:
    warm = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]
    dur = last["t_s"] - warm["t_s"] or 1.0

    def growth(key: str) -> float:
        return round(last[key] - warm[key], 1)
    text = (
        f"soak {args.minutes:g} min, {args.devices} agents x {12.5 * args.speed:g} windows/s: "
        f"gateway RSS {warm['gw_rss_mib']:.1f} -> {last['gw_rss_mib']:.1f} MiB, fds "
        f"{min(s['gw_fds'] for s in samples)}-{max(s['gw_fds'] for s in samples)}; agents RSS max "
        f"{warm['agent_rss_mib_max']:.1f} -> {last['agent_rss_mib_max']:.1f} MiB, fds max "
        f"{max(s['agent_fds_max'] for s in samples)}; broker RSS {warm['broker_rss_mib']:.1f} -> "
        f"{last['broker_rss_mib']:.1f} MiB; gateway CPU "
        f"{(last['gw_cpu_s'] - warm['gw_cpu_s']) / dur * 100:.0f}% of a core; {ledger}"
    )
    return {"text": text, "gw_rss_growth_mib": growth("gw_rss_mib"),
            "agent_rss_growth_mib": growth("agent_rss_mib_max"), "ledger": ledger}


def write(out: Path, samples: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    (out / "soak.json").write_text(json.dumps({"samples": samples, "summary": summary}, indent=1))
    samples = [{k: v for k, v in s.items() if k != "rejections"} for s in samples]  # flat, for CSV/md
    with (out / "soak.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(samples[0]))
        w.writeheader()
        w.writerows(samples)
    cols = ["t_s", "gw_rss_mib", "gw_fds", "agent_rss_mib_max", "agent_fds_max", "broker_rss_mib",
            "broker_fds", "accepted", "rejected"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines.extend("| " + " | ".join(f"{s[c]:.1f}" if isinstance(s[c], float) else str(s[c]) for c in cols)
                 + " |" for s in samples)
    (out / "soak.md").write_text("\n".join(lines) + "\n\n" + summary["text"] + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
