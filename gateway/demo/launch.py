"""`python -m gateway.demo.launch COMMAND ARGS...`: `sgw COMMAND ARGS...` importing only that command.

The demo starts a few dozen service processes; each imports just its own command module (not every
subcommand's), so start-up is cheaper and one command's import failure cannot take the others down.
Exit codes and the one-line error are those of `sgw` (gateway.cli.main).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway.cli.main import EXIT_FAILURE, EXIT_USAGE, SUBCOMMANDS
from gateway.errors import LocalError, SgwError


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] not in SUBCOMMANDS:
        sys.stderr.write(f"usage: python -m gateway.demo.launch {{{','.join(SUBCOMMANDS)}}} ...\n")
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog="sgw")
    subparsers = parser.add_subparsers(metavar="COMMAND")
    importlib.import_module(f"gateway.cli.{args_in[0]}").register(subparsers)
    args = parser.parse_args(args_in)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except LocalError as exc:
        sys.stderr.write(f"sgw: error: {exc}\n")
        return EXIT_USAGE
    except SgwError as exc:
        sys.stderr.write(f"sgw: error: {exc}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
