"""`sgw model rollout RELEASE --canary PCT --watch S`: a signed release to a canary share, judged, then all.

1. The fleet is every active device of the release's kind, in a stable order per release (the same order
   `deploy --percent` uses); the canary is its first PCT % (at least one device), the rest the others.
2. Each device's DeviceStatus counters are read (a sealed status command), the release is deployed to the
   canary (gateway/cli/model_deploy.py deliver), the counters are read again, and again after --watch S.
3. gateway/core/rollout.py judges: proceed (deploy to the rest), pause (not enough to judge: the canary
   keeps the release, nothing more is sent; run it again to judge anew) or roll back (every canary device
   that installed it is told to go back, `sgw model rollback`), without the operator.

The rollout's state is written at every step to HOME/rollouts/<release id prefix>.json (0600), so
`sgw model status` shows which rollout a device is in and how far it got, also after a crash of the CLI.
Exit 0 when the release reached every device, 1 otherwise (paused, rolled back, or a rest device failed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from gateway.cli.ca import add_dir_arg, home_of, os_errors
from gateway.errors import LocalError, ProvisioningError

ROLLOUTS_DIR = "rollouts"
EXIT_NOT_DONE = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.core.downlink import MAX_CHUNK_BYTES  # noqa: PLC0415
    from gateway.core.rollout import Policy  # noqa: PLC0415

    p = sub.add_parser("rollout", help="a release to a canary share, watched, then to all or rolled back",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("release", type=Path, metavar="RELEASE", help="a .sgwrel from 'sgw model release'")
    p.add_argument("--canary", type=float, default=10.0, metavar="PCT",
                   help="share of the kind's devices that get it first (default 10; at least one device)")
    p.add_argument("--watch", type=float, default=300.0, metavar="S",
                   help="seconds the canary runs it before it is judged (default 300)")
    p.add_argument("--max-forward-ratio", type=float, default=Policy.max_forward_ratio, metavar="R",
                   help="the canary may forward at most R x the baseline's rate ... (default 2)")
    p.add_argument("--forward-slack", type=float, default=Policy.forward_slack, metavar="F",
                   help="... plus F (a share, default 0.05)")
    p.add_argument("--min-windows", type=int, default=Policy.min_windows, metavar="N",
                   help="windows the canary must score in the watch to be judged (default 50)")
    add_dir_arg(p)
    p.add_argument("--chunk-size", type=int, default=MAX_CHUNK_BYTES, metavar="BYTES",
                   help=f"bytes per chunk (default {MAX_CHUNK_BYTES})")
    p.add_argument("--wait", type=float, default=30.0, metavar="S",
                   help="give up on a device that has not answered for S seconds (default 30)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=os_errors(rollout))


def state_path(home: Any, digest: str) -> Path:
    return Path(home.root) / ROLLOUTS_DIR / f"{digest[:16]}.json"


def latest_state(home: Any) -> dict[str, Any] | None:
    """The most recently started rollout's state (for `sgw model status`), None when there is none."""
    folder = Path(home.root) / ROLLOUTS_DIR
    states = []
    for p in folder.glob("*.json") if folder.is_dir() else ():
        try:
            states.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return max(states, key=lambda s: s.get("started_ms", 0)) if states else None


def _save(home: Any, state: dict[str, Any]) -> None:
    from gateway.pki.files import PRIVATE, PRIVATE_DIR, write_atomic  # noqa: PLC0415

    state["updated_ms"] = int(time.time() * 1000)
    path = state_path(home, state["digest"])
    path.parent.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    write_atomic(path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(), mode=PRIVATE)


def _statuses(home: Any, targets: dict[str, Any], wait_s: float) -> dict[str, Any]:
    """device -> rollout.Counts from its DeviceStatus, or None when it did not answer."""
    from gateway.cli.cmd_channel import CommandChannel, send_and_wait  # noqa: PLC0415
    from gateway.core.rollout import Counts  # noqa: PLC0415
    from gateway.pb import downlink_pb2 as dpb  # noqa: PLC0415

    expires_ms = int((time.time() + wait_s + 60) * 1000)
    commands = {d: dpb.Command(id="s" + secrets.token_hex(8), kind=dpb.COMMAND_KIND_STATUS,
                               expires_at_ms=expires_ms) for d in targets}
    with CommandChannel(home, targets) as channel:
        _sent, replies = send_and_wait(channel, commands, wait_s)
    out: dict[str, Any] = {}
    for d in targets:
        r = replies.get(d)
        s = r.status if r is not None else None
        out[d] = None if s is None else Counts(s.windows_seen, s.windows_forwarded, s.model_version,
                                               s.model_rolled_back_from, s.model_rollback_reason)
    return out


def _rollback(home: Any, targets: dict[str, Any], wait_s: float) -> dict[str, str]:
    from gateway.cli.cmd_channel import CommandChannel, send_and_wait  # noqa: PLC0415
    from gateway.pb import downlink_pb2 as dpb  # noqa: PLC0415

    if not targets:
        return {}
    expires_ms = int((time.time() + wait_s + 60) * 1000)
    commands = {d: dpb.Command(id="r" + secrets.token_hex(8), kind=dpb.COMMAND_KIND_MODEL_ROLLBACK,
                               expires_at_ms=expires_ms) for d in targets}
    with CommandChannel(home, targets) as channel:
        sent, replies = send_and_wait(channel, commands, wait_s)
    out = {}
    for d in targets:
        r = replies.get(d)
        if r is None:
            out[d] = "no_reply" if d in sent else "not_sent"
        else:
            values = {v.key: v.value for v in r.reply.values}
            out[d] = f"rolled back to {values['installed']}" if r.reply.ok else f"error: {r.reply.error}"
    return out


def rollout(args: argparse.Namespace) -> int:
    from dataclasses import asdict  # noqa: PLC0415

    from gateway.cli.cmd_channel import select_targets  # noqa: PLC0415
    from gateway.cli.model_deploy import checked, deliver  # noqa: PLC0415
    from gateway.core.downlink import MAX_CHUNK_BYTES, MAX_RELEASE_CHUNKS, MIN_CHUNK_BYTES  # noqa: PLC0415
    from gateway.core.rollout import PROCEED, ROLLBACK, Policy, judge  # noqa: PLC0415

    if not 0 < args.canary <= 100:
        raise ProvisioningError("--canary: must be in (0, 100]")
    if not 0 <= args.watch <= 86400 or not 0 < args.wait <= 3600:
        raise ProvisioningError("--watch must be in [0, 86400] and --wait in (0, 3600] seconds")
    if args.max_forward_ratio < 1 or not 0 <= args.forward_slack <= 1 or args.min_windows < 1:
        raise ProvisioningError("--max-forward-ratio must be >= 1, --forward-slack in [0, 1] and "
                                "--min-windows >= 1")
    if not MIN_CHUNK_BYTES <= args.chunk_size <= MAX_CHUNK_BYTES:
        raise ProvisioningError(f"--chunk-size: must be in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    home = home_of(args)
    try:
        blob = args.release.read_bytes()
    except OSError as exc:
        raise LocalError(f"{args.release}: {exc.strerror or exc}") from None
    if math.ceil(len(blob) / args.chunk_size) > MAX_RELEASE_CHUNKS:
        raise ProvisioningError(f"over {MAX_RELEASE_CHUNKS} chunks; use a larger --chunk-size")
    statement = checked(home, blob)  # a refused release: one line, exit 1, nothing sent
    kind = statement.kind
    digest = hashlib.sha256(blob).hexdigest()
    every = select_targets(home, every=True)
    fleet = sorted((d for d, t in every.items() if kind in ("*", t.kind)),
                   key=lambda d: hashlib.sha256(f"{digest}/{d}".encode()).digest())
    if not fleet:
        raise ProvisioningError(f"no active device of kind {kind}")
    n_canary = max(1, math.ceil(len(fleet) * args.canary / 100))
    canary, rest = fleet[:n_canary], fleet[n_canary:]
    targets = {d: every[d] for d in fleet}
    policy = Policy(args.max_forward_ratio, args.forward_slack, args.min_windows)
    version = f"{statement.model}-{statement.version}"
    state: dict[str, Any] = {
        "release": str(args.release), "digest": digest, "model": statement.model,
        "version": statement.version, "kind": kind, "canary": canary, "rest": rest,
        "canary_percent": args.canary, "watch_s": args.watch, "policy": asdict(policy),
        "started_ms": int(time.time() * 1000), "phase": "canary", "health": None,
        "deploy": {}, "rollback": {},
    }
    _save(home, state)
    status_wait = min(args.wait, 10.0)
    before = _statuses(home, targets, status_wait)

    def send(group: list[str]) -> None:
        rows = deliver(home, blob, {d: every[d] for d in group}, chunk_size=args.chunk_size, window=4,
                       wait=args.wait)
        for row in rows:
            state["deploy"][row["device"]] = row["outcome"] if row["outcome"] != "refused" else \
                f"refused: {row.get('reason')}"
        _save(home, state)

    send(canary)
    deployed = {d: state["deploy"][d].split(":")[0] for d in canary}
    if all(o == "installed" for o in deployed.values()):
        state["phase"] = "watching"
        state["watch_until_ms"] = int((time.time() + args.watch) * 1000)
        _save(home, state)
        start = _statuses(home, targets, status_wait)
        time.sleep(args.watch)
        end = _statuses(home, targets, status_wait)
    else:
        start = end = before
    health = judge(version, canary=canary, control=rest, deployed=deployed, before_deploy=before,
                   watch_start=start, watch_end=end, policy=policy)
    state["health"] = asdict(health)
    if health.decision == PROCEED:
        state["phase"] = "rest"
        _save(home, state)
        if rest:
            send(rest)
        state["phase"] = "done" if all(state["deploy"][d] == "installed" for d in fleet) else "rest_failed"
    elif health.decision == ROLLBACK:
        state["phase"] = "rolling_back"
        _save(home, state)
        # every canary device that installed it, but not those that went back by themselves already
        undo = {d: every[d] for d in canary if deployed[d] == "installed"
                and not (end.get(d) is not None and end[d].model_version != version)}
        state["rollback"] = _rollback(home, undo, args.wait)
        state["phase"] = "rolled_back"
    else:
        state["phase"] = "paused"
    _save(home, state)
    _report(state, args.json)
    return 0 if state["phase"] == "done" else EXIT_NOT_DONE


def _report(state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        return
    h = state["health"] or {}
    head = f"{state['model']}-{state['version']}\t{state['phase']}\tcanary {','.join(state['canary'])}"
    sys.stdout.write(f"{head}\t{h.get('decision', '')} {h.get('reason', '')} {h.get('detail', '')}".rstrip()
                     + "\n")
    for device, outcome in sorted(state["deploy"].items()):
        back = state["rollback"].get(device)
        sys.stdout.write(f"{device}\t{outcome}" + (f"\t{back}" if back else "") + "\n")


def device_rollout(state: dict[str, Any] | None, device: str) -> dict[str, Any] | None:
    """What `sgw model status` shows for a device in the latest rollout."""
    if state is None or device not in (*state["canary"], *state["rest"]):
        return None
    return {"release": f"{state['model']}-{state['version']}", "phase": state["phase"],
            "group": "canary" if device in state["canary"] else "rest",
            "deploy": state["deploy"].get(device), "rollback": state["rollback"].get(device)}
