"""`sgw model status | rollback (--to ID[,ID] | --kind K | --all)`: the fleet's model releases.

status asks each device for its DeviceStatus (a sealed status command) and shows the prefilter release
that runs, the one being staged, a switch still on probation, the last rollback the device made by
itself, and the device's place in the latest `sgw model rollout` (HOME/rollouts/); rollback tells each
device to switch back to the release that ran before its last switch (verified again on the device;
nothing changes where that fails). Both wait --wait seconds for replies; a device that has not answered
is listed as no_reply. Exit 0 when every device answered ok.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import Any

from gateway.cli.ca import add_dir_arg, home_of, os_errors

EXIT_NOT_ALL_OK = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, helptext in (("status", "each device's active and staged model release"),
                           ("rollback", "devices back to the release that ran before their last switch")):
        p = sub.add_parser(name, help=helptext, description=__doc__)
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--to", metavar="ID[,ID]", help="these devices")
        target.add_argument("--kind", metavar="KIND", help="every active device of this sensor kind")
        target.add_argument("--all", action="store_true", help="every active device")
        add_dir_arg(p)
        p.add_argument("--wait", type=float, default=10.0, metavar="S", help="seconds to wait for replies")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=os_errors(fleet), action=name)


def fleet(args: argparse.Namespace) -> int:
    from gateway.cli.cmd_channel import CommandChannel, select_targets, send_and_wait  # noqa: PLC0415
    from gateway.cli.model_rollout import device_rollout, latest_state  # noqa: PLC0415
    from gateway.errors import ProvisioningError  # noqa: PLC0415
    from gateway.pb import downlink_pb2 as dpb  # noqa: PLC0415

    if not 0 < args.wait <= 3600:
        raise ProvisioningError("--wait must be in (0, 3600] seconds")
    home = home_of(args)
    rollout = latest_state(home)
    ids = [s for s in (args.to or "").split(",") if s]
    targets = select_targets(home, ids=ids, kind=args.kind, every=args.all)
    kind = dpb.COMMAND_KIND_STATUS if args.action == "status" else dpb.COMMAND_KIND_MODEL_ROLLBACK
    expires_ms = int((time.time() + args.wait + 60) * 1000)
    commands = {d: dpb.Command(id="s" + secrets.token_hex(8), kind=kind, expires_at_ms=expires_ms)
                for d in targets}
    with CommandChannel(home, targets) as channel:
        sent, replies = send_and_wait(channel, commands, args.wait)
    rows: list[dict[str, Any]] = []
    for device in sorted(targets):
        r = replies.get(device)
        row: dict[str, Any] = {"device": device}
        if r is None:
            row["outcome"] = "no_reply" if device in sent else "not_sent"
        else:
            values = {v.key: v.value for v in r.reply.values}
            row.update(outcome="ok" if r.reply.ok else "error", error=r.reply.error or None)
            if r.status is not None:
                st = r.status
                row.update(model_version=st.model_version, model_staged=st.model_staged or None,
                           agent_version=st.agent_version, model_probation=st.model_probation or None,
                           model_rolled_back_from=st.model_rolled_back_from or None,
                           model_rollback_reason=st.model_rollback_reason or None)
            if "installed" in values:
                row.update(model_version=f"prefilter-{values['installed']}",
                           rolled_back_from=values.get("rolled_back_from"))
        if args.action == "status":
            row["rollout"] = device_rollout(rollout, device)
        rows.append(row)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    else:
        for row in rows:
            detail = row.get("error") or " ".join(
                f"{k}={row[k]}" for k in ("model_version", "model_staged", "model_probation",
                                          "rolled_back_from", "model_rolled_back_from",
                                          "model_rollback_reason") if row.get(k))
            if row.get("rollout"):
                ro = row["rollout"]
                detail += f" rollout={ro['release']}:{ro['phase']}:{ro['group']}"
            sys.stdout.write(f"{row['device']}\t{row['outcome']}\t{detail}\n")
    return 0 if all(r["outcome"] == "ok" for r in rows) else EXIT_NOT_ALL_OK
