"""`sgw gateway --config gateway.toml`: run the gateway service (systemd Type=notify)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "gateway",
        help="run the gateway: authenticate, batch, infer, publish results",
        description=(
            "Subscribe to sgw/v1/dev/+/up through a shared subscription, open and check every envelope, "
            "run batched inference and publish one ResultBatch per batch on sgw/v1/results. "
            "SIGTERM drains in-flight batches; SIGHUP reloads the registry and the log settings."
        ),
    )
    p.add_argument("--config", type=Path, required=True, help="gateway.toml (written by 'sgw ca init')")
    p.add_argument("--log-format", choices=("text", "json"), default=None, help="override [log] format")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                   help="override [log] level")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so `sgw --help` and other commands do not pay for numpy, LiteRT and paho.
    from gateway.common.logs import LogFormat, setup_logging  # noqa: PLC0415
    from gateway.server.config import load_config  # noqa: PLC0415
    from gateway.server.service import Service, build  # noqa: PLC0415

    conf = load_config(args.config)
    fmt: LogFormat = "json" if (args.log_format or conf.log.format) == "json" else "text"
    setup_logging(args.log_level or conf.log.level, fmt)
    gateway = build(conf, args.config)
    return Service(gateway, log_format=args.log_format, log_level=args.log_level).run()
