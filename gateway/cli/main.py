"""The `sgw` command. Each subcommand lives in its own module `gateway.cli.<name>` exposing
`register(subparsers)`; the module sets `func` on its parser, and `func(args) -> int` runs it."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import LocalError, SgwError

# Order is the order shown in --help.
SUBCOMMANDS = ("ca", "device", "enroll", "broker", "agent", "gateway", "store", "install", "demo", "bench",
               "model")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgw",
        description=(
            "sgw: secure sensor-to-model telemetry gateway. Provision a CA and devices, run the edge agent "
            "and the gateway, install systemd units, run the demo and benchmarks."
        ),
        epilog="Run 'sgw COMMAND --help' for a command's options. Docs: docs/OPERATIONS.md",
    )
    parser.add_argument("--version", action="version", version=f"sgw {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"gateway.cli.{name}")
        except ModuleNotFoundError as exc:
            # A command whose module is not built yet is left out of --help, not fatal to the others.
            if exc.name == f"gateway.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130
    except LocalError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's one-line error is its interface
        return EXIT_USAGE
    except SgwError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
