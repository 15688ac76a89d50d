"""`sgw enroll ...`: zero-touch enrollment from a factory identity (IDevID): the allow-list of
manufacturer CAs and serials, what each device asked and got, and the service that answers."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cryptography import x509

from gateway.cli.ca import add_dir_arg, emit_json, home_of, os_errors
from gateway.common.logs import setup_logging
from gateway.core import suites
from gateway.core.envelope import MAX_DEVICE_ID_LEN, id_pattern
from gateway.errors import ProvisioningError
from gateway.pki.broker import refresh_manufacturers
from gateway.pki.home import Home
from gateway.registry.enrollment import EnrollmentStore, fingerprint
from gateway.registry.ids import validate_device_id

# The serial becomes (part of) the device id, so it takes the device id alphabet.
_SERIAL = id_pattern(MAX_DEVICE_ID_LEN)  # serials take the device-id alphabet


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enroll = subparsers.add_parser(
        "enroll", help="zero-touch enrollment: allow-list manufacturer CAs, list devices, serve requests",
        description="A device that ships with a factory certificate (IDevID, serial number in its subject) "
                    "enrols itself: it makes its keys, proves its IDevID, and gets its sgw identity. "
                    "docs/OPERATIONS.md, 'Zero-touch enrollment'.")
    sub = enroll.add_subparsers(title="enroll commands", metavar="ACTION", required=True)

    allow = sub.add_parser("allow", help="allow-list a manufacturer CA, and optionally only some serials")
    add_dir_arg(allow)
    allow.add_argument("--manufacturer-ca", type=Path, required=True, metavar="FILE",
                       help="the manufacturer CA certificate (PEM) that issues the devices' IDevIDs")
    allow.add_argument("--serial", action="append", default=[], metavar="S",
                       help="enrol only these serials (repeatable; default: every serial the CA signs)")
    allow.add_argument("--prefix", default="",
                       help="device id = PREFIX + serial (default none); fixed when the CA is first added")
    allow.add_argument("--suite", choices=sorted(suites.BY_NAME), default=None,
                       help="the uplink suite its devices seal with and are held to (first time: x25519; "
                            "given again: for devices enrolled from then on)")
    allow.add_argument("--json", action="store_true")
    allow.set_defaults(func=os_errors(_allow))

    refuse = sub.add_parser("refuse", help="refuse a serial from now on (refused_by_operator)")
    add_dir_arg(refuse)
    refuse.add_argument("--manufacturer-ca", type=Path, required=True, metavar="FILE")
    refuse.add_argument("--serial", required=True, metavar="S")
    refuse.add_argument("--note", default="", help="shown in 'sgw enroll list' and sent to the device")
    refuse.add_argument("--json", action="store_true")
    refuse.set_defaults(func=os_errors(_refuse))

    remove = sub.add_parser("remove", help="remove a manufacturer CA from the allow-list, or forget a serial "
                                           "(its allow/refuse line and enrollment record)")
    add_dir_arg(remove)
    remove.add_argument("--manufacturer-ca", type=Path, required=True, metavar="FILE")
    remove.add_argument("--serial", default=None, metavar="S")
    remove.add_argument("--json", action="store_true")
    remove.set_defaults(func=os_errors(_remove))

    show = sub.add_parser("list", help="allow-listed CAs and every device: pending, approved, refused (why)")
    add_dir_arg(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=os_errors(_list))

    serve = sub.add_parser("serve", help="run the enrollment service (where the CA is) until SIGTERM")
    add_dir_arg(serve)
    serve.add_argument("--host", default=None, help="broker host (default: gateway.toml's)")
    serve.add_argument("--port", type=int, default=None, help="broker main port (default: gateway.toml's)")
    serve.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.set_defaults(func=os_errors(_serve))


def _ca_file(path: Path) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ProvisioningError(f"{path}: no such file") from None
    except ValueError:
        raise ProvisioningError(f"{path}: not a PEM certificate") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ProvisioningError(f"{path}: not a CA certificate (basicConstraints CA:TRUE)")
    return cert


def _serial(serial: str) -> str:
    if not _SERIAL.fullmatch(serial):
        raise ProvisioningError(f"invalid serial {serial!r}: 1-64 of A-Z a-z 0-9 . _ -")
    return serial


def _store(home: Home) -> EnrollmentStore:
    return EnrollmentStore(home.open_registry())


def _warn_brokers(home: Home) -> list[str]:
    done, warnings = refresh_manufacturers(home)
    for warning in warnings:
        sys.stderr.write(f"sgw: warning: {warning}\n")
    if done:
        sys.stderr.write("sgw: restart mosquitto to load the new manufacturer CAs: "
                         + ", ".join(str(d) for d in done) + "\n")
    return [str(d) for d in done]


def _allow(args: argparse.Namespace) -> int:
    home = home_of(args)
    cert = _ca_file(args.manufacturer_ca)
    serials = [_serial(s) for s in args.serial]
    if args.prefix:
        validate_device_id(args.prefix + "x")
    suite = None if args.suite is None else suites.BY_NAME[args.suite]
    if suite == suites.HYBRID and not home.gateway_kem_pub.exists():
        raise ProvisioningError(f"{home.root} has no gateway ML-KEM-768 key for suite x25519-mlkem768; "
                                "run 'sgw ca migrate' first")
    store = _store(home)
    try:
        fp = store.allow(cert, serials, prefix=args.prefix, now_ns=time.time_ns(), suite=suite)
    finally:
        store.registry.close()
    brokers = _warn_brokers(home)
    if args.json:
        emit_json({"fingerprint": fp, "subject": cert.subject.rfc4514_string(), "serials": serials,
                   "prefix": args.prefix, "brokers_updated": brokers})
    else:
        which = ", ".join(serials) if serials else "any serial"
        sys.stdout.write(f"allowed {cert.subject.rfc4514_string()} ({fp[:16]}): {which}\n")
    return 0


def _refuse(args: argparse.Namespace) -> int:
    home = home_of(args)
    fp = fingerprint(_ca_file(args.manufacturer_ca))
    serial = _serial(args.serial)
    store = _store(home)
    try:
        store.refuse_serial(fp, serial, args.note)
    finally:
        store.registry.close()
    if args.json:
        emit_json({"fingerprint": fp, "serial": serial, "state": "refused", "note": args.note})
    else:
        sys.stdout.write(f"serial {serial} refused\n")
    return 0


def _remove(args: argparse.Namespace) -> int:
    home = home_of(args)
    fp = fingerprint(_ca_file(args.manufacturer_ca))
    store = _store(home)
    try:
        if args.serial is None:
            store.remove_ca(fp)
        else:
            store.remove_serial(fp, _serial(args.serial))
    finally:
        store.registry.close()
    brokers = _warn_brokers(home) if args.serial is None else []
    if args.json:
        emit_json({"fingerprint": fp, "serial": args.serial, "removed": True, "brokers_updated": brokers})
    else:
        what = f"serial {args.serial}" if args.serial else f"manufacturer CA {fp[:16]}"
        sys.stdout.write(f"removed {what}\n")
    return 0


def listing(store: EnrollmentStore) -> dict[str, object]:
    """What `sgw enroll list --json` prints: the CAs and one row per serial known in any way."""
    cas = store.cas()
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for fp, serial, state, note in store.serials():
        listed = "pending" if state == "allowed" else "refused"
        rows[(fp, serial)] = {"ca": fp, "serial": serial, "state": listed,
                              "reason": "" if state == "allowed" else "refused_by_operator", "detail": note,
                              "device_id": None, "attempts": 0, "updated_ns": None}
    for e in store.list():
        row = rows.setdefault((e.fingerprint, e.serial), {"ca": e.fingerprint, "serial": e.serial})
        # An operator's refusal is what new requests get, so it is shown over a recorded reason; an
        # identity issued before it stays approved.
        listed_refused = row.get("reason") == "refused_by_operator"
        row.update({"state": e.state, "device_id": e.device_id, "attempts": e.attempts,
                    "updated_ns": e.updated_ns})
        if not listed_refused:
            row.update({"reason": e.reason, "detail": e.detail})
    return {
        "cas": [{"fingerprint": c.fingerprint, "subject": c.cert.subject.rfc4514_string(), "prefix": c.prefix,
                 "any_serial": c.any_serial, "suite": suites.NAMES.get(c.suite, str(c.suite))} for c in cas],
        "devices": [rows[k] for k in sorted(rows)],
    }


def _list(args: argparse.Namespace) -> int:
    store = _store(home_of(args))
    try:
        data = listing(store)
    finally:
        store.registry.close()
    if args.json:
        emit_json(data)
        return 0
    out = sys.stdout
    for ca in data["cas"]:  # type: ignore[attr-defined]
        serials = "any serial" if ca["any_serial"] else "listed serials"
        out.write(f"CA {ca['fingerprint'][:16]} {ca['subject']} ({serials}, prefix {ca['prefix']!r}, "
                  f"suite {ca['suite']})\n")
    out.write(f"{'SERIAL':<24} {'STATE':<9} {'DEVICE':<24} REASON\n")
    for row in data["devices"]:  # type: ignore[attr-defined]
        reason = f"{row['reason']}: {row['detail']}" if row.get("reason") else ""
        out.write(f"{row['serial']:<24} {row['state']:<9} {row['device_id'] or '-':<24} {reason}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gateway.server.enroll import EnrollService  # noqa: PLC0415  (paho only for this command)

    setup_logging(args.log_level, args.log_format)
    home = home_of(args)
    host, port, _ = home.broker_defaults()
    return EnrollService(home, args.host or host, args.port or port, args.metrics_port).run()
