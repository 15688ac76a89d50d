"""`sgw COMMAND ...` with only that command's module imported: `python benchmarks/_sgw.py gateway --config F`.

Same `register()` / `func(args)` as `gateway.cli.main`, which imports every subcommand module; here a
sibling command that is mid-edit in the shared work tree cannot break the benchmark's provisioning or
gateway process.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.errors import LocalError, SgwError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sgw")
    importlib.import_module(f"gateway.cli.{argv[0]}").register(parser.add_subparsers())
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except LocalError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return 2
    except SgwError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
