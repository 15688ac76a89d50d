"""Run `sgw` in-process the way the console script does, isolated from unrelated subcommands.

Only the module of the command being run is registered (``SUBCOMMANDS`` narrowed for the call), so a
half-built module of another command in this shared tree cannot break provisioning in every test.
Everything else (argument parsing, LocalError -> exit 2 with one line) is the real `gateway.cli.main`.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence

# For subprocesses: `[*SGW_ARGV, "device", "add", ...]` behaves like the `sgw` command.
SGW_ARGV = [
    sys.executable, "-c",
    "import sys, gateway.cli.main as m; m.SUBCOMMANDS = tuple(sys.argv[1:2]); raise SystemExit(m.main())",
]


def run_cli(argv: Sequence[str]) -> tuple[int, str, str]:
    """Run `sgw ARGV` in-process; returns (exit code, stdout, stderr)."""
    from gateway.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    saved = cli_main.SUBCOMMANDS
    if argv and not argv[0].startswith("-"):
        cli_main.SUBCOMMANDS = (argv[0],)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli_main.main(list(argv))
            except SystemExit as exc:  # argparse usage errors and --help
                rc = int(exc.code or 0)
    finally:
        cli_main.SUBCOMMANDS = saved
    return rc, out.getvalue(), err.getvalue()
