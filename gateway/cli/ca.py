"""`sgw ca ...`: create the CA and service identities of an sgw home; re-issue the CRL."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from gateway.errors import ProvisioningError
from gateway.pki.home import (
    BROKER_CRL_DIR,
    DEFAULT_SANS,
    Home,
    crl_targets,
    default_home,
    init_home,
    write_crl,
)


def add_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, default=None, metavar="HOME",
        help="sgw home directory (default: $SGW_HOME, else ~/.sgw)",
    )


def home_of(args: argparse.Namespace) -> Home:
    return Home(args.dir if args.dir is not None else default_home())


def os_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a file-system failure (disk full, permission denied) as sgw's one-line error.

    The operations underneath undo their staged work themselves; a traceback would add nothing.
    """

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise ProvisioningError(f"{where}{exc.strerror or exc}") from None

    return run


def emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = subparsers.add_parser("ca", help="certificate authority: init, crl, migrate")
    sub = ca.add_subparsers(title="ca commands", metavar="ACTION", required=True)

    init = sub.add_parser(
        "init", help="create the CA, broker/gateway/observer certificates, gateway e2e key, gateway.toml"
    )
    add_dir_arg(init)
    init.add_argument(
        "--san", action="append", default=None, metavar="NAME",
        help="subject alternative name for the broker certificate (DNS name or IP; repeatable; "
             f"default: {' '.join(DEFAULT_SANS)})",
    )
    init.add_argument("--broker-host", default="127.0.0.1", help="broker host written to gateway.toml")
    init.add_argument("--broker-port", type=int, default=8883, help="broker port written to gateway.toml")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA; every device issued before becomes unusable")
    init.add_argument("--json", action="store_true", help="print the created paths as JSON")
    init.set_defaults(func=os_errors(_init))

    crl = sub.add_parser("crl", help="re-issue the CRL (run periodically; also done by revoke/rotate/remove)")
    add_dir_arg(crl)
    crl.add_argument(
        "--check", action="store_true",
        help="re-issue nothing; exit 1 if the home's or a broker folder's CRL is unreadable or expires "
             "within --days (for monitoring: sgw-crl.service runs it after each renewal)",
    )
    crl.add_argument(
        "--days", type=int, default=30, help="with --check: days of validity required (default 30)"
    )
    crl.add_argument(
        "--json", action="store_true",
        help="with --check: print one {path, next_update, days_left, ok} object per CRL copy as a JSON list",
    )
    crl.set_defaults(func=os_errors(_crl))

    migrate = sub.add_parser(
        "migrate",
        help="bring a home made by an older sgw up to date (per-instance gateway identity, admin identity)",
        description=(
            "Re-issues HOME/gateway/client.crt for CN sgw-gateway-<gateway.id> if it still has the shared "
            "CN 'sgw-gateway', and issues the sgw-admin identity that 'sgw device revoke' uses to "
            "disconnect revoked devices. Idempotent; --dry-run lists the steps. Afterwards re-run "
            "'sgw broker config --force' for each broker folder (drain the gateway first) and restart."
        ),
    )
    add_dir_arg(migrate)
    migrate.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    migrate.add_argument("--json", action="store_true")
    migrate.set_defaults(func=os_errors(_migrate))


def _init(args: argparse.Namespace) -> int:
    home = home_of(args)
    init_home(
        home.root, sans=tuple(args.san) if args.san else DEFAULT_SANS, force=args.force,
        broker_host=args.broker_host, broker_port=args.broker_port,
    )
    paths = {
        "home": str(home.root),
        "ca_cert": str(home.ca_cert),
        "crl": str(home.crl),
        "gateway_toml": str(home.gateway_toml),
        "registry": str(home.registry_path),
    }
    if args.json:
        emit_json(paths)
    else:
        sys.stdout.write(
            f"sgw home ready at {home.root}\n  CA certificate: {home.ca_cert}\n"
            f"  gateway config: {home.gateway_toml}\n"
            f"next: sgw device add ID --dir {home.root}; sgw broker config --out DIR --dir {home.root}\n"
        )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from gateway.pki.instances import migrate, migration_steps  # noqa: PLC0415

    home = home_of(args)
    home.require_ca()
    steps = migration_steps(home) if args.dry_run else migrate(home)
    brokers = [str(t) for t in crl_targets(home)] if steps else []
    if args.json:
        emit_json({"home": str(home.root), "dry_run": args.dry_run, "steps": steps, "brokers": brokers})
        return 0
    if not steps:
        sys.stdout.write(f"{home.root} is up to date; nothing to migrate\n")
        return 0
    verb = "would" if args.dry_run else "did"
    sys.stdout.write("".join(f"{verb}: {step}\n" for step in steps))
    for folder in brokers:
        sys.stdout.write(f"next: sgw broker config --dir {home.root} --out {folder} --force, then restart "
                         "mosquitto and the gateway\n")
    return 0


def _crl(args: argparse.Namespace) -> int:
    home = home_of(args)
    if args.check:
        return _crl_check(home, args.days, as_json=args.json)
    if args.json:
        raise ProvisioningError("--json goes with --check (re-issuing prints only the CRL's path)")
    for warning in write_crl(home):
        sys.stderr.write(f"sgw: warning: {warning}\n")
    sys.stdout.write(f"CRL re-issued: {home.crl}\n")
    return 0


def _crl_check(home: Home, days: int, *, as_json: bool = False) -> int:
    """Exit 1 when a CRL mosquitto may read (the home's, each broker folder's) expires within `days`.

    With `as_json`, stdout is a JSON list with one {path, next_update, days_left, ok} per copy
    (next_update and days_left are null when the copy is unreadable or sets no next update); the
    problems still go to stderr, one line each, and the exit code is the same.
    """
    # A broker folder that is gone is skipped, as write_crl does: nothing reads that copy any more.
    brokers = [t / BROKER_CRL_DIR for t in crl_targets(home)]
    copies = [home.crl] + [folder / "crl.pem" for folder in brokers if folder.is_dir()]
    now = dt.datetime.now(dt.UTC)
    deadline = now + dt.timedelta(days=days)
    report: list[dict[str, object]] = []
    bad = 0
    for path in copies:
        try:
            next_update = x509.load_pem_x509_crl(path.read_bytes()).next_update_utc
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"sgw: CRL {path} is unreadable: {getattr(exc, 'strerror', None) or exc}\n")
            report.append({"path": str(path), "next_update": None, "days_left": None, "ok": False})
            bad += 1
            continue
        ok = next_update is not None and next_update >= deadline
        left = None if next_update is None else round((next_update - now).total_seconds() / 86400, 2)
        report.append({
            "path": str(path),
            "next_update": None if next_update is None else next_update.isoformat(),
            "days_left": left,
            "ok": ok,
        })
        if not ok:
            sys.stderr.write(f"sgw: CRL {path} expires {next_update or 'never set'}, within {days} days; "
                             "run 'sgw ca crl' and reload mosquitto\n")
            bad += 1
        elif not as_json:
            sys.stdout.write(f"CRL {path} valid until {next_update:%Y-%m-%d %H:%M} UTC\n")
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 1 if bad else 0
