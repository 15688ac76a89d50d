"""`sgw broker config`: a mosquitto configuration that enforces sgw identities and topics."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.cli.ca import add_dir_arg, emit_json, home_of, os_errors
from gateway.pki.broker import write_broker_config


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = subparsers.add_parser("broker", help="broker (mosquitto) configuration")
    sub = broker.add_subparsers(title="broker commands", metavar="ACTION", required=True)
    config = sub.add_parser(
        "config", help="write mosquitto.conf, ACL, certificates and CRL for a mutual-TLS broker"
    )
    add_dir_arg(config)
    config.add_argument("--out", type=Path, required=True, help="folder for the broker's files")
    config.add_argument("--port", type=int, default=8883)
    config.add_argument("--listen", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    who = config.add_mutually_exclusive_group()
    who.add_argument("--user", default="mosquitto",
                     help="user mosquitto drops to after start (default mosquitto); files are handed to it")
    who.add_argument("--run-as-root", action="store_true",
                     help="tests and demos only: keep mosquitto running as root")
    config.add_argument("--enroll-port", type=int, default=None,
                        help="also write the zero-touch enrollment listener on this port (needs an "
                             "allow-listed manufacturer CA: 'sgw enroll allow')")
    config.add_argument("--force", action="store_true", help="overwrite an existing broker folder")
    config.add_argument("--json", action="store_true")
    config.set_defaults(func=os_errors(_config))


def _config(args: argparse.Namespace) -> int:
    home = home_of(args)
    result = write_broker_config(
        home, args.out, port=args.port, listen=args.listen,
        user="root" if args.run_as_root else args.user, force=args.force,
        enroll_port=args.enroll_port,
    )
    for warning in result.warnings:
        sys.stderr.write(f"sgw: warning: {warning}\n")
    if args.json:
        emit_json({"out": str(result.out), "conf": str(result.conf), "acl": str(result.acl),
                   "port": args.port, "listen": args.listen, "enroll_port": args.enroll_port})
    else:
        sys.stdout.write(f"broker config written: {result.conf}\nrun: mosquitto -c {result.conf}\n")
    return 0
