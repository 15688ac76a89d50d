"""`sgw device cmd (ID | --all | --kind K) ACTION`: a sealed command to devices, and their sealed replies.

The command travels as gateway/cli/cmd_channel.py says (sealed to each device's registered key, sender
`sgw-cli`, published as `sgw-admin`); the device runs it and seals its reply into its outbox like any
uplink message, which the channel opens. A device that is offline gets the command when it reconnects
(the broker keeps its session and the command until it expires): the command then says "no reply yet",
and the gateway logs the reply when it comes.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.cli.ca import add_dir_arg, home_of, os_errors
from gateway.errors import ProvisioningError

ACTIONS = ("ping", "status", "commission", "set-config", "rotate-key", "reboot-agent", "update-gateway-key",
           "set-suite")
EXIT_NOT_ALL_OK = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cmd", help="send a sealed command (ping, status, commission, set-config, ...) and print the replies",
        description=(
            "sgw device cmd ID ACTION | --all ACTION | --kind KIND ACTION. Actions: ping, status (the "
            "device's DeviceStatus), commission (learn the machine's normal again), set-config KEY=VALUE "
            "(filter.summary_interval_s, publish_rate, log.level; until the agent restarts), rotate-key "
            "(the device makes new TLS and e2e keys, this home's CA certifies them), reboot-agent "
            "(drain and restart under systemd), update-gateway-key (after 'sgw gateway rotate-key': the "
            "device trusts the new gateway key, seals with it from its restart, trusts the old one until "
            "the grace ends), set-suite --suite NAME (the device seals with that suite from its restart; "
            "once a reply sealed in it arrives, the registry's minimum is raised to it). Exit 0 "
            "when every device replied ok, 1 otherwise."
        ),
    )
    add_dir_arg(p)
    p.add_argument("words", nargs="+", metavar="ID ACTION", help="device id (unless --all/--kind) and action")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="every active device")
    group.add_argument("--kind", metavar="KIND", help="every active device of this sensor kind")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set-config: a setting")
    p.add_argument("--wait", type=float, default=10.0, metavar="S",
                   help="seconds to wait for replies (default 10)")
    p.add_argument("--expires", type=float, default=3600.0, metavar="S",
                   help="an offline device still runs it if it reconnects within this (default 3600)")
    p.add_argument("--grace", type=int, default=86400, metavar="SECONDS",
                   help="rotate-key: how long the old e2e key and certificate stay valid (default 86400)")
    p.add_argument("--suite", metavar="NAME", default=None,
                   help="set-suite: x25519 | x25519-mlkem768")
    p.add_argument("--lower", action="store_true",
                   help="set-suite: allow a weaker registry minimum than the one held (that is a downgrade)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=os_errors(_cmd))


@dataclass
class _Target:
    device_id: str
    command_id: str = ""
    reply: Any = None
    status: Any = None
    sent: bool = False
    # rotate-key: the CA's answer to the device's request, or why it refused
    new_key_id: int = 0
    certificate: bytes = b""
    rotated: Any = None
    refused: str = ""
    never_seen: bool = False
    confirmed: bool = False  # set-suite: a reply sealed in the new suite arrived; the minimum is raised


def _parse(args: argparse.Namespace) -> tuple[str | None, str]:
    want = 1 if (args.all or args.kind) else 2
    if len(args.words) != want:
        raise ProvisioningError("usage: sgw device cmd ID ACTION | --all ACTION | --kind KIND ACTION")
    device_id, action = (None, args.words[0]) if want == 1 else (args.words[0], args.words[1])
    if action not in ACTIONS:
        raise ProvisioningError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    if action == "set-config" and not args.set:
        raise ProvisioningError("set-config needs at least one --set KEY=VALUE")
    if args.set and action != "set-config":
        raise ProvisioningError("--set goes with set-config only")
    if (action == "set-suite") != (args.suite is not None):
        raise ProvisioningError("set-suite needs --suite NAME, and --suite goes with set-suite only")
    if not 0 <= args.grace <= 30 * 86400:
        raise ProvisioningError("--grace must be in [0, 2592000] seconds")
    if not 0 < args.wait <= 3600 or not 1 <= args.expires <= 7 * 86400:
        raise ProvisioningError("--wait must be in (0, 3600] and --expires in [1, 604800] seconds")
    return device_id, action


def _cmd(args: argparse.Namespace) -> int:
    # Imported here: the crypto, paho and registry are only needed when a command is sent.
    from gateway.cli.cmd_channel import CommandChannel, select_targets, send_and_wait  # noqa: PLC0415
    from gateway.pb import downlink_pb2 as dpb  # noqa: PLC0415

    device_id, action = _parse(args)
    config = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ProvisioningError(f"--set {item!r}: expected KEY=VALUE")
        config.append(dpb.ConfigEntry(key=key, value=value))
    home = home_of(args)
    chosen = select_targets(home, ids=[device_id] if device_id is not None else (), kind=args.kind,
                            every=args.all)
    targets = {d: _Target(d) for d in chosen}
    with home.open_registry() as registry:
        # A device no gateway ever accepted a message from has most likely never connected, so the
        # broker holds no session for it and drops its command: said so instead of "queued".
        for device in set(targets) - registry.seen_devices():
            targets[device].never_seen = True
    kind = getattr(dpb, f"COMMAND_KIND_{action.upper().replace('-', '_')}")
    expires_ms = int((time.time() + args.expires) * 1000)
    extra: dict[str, Any] = {}
    suite = 0
    if action == "update-gateway-key":
        extra = _gateway_key_fields(home)
    elif action == "set-suite":
        suite = _suite_checked(home, args.suite, list(targets), lower=args.lower)
        extra = {"suite": suite}

    def exchange(channel: CommandChannel, group: Iterable[_Target], make: Callable[[_Target], Any]) -> None:
        """Send each target its command and wait (up to --wait) for the replies that name it."""
        group = list(group)
        for t in group:
            t.command_id, t.reply, t.status = "c" + secrets.token_hex(8), None, None
        sent, replies = send_and_wait(channel, {t.device_id: make(t) for t in group}, args.wait)
        for t in group:
            t.sent = t.device_id in sent
            r = replies.get(t.device_id)
            if r is not None:
                t.reply, t.status = r.reply, r.status

    with CommandChannel(home, chosen) as channel:
        exchange(channel, targets.values(),
                 lambda t: dpb.Command(id=t.command_id, kind=kind, expires_at_ms=expires_ms, config=config,
                                       **extra))
        if action == "set-suite":
            _confirm_suite(home, channel, [t for t in targets.values() if t.reply is not None and t.reply.ok],
                           suite, args.wait, lower=args.lower)
        if action == "rotate-key":
            second = [t for t in targets.values() if _rotate_in_home(home, t, args.grace)]
            exchange(channel, second, lambda t: dpb.Command(id=t.command_id, kind=kind,
                                                            expires_at_ms=expires_ms,
                                                            new_key_id=t.new_key_id,
                                                            certificate=t.certificate))
    return _report(list(targets.values()), action, args.json, expires_ms)


def _gateway_key_fields(home: Any) -> dict[str, Any]:
    """update-gateway-key: the home's current gateway key, and the end of the grace of those before it."""
    from gateway.pki.gateway_keys import load_keys, public_keys  # noqa: PLC0415

    loaded = load_keys(home)
    now_ns = time.time_ns()
    ends = [until for until in loaded.accept_until_ns.values() if until > now_ns]
    if not ends:
        raise ProvisioningError("no gateway key is being rotated out: run 'sgw gateway rotate-key' first "
                                "(a device whose old key's grace has ended needs a new bundle)")
    public, mlkem = public_keys(home, loaded.key_id)
    return {"gateway_key_id": loaded.key_id, "gateway_public": public, "gateway_mlkem_public": mlkem,
            "previous_until_ms": max(ends) // 1_000_000}


def _suite_checked(home: Any, name: str, devices: Sequence[str], *, lower: bool) -> int:
    from gateway.core import suites  # noqa: PLC0415

    if name not in suites.BY_NAME:
        raise ProvisioningError(f"--suite {name!r}: one of {', '.join(sorted(suites.BY_NAME))}")
    suite = suites.BY_NAME[name]
    with home.open_registry() as registry:
        for device in devices:
            rec = registry.get(device)
            if rec is not None and suites.below(suite, rec.min_suite) and not lower:
                raise ProvisioningError(
                    f"device {device} is held to {suites.NAMES.get(rec.min_suite, rec.min_suite)}; a lower "
                    "minimum lets it be downgraded: pass --lower to mean it")
    return suite


def _confirm_suite(home: Any, channel: Any, group: list[_Target], suite: int, wait_s: float, *,
                   lower: bool) -> None:
    """After the device's ok (it persisted the suite and restarts on it): ping until a reply sealed in the
    new suite comes, then raise the registry's minimum. The reply went through the device's outbox behind
    everything sealed before it, so the old suite's backlog has been published by then."""
    from gateway.pb import downlink_pb2 as dpb  # noqa: PLC0415
    from gateway.pki.home import set_device_suite  # noqa: PLC0415

    deadline = time.monotonic() + wait_s
    pending = {t.device_id: t for t in group}
    while pending and time.monotonic() < deadline:
        ids = {d: "c" + secrets.token_hex(8) for d in pending}
        for d, cid in ids.items():
            channel.send(d, dpb.Command(id=cid, kind=dpb.COMMAND_KIND_PING,
                                        expires_at_ms=int((time.time() + 30) * 1000)))
        until = min(deadline, time.monotonic() + 3.0)
        while pending and time.monotonic() < until:
            for r in channel.replies(0.2, ids.values()):
                t = pending.get(r.device_id)
                if t is not None and r.suite == suite and ids.get(r.device_id) == r.reply.command_id:
                    set_device_suite(home, t.device_id, suite, lower=lower, registry_only=True)
                    t.confirmed = True
                    del pending[r.device_id]


def _rotate_in_home(home: Any, t: _Target, grace_s: int) -> bool:
    """The CA's half of a rotation the device began; False (the row says why) when there is nothing to
    do or the request is refused."""
    from gateway.pki.home import rotate_device_remote  # noqa: PLC0415

    if t.reply is None or not t.reply.ok or not t.reply.new_key_id:
        return False
    try:
        rotated, t.certificate = rotate_device_remote(
            home, t.device_id, e2e_public=t.reply.new_e2e_public, csr_der=t.reply.csr,
            key_id=t.reply.new_key_id, grace_s=grace_s)
    except ProvisioningError as exc:
        t.refused = str(exc)
        return False
    t.rotated, t.new_key_id = rotated, t.reply.new_key_id
    return True


def _report(targets: Sequence[_Target], action: str, as_json: bool, expires_ms: int) -> int:
    from google.protobuf.json_format import MessageToDict  # noqa: PLC0415

    rows = []
    for t in targets:
        row: dict[str, Any] = {"device": t.device_id, "command_id": t.command_id, "action": action}
        if t.refused:
            row.update(outcome="error", error=f"the CA refused the device's request: {t.refused}")
        elif not t.sent:
            row.update(outcome="not_sent")
        elif t.reply is None:
            row.update(outcome="no_reply", queued_until_ms=None if t.never_seen else expires_ms,
                       never_seen=t.never_seen)
        else:
            row.update(outcome="ok" if t.reply.ok else "error", error=t.reply.error or None,
                       values={v.key: v.value for v in t.reply.values} or None)
            if t.status is not None:
                row["status"] = MessageToDict(t.status, preserving_proto_field_name=True)
            if action == "set-suite" and t.reply.ok:
                row["confirmed"] = t.confirmed
                if not t.confirmed:
                    row.update(outcome="unconfirmed",
                               error="the device took the suite but no reply sealed in it came within "
                                     "--wait; the registry minimum is unchanged (run it again)")
            if t.rotated is not None and t.reply.ok:
                row["values"] = {"key_id": str(t.rotated.key_id), "cert_serial": t.rotated.cert_serial,
                                 "old_key_valid_until_ns": str(t.rotated.old_valid_until_ns)}
        rows.append(row)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    else:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires_ms / 1000))
        for row in rows:
            sys.stdout.write(f"{row['device']}\t{row['outcome']}\t{_detail(row, until)}\n")
    return 0 if all(r["outcome"] == "ok" for r in rows) else EXIT_NOT_ALL_OK


def _detail(row: dict[str, Any], until: str) -> str:
    outcome = row["outcome"]
    if outcome == "ok":
        values = " ".join(f"{k}={v}" for k, v in (row.get("values") or {}).items())
        return values or (_status_line(row["status"]) if "status" in row else "")
    if outcome in ("error", "unconfirmed"):
        return str(row["error"] or "")
    if outcome == "no_reply" and row.get("never_seen"):
        return ("no reply: no gateway has ever heard from this device, so the broker likely holds no "
                "session for it and drops the command; send it again once the device is online")
    if outcome == "no_reply":
        return f"no reply yet: the broker keeps it for the device until {until}; the gateway logs the reply"
    return "not sent (the broker connection failed)"


def _status_line(status: dict[str, Any]) -> str:
    keys = ("state", "agent_version", "uptime_s", "windows_seen", "windows_forwarded", "outbox_messages",
            "commissioning")
    return " ".join(f"{k}={status[k]}" for k in keys if k in status)
