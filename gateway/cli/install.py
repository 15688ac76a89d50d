"""`sgw install`: put the hardened systemd units, a sysusers entry, config templates and the directories
the units expect in place, then say what the operator does next.

Everything is written under `--prefix` (default `/`), so the same code path is exercised by tests into a
temporary folder. Only a real install (`--prefix /`, not `--dry-run`) touches the live system beyond files:
it creates the `sgw` user through systemd-sysusers and reloads systemd. Units are ours and are replaced
when they differ; config files are the operator's once written and are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import LocalError

UNITS = {"gateway": "sgw-gateway.service", "agent": "sgw-agent.service"}
CONFIGS = {"gateway": "gateway.toml", "agent": "agent.toml"}
MOSQUITTO_DROPIN = "mosquitto.service.d/sgw.conf"
# Installed with the gateway: the daily CRL renewal (an expired CRL makes mosquitto refuse every client).
CRL_UNITS = ("sgw-crl.service", "sgw-crl.timer")
CRL_TIMER = CRL_UNITS[1]
DEFAULT_BIN = "/usr/local/bin/sgw"
SYSUSERS_LINE = 'u sgw - "sgw gateway" /var/lib/sgw\n'
_HINT = " (run as root, or pass --prefix)"
# ProtectHome=yes and PrivateTmp=yes hide these from the services: ExecStart there fails with 203/EXEC.
_HIDDEN_FROM_UNITS = ("/home/", "/root/", "/tmp/", "/var/tmp/")  # noqa: S108 - paths checked, not used


@dataclass
class Action:
    action: str  # write | update | unchanged | keep | mkdir | exists | run | skip
    path: str
    detail: str = ""


@dataclass
class Plan:
    prefix: str
    dry_run: bool
    actions: list[Action] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def deploy_dir() -> Path:
    """The deploy/ tree: inside an installed wheel (gateway/_deploy) or, from a checkout, the repo's."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_deploy", here.parent / "deploy"):
        if (candidate / "systemd").is_dir():
            return candidate
    raise LocalError("cannot find the deploy/ files (systemd units); run from a checkout or pass --source")


def _default_bin() -> str:
    # The unit must start the same sgw the operator just ran, wherever pip/pipx put it.
    found = shutil.which("sgw")
    return str(Path(found).absolute()) if found else DEFAULT_BIN


def render_unit(text: str, sgw_bin: str) -> str:
    return text.replace(DEFAULT_BIN + " ", sgw_bin + " ")


def _under(prefix: Path, absolute: str) -> Path:
    return prefix / absolute.lstrip("/")


def _place(plan: Plan, dest: Path, content: str, *, mode: int, overwrite: bool) -> None:
    if dest.exists():
        same = dest.read_text(encoding="utf-8") == content
        if same:
            plan.actions.append(Action("unchanged", str(dest)))
            return
        if not overwrite:
            plan.actions.append(Action("keep", str(dest), "exists; not overwritten (yours to edit)"))
            return
        verb = "update"
    else:
        verb = "write"
    plan.actions.append(Action(verb, str(dest), f"mode {mode:04o}"))
    if plan.dry_run:
        return
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(content, encoding="utf-8")
        tmp.chmod(mode)
        tmp.replace(dest)
    except OSError as exc:
        raise LocalError(f"cannot write {dest}: {exc.strerror or exc}{_HINT}") from None


def _mkdir(plan: Plan, path: Path, mode: int) -> None:
    if path.is_dir():
        plan.actions.append(Action("exists", str(path)))
        return
    plan.actions.append(Action("mkdir", str(path), f"mode {mode:04o}"))
    if plan.dry_run:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
    except OSError as exc:
        raise LocalError(f"cannot create {path}: {exc.strerror or exc}{_HINT}") from None


def _run(plan: Plan, argv: list[str], live: bool) -> None:
    if not live:
        plan.actions.append(Action("skip", " ".join(argv), "not a live install (--prefix or --dry-run)"))
        return
    plan.actions.append(Action("run", " ".join(argv)))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalError(f"{argv[0]} failed: {exc}") from None
    if proc.returncode != 0:
        raise LocalError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


def plan_install(
    prefix: Path, units: list[str], *, dry_run: bool, sgw_bin: str, source: Path | None = None
) -> Plan:
    src = source if source is not None else deploy_dir()
    plan = Plan(prefix=str(prefix), dry_run=dry_run)
    live = prefix.resolve() == Path("/") and not dry_run
    if not Path(sgw_bin).is_absolute():
        raise LocalError(f"--sgw-bin must be an absolute path, got {sgw_bin}")
    if sgw_bin.startswith(_HIDDEN_FROM_UNITS):
        plan.warnings.append(
            f"{sgw_bin} is under /home, /root or /tmp, which the units hide; install sgw under /usr/local "
            "or /opt (e.g. pipx with PIPX_BIN_DIR=/usr/local/bin) or pass --sgw-bin"
        )

    unit_dir = _under(prefix, "/etc/systemd/system")
    for name in units:
        unit = UNITS[name]
        text = (src / "systemd" / unit).read_text(encoding="utf-8")
        _place(plan, unit_dir / unit, render_unit(text, sgw_bin), mode=0o644, overwrite=True)
        conf = (src / "config" / CONFIGS[name]).read_text(encoding="utf-8")
        _place(plan, _under(prefix, f"/etc/sgw/{CONFIGS[name]}"), conf, mode=0o644, overwrite=False)

    if "gateway" in units:
        # The broker runs beside the gateway; the drop-in raises its file limit and sandboxes it.
        dropin = (src / "systemd" / MOSQUITTO_DROPIN).read_text(encoding="utf-8")
        _place(plan, unit_dir / MOSQUITTO_DROPIN, dropin, mode=0o644, overwrite=True)
        for unit in CRL_UNITS:
            text = (src / "systemd" / unit).read_text(encoding="utf-8")
            _place(plan, unit_dir / unit, render_unit(text, sgw_bin), mode=0o644, overwrite=True)
        sysusers = _under(prefix, "/etc/sysusers.d/sgw.conf")
        _place(plan, sysusers, SYSUSERS_LINE, mode=0o644, overwrite=True)
        _run(plan, ["systemd-sysusers", str(sysusers)], live)
        # The operator provisions into the gateway's state directory before the first start, so it must
        # exist now; systemd fixes its owner to User= on start.
        state = _under(prefix, "/var/lib/sgw")
        _mkdir(plan, state, 0o750)
        _run(plan, ["chown", "sgw:sgw", str(state)], live)
        plan.next_steps += [
            "sudo -u sgw sgw ca init --dir /var/lib/sgw        # CA, broker, gateway keys, registry",
            "sudo -u sgw sgw device add --dir /var/lib/sgw ...  # per device; copy its bundle to the device",
            "edit /etc/sgw/gateway.toml (broker host, gateway id, accelerator)",
            "systemctl enable --now sgw-gateway.service",
        ]
    if "agent" in units:
        # Holds the device bundle; root-only because only systemd (LoadCredential=) reads it.
        _mkdir(plan, _under(prefix, "/etc/sgw/agent"), 0o700)
        plan.next_steps += [
            "copy ca.crt device.crt device.key e2e.key gateway_e2e.pub from the bundle to /etc/sgw/agent/",
            "edit /etc/sgw/agent.toml: [device], [mqtt] host and [e2e] key ids from the bundle's agent.toml",
            "systemctl enable --now sgw-agent.service",
        ]

    first: list[str] = []
    if not live and "gateway" in units:
        first += ["systemd-sysusers && chown sgw:sgw /var/lib/sgw   # on the target system"]
    booted = live and Path("/run/systemd/system").is_dir()
    if booted:
        _run(plan, ["systemctl", "daemon-reload"], live)
    else:
        first.append("systemctl daemon-reload")
    if "gateway" in units:
        # Enabled now, not left to the operator: forgetting it surfaces only a year later, as an outage.
        # Until `sgw ca init` the service skips itself (ConditionPathExists=). `enable` alone works
        # without a running systemd (it only makes the timers.target link).
        _run(plan, ["systemctl", "enable", *(["--now"] if booted else []), CRL_TIMER], live)
        if not live:
            first.append(f"systemctl enable --now {CRL_TIMER}   # daily CRL renewal")
    plan.next_steps = first + plan.next_steps
    return plan


def _print_text(plan: Plan) -> None:
    head = "would do" if plan.dry_run else "done"
    print(f"sgw install ({head}, prefix {plan.prefix}):")  # noqa: T201 - the report is the command's output
    for a in plan.actions:
        extra = f"  ({a.detail})" if a.detail else ""
        print(f"  {a.action:<9} {a.path}{extra}")  # noqa: T201
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)  # noqa: T201
    print("next:")  # noqa: T201
    for i, step in enumerate(plan.next_steps, 1):
        print(f"  {i}. {step}")  # noqa: T201


def run(args: argparse.Namespace) -> int:
    units = list(UNITS) if args.unit == "all" else [args.unit]
    plan = plan_install(
        Path(args.prefix),
        units,
        dry_run=args.dry_run,
        sgw_bin=args.sgw_bin or _default_bin(),
        source=Path(args.source) if args.source else None,
    )
    if args.json:
        out: dict[str, Any] = asdict(plan)
        print(json.dumps(out, indent=2))  # noqa: T201
    else:
        _print_text(plan)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "install",
        help="install the hardened systemd units, config templates and directories",
        description=(
            "Install sgw-gateway.service and/or sgw-agent.service into PREFIX/etc/systemd/system (with the "
            "gateway: a mosquitto.service drop-in, a sysusers entry for its 'sgw' user and sgw-crl.timer, "
            "the daily CRL renewal, enabled on a live install), config templates "
            "under PREFIX/etc/sgw (kept if present) "
            "and the directories the units use. With --prefix other than / nothing outside PREFIX is touched "
            "(no systemctl, no user creation)."
        ),
    )
    p.add_argument("--prefix", default=os.sep, help="root to install under (default: /)")
    p.add_argument(
        "--unit", choices=("gateway", "agent", "all"), default="all", help="which unit (default: all)"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    p.add_argument("--json", action="store_true", help="print the actions and next steps as JSON")
    p.add_argument("--sgw-bin", default="", help="absolute path ExecStart runs (default: this sgw)")
    p.add_argument("--source", default="", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
