"""`sgw device ...`: add (one or from a CSV), list, show, revoke, rotate, set-suite, remove."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli import device_cmd
from gateway.cli.ca import add_dir_arg, emit_json, home_of, os_errors
from gateway.core import suites
from gateway.errors import ProvisioningError
from gateway.pki.home import (
    DEFAULT_KIND,
    DeviceSpec,
    Home,
    Progress,
    add_devices,
    remove_device,
    revoke_device,
    rotate_device,
    set_device_suite,
)
from gateway.registry.ids import validate_device_id
from gateway.registry.store import DeviceRecord

if TYPE_CHECKING:
    from gateway.pki.broker_control import Enforcement

CSV_COLUMNS = ("id", "kind", "broker_host", "broker_port", "suite")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    device = subparsers.add_parser(
        "device", help="device identities: add, list, show, revoke, rotate, set-suite, remove; cmd"
    )
    sub = device.add_subparsers(title="device commands", metavar="ACTION", required=True)

    add = sub.add_parser("add", help="issue a device's certificate and keys and write its bundle")
    add_dir_arg(add)
    add.add_argument("device_id", nargs="?", metavar="ID")
    add.add_argument("--from", dest="from_csv", type=Path, metavar="CSV",
                     help=f"add every row of a CSV file (columns: {', '.join(CSV_COLUMNS)}; "
                          "only id required)")
    add.add_argument("--kind", default=DEFAULT_KIND, help="sensor kind (default vibration)")
    add.add_argument("--broker-host", default=None,
                     help="broker host for agent.toml (default: gateway.toml's)")
    add.add_argument("--broker-port", type=int, default=None, help="broker port for agent.toml")
    add.add_argument("--suite", default=suites.NAMES[suites.X25519], choices=sorted(suites.BY_NAME),
                     help="the uplink suite the agent seals with, and the weakest the gateway will accept "
                          "from it (default x25519; x25519-mlkem768 = post-quantum hybrid)")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=os_errors(_add))

    lst = sub.add_parser("list", help="list devices")
    add_dir_arg(lst)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=os_errors(_list))

    show = sub.add_parser("show", help="show one device")
    add_dir_arg(show)
    show.add_argument("device_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=os_errors(_show))

    revoke = sub.add_parser(
        "revoke", help="revoke a device: registry status, CRL, and a disconnect at the broker",
        description=(
            "Marks the device revoked (the gateway refuses it within its registry poll), re-issues the "
            "CRL into the home and every broker folder, reloads each local broker (SIGHUP) so new "
            "connections are refused, and disconnects the device's open connection through mosquitto's "
            "dynamic-security plugin, before it returns."
        ),
    )
    add_dir_arg(revoke)
    revoke.add_argument("device_id", metavar="ID")
    add_no_broker_arg(revoke)
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=os_errors(_revoke))

    rotate = sub.add_parser(
        "rotate", help="new TLS certificate and e2e key; the old e2e key stays valid for --grace"
    )
    add_dir_arg(rotate)
    rotate.add_argument("device_id", metavar="ID")
    rotate.add_argument("--grace", type=int, default=86400, metavar="SECONDS",
                        help="how long the previous e2e key and certificate stay valid (default 86400)")
    rotate.add_argument("--json", action="store_true")
    rotate.set_defaults(func=os_errors(_rotate))

    set_suite = sub.add_parser(
        "set-suite", help="move a device to another uplink suite: bundle agent.toml and registry minimum",
        description=(
            "Rewrites the bundle's agent.toml to seal with SUITE and records SUITE as the weakest the "
            "gateway accepts from the device (messages below it are refused as downgrade). Safe order: "
            "--bundle-only first, install that agent.toml on the device and let its outbox drain, then "
            "run again without it to raise the minimum. Without a bundle copy: 'sgw device cmd ID "
            "set-suite --suite SUITE' tells the device over the sealed downlink and raises the minimum "
            "once a reply sealed in SUITE arrives."
        ),
    )
    add_dir_arg(set_suite)
    set_suite.add_argument("device_id", metavar="ID")
    set_suite.add_argument("suite", choices=sorted(suites.BY_NAME), metavar="SUITE",
                           help=f"one of {', '.join(sorted(suites.BY_NAME))}")
    set_suite.add_argument("--bundle-only", action="store_true",
                           help="rewrite the bundle only; leave the registry's minimum as it is")
    set_suite.add_argument("--lower", action="store_true",
                           help="allow a weaker minimum than the registry holds (that is a downgrade)")
    set_suite.add_argument("--json", action="store_true")
    set_suite.set_defaults(func=os_errors(_set_suite))

    remove = sub.add_parser("remove", help="delete a device, its keys and bundle; its certificate is revoked")
    add_dir_arg(remove)
    remove.add_argument("device_id", metavar="ID")
    add_no_broker_arg(remove)
    remove.add_argument("--json", action="store_true")
    remove.set_defaults(func=os_errors(_remove))

    device_cmd.register(sub)


def _add(args: argparse.Namespace) -> int:
    home = home_of(args)
    if (args.device_id is None) == (args.from_csv is None):
        raise ProvisioningError("give either a device ID or --from CSV")
    if args.device_id is not None:
        specs = [DeviceSpec(args.device_id, args.kind, args.broker_host, args.broker_port,
                            suites.BY_NAME[args.suite])]
    else:
        specs = read_csv(args.from_csv, kind=args.kind, host=args.broker_host, port=args.broker_port,
                         suite=suites.BY_NAME[args.suite])
    with _progress(len(specs)) as progress:
        count = add_devices(home, specs, progress=progress)
    if args.json:
        emit_json({"added": [s.device_id for s in specs],
                   "bundles": {s.device_id: str(home.device_dir(s.device_id)) for s in specs},
                   "suites": {s.device_id: suites.NAMES[s.suite] for s in specs}})
    elif count == 1:
        sys.stdout.write(f"added {specs[0].device_id}: bundle {home.device_dir(specs[0].device_id)}\n")
    else:
        sys.stdout.write(f"added {count} devices: bundles in {home.devices_dir}\n")
    return 0


def read_csv(path: Path, *, kind: str, host: str | None, port: int | None,
             suite: int = suites.X25519) -> list[DeviceSpec]:
    """Parse a device CSV. Any bad row aborts the whole file, naming the line; nothing is written."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvisioningError(f"cannot read {path}: {exc}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    fields = [f.strip() for f in reader.fieldnames or []]
    if "id" not in fields:
        raise ProvisioningError(f"{path}: the first line must be a header with an 'id' column")
    unknown = [f for f in fields if f not in CSV_COLUMNS]
    if unknown:
        raise ProvisioningError(f"{path}: unknown column {unknown[0]!r} (allowed: {', '.join(CSV_COLUMNS)})")
    reader.fieldnames = fields
    specs: list[DeviceSpec] = []
    for n, row in enumerate(reader, 2):
        if None in row:
            raise ProvisioningError(f"{path} row {n}: more fields than columns")
        device_id = (row.get("id") or "").strip()
        try:
            validate_device_id(device_id)
            port_text = (row.get("broker_port") or "").strip()
            row_port = int(port_text) if port_text else port
        except ProvisioningError as exc:
            raise ProvisioningError(f"{path} row {n}: {exc}") from None
        except ValueError:
            raise ProvisioningError(f"{path} row {n}: broker_port must be an integer") from None
        suite_text = (row.get("suite") or "").strip()
        if suite_text and suite_text not in suites.BY_NAME:
            known = ", ".join(sorted(suites.BY_NAME))
            raise ProvisioningError(f"{path} row {n}: suite must be one of {known}")
        specs.append(DeviceSpec(
            device_id, (row.get("kind") or "").strip() or kind,
            (row.get("broker_host") or "").strip() or host, row_port,
            suites.BY_NAME[suite_text] if suite_text else suite,
        ))
    if not specs:
        raise ProvisioningError(f"{path}: no devices listed")
    return specs


@contextmanager
def _progress(total: int) -> Iterator[Progress | None]:
    """A rich progress bar on a terminal, a few plain count lines otherwise (logs, CI)."""
    if total < 2:
        yield None
        return
    if sys.stderr.isatty():
        from rich.console import Console  # noqa: PLC0415 - only needed on a terminal
        from rich.progress import Progress as Bar  # noqa: PLC0415

        # stderr, so `sgw device add --from X --json > out.json` still shows the bar and keeps stdout clean.
        with Bar(console=Console(file=sys.stderr), transient=False) as bar:
            task = bar.add_task("issuing", total=total)
            yield lambda done, _total: bar.update(task, completed=done)
        return
    step = max(1, total // 10)

    def plain(done: int, all_: int) -> None:
        if done % step == 0 or done == all_:
            sys.stderr.write(f"issued {done}/{all_}\n")
    yield plain


def _fmt_ns(ns: int | None) -> str:
    if ns is None:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(records: list[DeviceRecord]) -> None:
    # Plain aligned columns: rich's Table took 12 s for a 10,000-device fleet, this takes milliseconds.
    header = ("ID", "KIND", "STATUS", "KEYS", "MIN SUITE", "CERT SERIAL", "CERT EXPIRES")
    rows = [
        (r.device_id, r.kind, r.status, ",".join(str(k.key_id) for k in r.keys),
         suites.NAMES.get(r.min_suite, str(r.min_suite)), r.cert_serial[:16], _fmt_ns(r.cert_not_after_ns))
        for r in records
    ]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
           for row in [header, *rows]]
    sys.stdout.write("\n".join(out) + "\n")


def _list(args: argparse.Namespace) -> int:
    with home_of(args).open_registry() as registry:
        records = registry.list()
    if args.json:
        emit_json([r.to_json() for r in records])
    else:
        _table(records)
    return 0


def _get(args: argparse.Namespace) -> DeviceRecord:
    validate_device_id(args.device_id)
    with home_of(args).open_registry() as registry:
        record = registry.get(args.device_id)
    if record is None:
        raise ProvisioningError(f"unknown device {args.device_id}")
    return record


def _show(args: argparse.Namespace) -> int:
    record = _get(args)
    if args.json:
        data = record.to_json()
        data["bundle"] = str(home_of(args).device_dir(record.device_id))
        emit_json(data)
        return 0
    lines = [
        f"id:          {record.device_id}",
        f"kind:        {record.kind}",
        f"status:      {record.status}"
        + (f" since {_fmt_ns(record.revoked_ns)}" if record.revoked_ns else ""),
        f"created:     {_fmt_ns(record.created_ns)}",
        f"certificate: serial {record.cert_serial}, expires {_fmt_ns(record.cert_not_after_ns)}",
        f"min suite:   {suites.NAMES.get(record.min_suite, record.min_suite)}",
        f"bundle:      {home_of(args).device_dir(record.device_id)}",
        "e2e keys:",
    ]
    lines += [
        f"  key_id {k.key_id}: public {k.public.hex()}, valid until "
        f"{_fmt_ns(k.not_after_ns) if k.not_after_ns else 'open'}"
        for k in record.keys
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _warn(warnings: Sequence[str]) -> None:
    for warning in warnings:
        sys.stderr.write(f"sgw: warning: {warning}\n")


def _set_suite(args: argparse.Namespace) -> int:
    home = home_of(args)
    change = set_device_suite(home, args.device_id, suites.BY_NAME[args.suite], bundle_only=args.bundle_only,
                              lower=args.lower)
    if args.json:
        emit_json({"id": args.device_id, "suite": args.suite,
                   "previous_min_suite": suites.NAMES[change.previous],
                   "min_suite": suites.NAMES[change.minimum],
                   "agent_toml": str(change.bundle) if change.bundle else None})
        return 0
    where = (f"{change.bundle} seals with {args.suite}" if change.bundle
             else "no bundle in the home to rewrite")
    floor = suites.NAMES[change.minimum]
    sys.stdout.write(f"{args.device_id}: {where}; registry minimum {floor}"
                     + (" (unchanged)" if change.minimum == change.previous else
                        f" (was {suites.NAMES[change.previous]})") + "\n")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    validate_device_id(args.device_id)
    home = home_of(args)
    _warn(revoke_device(home, args.device_id))
    broker = _enforce(home, args.device_id, skip=args.no_broker)
    if args.json:
        emit_json({"id": args.device_id, "status": "revoked", "crl": str(home.crl),
                   "broker_reloaded_pids": broker.reloaded if broker else [],
                   "broker_disconnected": bool(broker and broker.disconnected)})
        return 0
    sys.stdout.write(
        f"revoked {args.device_id}; CRL re-issued ({home.crl}); {_broker_summary(broker)}; the gateway "
        "refuses the device's messages within its poll interval.\n"
    )
    return 0


def add_no_broker_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-broker", action="store_true",
        help="change the registry and CRL only: no broker reload, no disconnect (the device stays "
             "connected until it drops; the gateway refuses its messages)",
    )


def _enforce(home: Home, device_id: str, *, skip: bool = False) -> Enforcement | None:
    """Reload the brokers' CRL and disconnect the device (pki/broker_control.py); warnings to stderr.
    None with --no-broker."""
    if skip:
        return None
    # Imported here: paho is only needed when a revocation must reach the broker.
    from gateway.pki.broker_control import enforce_revocation  # noqa: PLC0415

    result = enforce_revocation(home, device_id)
    _warn(result.warnings)
    return result


def _broker_summary(result: Enforcement | None) -> str:
    if result is None:
        return "broker left alone (--no-broker): reload it so new connections are refused"
    reloaded = (f"broker reloaded (pid {', '.join(map(str, result.reloaded))})" if result.reloaded
                else "no local broker to reload")
    return f"{reloaded}, {'open connections closed' if result.disconnected else 'NOT disconnected'}"


def _rotate(args: argparse.Namespace) -> int:
    validate_device_id(args.device_id)
    home = home_of(args)
    result = rotate_device(home, args.device_id, grace_s=args.grace)
    _warn(result.warnings)
    if args.json:
        emit_json({"id": args.device_id, "key_id": result.key_id, "cert_serial": result.cert_serial,
                   "old_valid_until_ns": result.old_valid_until_ns,
                   "bundle": str(home.device_dir(args.device_id))})
    else:
        sys.stdout.write(
            f"rotated {args.device_id}: new e2e key_id {result.key_id}, "
            f"new certificate {result.cert_serial}; "
            f"previous key valid until {_fmt_ns(result.old_valid_until_ns)}. Copy the bundle "
            f"{home.device_dir(args.device_id)} to the device.\n"
        )
    return 0


def _remove(args: argparse.Namespace) -> int:
    validate_device_id(args.device_id)
    home = home_of(args)
    _warn(remove_device(home, args.device_id))
    broker = _enforce(home, args.device_id, skip=args.no_broker)
    if args.json:
        emit_json({"id": args.device_id, "status": "removed", "crl": str(home.crl),
                   "broker_reloaded_pids": broker.reloaded if broker else [],
                   "broker_disconnected": bool(broker and broker.disconnected)})
        return 0
    sys.stdout.write(f"removed {args.device_id}; its certificate is on the CRL ({home.crl}); "
                     f"{_broker_summary(broker)}\n")
    return 0
