"""`sgw demo`: the whole path on this machine in one command (broker, gateway, N agents, live view)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.errors import LocalError


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError("must be between 1 and 200")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole path locally: CA, devices, mosquitto, gateway, agents and a live view",
        description=(
            "Creates a throwaway CA and N simulated devices, starts mosquitto (mutual TLS + ACL), the "
            "gateway and one agent per device on free loopback ports, and shows traffic, faults, "
            "rejections, latency, outboxes and model backends live. Ctrl-C stops everything and prints "
            "a summary."
        ),
    )
    p.add_argument("--devices", type=_positive_int, default=20, help="simulated devices (default 20)")
    p.add_argument("--duration", type=_positive_float, default=None, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C)")
    p.add_argument("--no-tui", action="store_true",
                   help="no live view: progress lines on stderr, the JSON summary on stdout")
    p.add_argument("--attack", action="store_true",
                   help="add a hostile device: replays, forged, oversized and malformed messages, QoS 0/2 "
                        "telemetry, a client-id takeover and reflected downlink messages")
    p.add_argument("--sparkplug", action="store_true",
                   help="the gateway also publishes Sparkplug B (spBv1.0/sgw/...) for a SCADA; the live "
                        "view says where to connect")
    p.add_argument("--hybrid", type=int, default=0, metavar="N",
                   help="N of the devices seal the post-quantum hybrid suite x25519-mlkem768, the rest "
                        "x25519: a mixed fleet (default 0)")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="keep the CA, devices, configs and logs here (default: a temporary folder, deleted)")
    p.add_argument("--commission", type=float, default=10.0, metavar="S",
                   help="each agent first learns its machine's normal for S seconds (no anomalies "
                        "forwarded meanwhile; faults start after it); 0 = the shared prefilter (default 10)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from gateway.demo.procs import DemoError  # noqa: PLC0415 - keep `sgw --help` light
    from gateway.demo.runner import Demo, Options, human_summary  # noqa: PLC0415
    from gateway.demo.stage import MIN_COMMISSION_S  # noqa: PLC0415

    tui = not args.no_tui and sys.stderr.isatty()
    if args.commission and not MIN_COMMISSION_S <= args.commission <= 3600:
        raise LocalError(f"demo: --commission must be 0 or {MIN_COMMISSION_S:g}-3600 seconds "
                         "(an agent learns from at least that many seconds of windows)")
    opts = Options(devices=args.devices, duration_s=args.duration, tui=tui, attack=args.attack,
                   sparkplug=args.sparkplug, hybrid=max(0, args.hybrid), state_dir=args.state_dir,
                   json=args.json or args.no_tui, commission_s=args.commission)
    try:
        summary = Demo(opts).run()
    except DemoError as exc:
        keep = "" if args.state_dir else " (logs went with the temporary folder: rerun with --state-dir DIR)"
        raise LocalError(f"demo: {exc}{keep}") from None
    if opts.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write(human_summary(summary) + "\n")
    if summary.get("stopped_by") == "interrupted during start-up":
        return 130
    # A child that ignored SIGTERM is a bug worth a non-zero exit even when everything else went well.
    return 0 if not summary.get("killed") else 1
