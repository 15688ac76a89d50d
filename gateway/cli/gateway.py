"""`sgw gateway --config gateway.toml`: run the gateway service (systemd Type=notify), as N worker processes
under one supervisor when [gateway] workers > 1;
`sgw gateway add-instance ID` / `sgw gateway instances`: the identities of further instances;
`sgw gateway add-workers [ID] --count N`: the identities of an instance's worker processes;
`sgw gateway add-sparkplug [ID]`: the Sparkplug B edge node identity of an instance (and sgw-scada)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.cli.ca import add_dir_arg, emit_json, home_of, os_errors
from gateway.errors import ConfigError


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "gateway",
        help="run the gateway: authenticate, batch, infer, publish results; add instances",
        description=(
            "Subscribe to sgw/v1/dev/+/up through a shared subscription, open and check every envelope, "
            "run batched inference and publish one ResultBatch per batch on sgw/v1/results. "
            "SIGTERM drains in-flight batches; SIGHUP reloads the registry and the log settings. "
            "Each instance needs its own identity: 'sgw gateway add-instance ID'."
        ),
    )
    p.add_argument("--config", type=Path, default=None, help="gateway.toml (written by 'sgw ca init')")
    p.add_argument("--log-format", choices=("text", "json"), default=None, help="override [log] format")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                   help="override [log] level")
    # Internal: the supervisor (gateway/server/workers.py) starts worker K of [gateway] workers this way.
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    sub = p.add_subparsers(title="instance commands", metavar="ACTION", required=False)

    add = sub.add_parser(
        "add-instance",
        help="issue a gateway instance identity (CN sgw-gateway-ID) and write HOME/gateway-ID.toml",
        description=(
            "Issues the certificate of one more gateway instance and writes its gateway-ID.toml (same "
            "registry, e2e key and share group as gateway.toml), then rewrites the ACL of every broker "
            "folder made by 'sgw broker config'. Reload mosquitto (SIGHUP) before starting the instance."
        ),
    )
    add_dir_arg(add)
    add.add_argument("instance_id", metavar="ID", help="1-48 characters of A-Z a-z 0-9 . _ -")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=os_errors(_add_instance))

    spb = sub.add_parser(
        "add-sparkplug",
        help="issue the Sparkplug B edge node identity of an instance (CN sgw-sparkplug-ID) and sgw-scada",
        description=(
            "Issues the certificate the instance's Sparkplug B edge node connects with (HOME/sparkplug/ID/, "
            "CN sgw-sparkplug-ID) and, once per home, the SCADA's (HOME/scada/, CN sgw-scada); switches "
            "[sparkplug] enabled on in the instance's toml and rewrites the broker ACLs. Reload mosquitto "
            "(SIGHUP), then restart the gateway. docs/OPERATIONS.md, 'SCADA', says how a SCADA connects."
        ),
    )
    add_dir_arg(spb)
    spb.add_argument("instance_id", metavar="ID", nargs="?", default=None,
                     help="gateway instance (default: the one in HOME/gateway.toml)")
    spb.add_argument("--json", action="store_true")
    spb.set_defaults(func=os_errors(_add_sparkplug))

    wk = sub.add_parser(
        "add-workers",
        help="issue the identities of an instance's worker processes ([gateway] workers = N)",
        description=(
            "Issues one certificate per worker 2..N of the instance (CN sgw-gateway-ID.wK, files "
            "client-wK.crt / client-wK.key beside the instance's client.crt; worker 1 is the instance "
            "itself), keeps those that exist, and rewrites the ACL of every broker folder. Reload "
            "mosquitto (SIGHUP), set [gateway] workers = N, then restart the gateway."
        ),
    )
    add_dir_arg(wk)
    wk.add_argument("instance_id", metavar="ID", nargs="?", default=None,
                    help="gateway instance (default: the one in HOME/gateway.toml)")
    wk.add_argument("--count", type=int, required=True, metavar="N",
                    help="total workers of the instance, 1-64 (for workers = \"auto\": the host's CPUs)")
    wk.add_argument("--json", action="store_true")
    wk.set_defaults(func=os_errors(_add_workers))

    rk = sub.add_parser(
        "rotate-key",
        help="new gateway e2e key(s) under the next key id; the old one is accepted for --grace seconds",
        description=(
            "Makes a new X25519 key (and a new ML-KEM-768 key where the home has one) under the next "
            "gateway key id and rewrites [e2e] in every gateway*.toml of the home on this key: the new key "
            "seals receipts and commands and opens, the old one is listed under [e2e] previous and still "
            "opened until the grace ends, then refused as gateway_key_retired. Next: restart the "
            "gateway(s), then 'sgw device cmd --all update-gateway-key' (docs/OPERATIONS.md)."
        ),
    )
    add_dir_arg(rk)
    rk.add_argument("--grace", type=int, default=86400, metavar="S",
                    help="seconds the old key stays accepted (default 86400)")
    rk.add_argument("--json", action="store_true")
    rk.set_defaults(func=os_errors(_rotate_key))

    rt = sub.add_parser(
        "retire-key",
        help="end the grace of gateway keys being rotated out now (applied at the gateways' next start)",
        description=("Sets accept_until_ms of [e2e] previous keys to now: messages sealed to them are "
                     "refused as gateway_key_retired once the gateways restart."),
    )
    add_dir_arg(rt)
    rt.add_argument("--key-id", type=int, default=None, help="only this key id (default: every previous key)")
    rt.add_argument("--json", action="store_true")
    rt.set_defaults(func=os_errors(_retire_key))

    ls = sub.add_parser("instances", help="list a home's gateway instances, their config files and states")
    add_dir_arg(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=os_errors(_instances))

    st = sub.add_parser(
        "status", help="the tier as the store sees it: each instance's host, pid, state, last heartbeat",
        description=(
            "Lists every gateway instance that registered in the store (SQLite, or the PostgreSQL store "
            "all hosts share): running (heartbeat within 15 s), stopped (drained cleanly) or silent (died, "
            "or cannot reach the store). The store is the one --config names, else HOME/gateway.toml's."
        ),
    )
    add_dir_arg(st)
    st.add_argument("--config", dest="status_config", type=Path, default=None, metavar="FILE",
                    help="a gateway.toml whose store to read (default: HOME/gateway.toml)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=os_errors(_status))


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        raise ConfigError(
            "sgw gateway needs --config FILE (or an ACTION: add-instance, add-sparkplug, instances, status)")
    # Imported here so `sgw --help` and other commands do not pay for numpy, LiteRT and paho.
    from gateway.common.logs import LogFormat, setup_logging  # noqa: PLC0415
    from gateway.server.config import for_worker, load_config  # noqa: PLC0415

    conf = load_config(args.config)
    fmt: LogFormat = "json" if (args.log_format or conf.log.format) == "json" else "text"
    setup_logging(args.log_level or conf.log.level, fmt)
    workers = conf.gateway.worker_count()
    if args.worker is None and workers > 1:
        from gateway.server.workers import Supervisor  # noqa: PLC0415

        for k in range(2, workers + 1):
            for_worker(conf, k)  # every worker's identity exists: a missing one is exit 2 now, not a loop
        _warn_senders(conf.results.receipts, workers)
        passthrough = [f"--{name.replace('_', '-')}={v}" for name in ("log_format", "log_level")
                       if (v := getattr(args, name)) is not None]
        return Supervisor(args.config, workers, passthrough).run()
    worker = args.worker or 1
    if not 1 <= worker <= workers:
        raise ConfigError(f"--worker {worker}: gateway.workers is {workers}")
    if args.worker is not None:
        from gateway.common.logs import tag_process  # noqa: PLC0415

        tag_process(worker=worker)
    # Not before: the supervisor only waits, and needs neither numpy, LiteRT nor paho in its memory.
    from gateway.server.service import Service, build  # noqa: PLC0415

    gateway = build(for_worker(conf, worker), args.config, worker=worker)
    return Service(gateway, log_format=args.log_format, log_level=args.log_level, worker=worker).run()


def _warn_senders(receipts: bool, workers: int) -> None:
    """Every worker seals receipts as its own downlink sender; devices keep state for a bounded number."""
    import logging  # noqa: PLC0415

    from gateway.core.downlink import DEFAULT_MAX_SENDERS  # noqa: PLC0415

    if receipts and workers >= DEFAULT_MAX_SENDERS:
        logging.getLogger("sgw.gateway").warning(
            "workers: each is a downlink sender and devices accept at most %d (plus sgw device cmd's); "
            "receipts from further ones are refused (docs/OPERATIONS.md, Workers)", DEFAULT_MAX_SENDERS,
            extra={"fields": {"workers": workers}})


def _add_workers(args: argparse.Namespace) -> int:
    from gateway.pki.broker import refresh_acls  # noqa: PLC0415
    from gateway.pki.instances import add_workers, default_instance_id, instance_toml  # noqa: PLC0415
    from gateway.registry.ids import gateway_cn  # noqa: PLC0415

    home = home_of(args)
    gid = args.instance_id or default_instance_id(home)
    workers = add_workers(home, gid, args.count)
    brokers, warnings = refresh_acls(home)
    for warning in warnings:
        sys.stderr.write(f"sgw: warning: {warning}\n")
    config = instance_toml(home, gid)
    # What the unit needs to hand each worker its pair (LoadCredential= copies single files by name).
    creds = [f"LoadCredential={f.name}:{f}" for w in workers for f in (w.cert, w.key)]
    if args.json:
        emit_json({"id": gid, "count": args.count, "config": str(config), "load_credentials": creds,
                   "workers": [{"worker": w.worker, "id": w.gateway_id, "cn": gateway_cn(w.gateway_id),
                                "cert": str(w.cert), "key": str(w.key), "issued": w.issued} for w in workers],
                   "acl_updated": [str(b) for b in brokers]})
        return 0
    sys.stdout.write(
        f"gateway instance {gid}: {args.count} workers (worker 1 is the instance's own identity)\n"
        + "".join(f"  worker {w.worker}: {w.cert} (CN {gateway_cn(w.gateway_id)})"
                  f"{'' if w.issued else ', kept'}\n" for w in workers)
        + "".join(f"  ACL updated in {b}\n" for b in brokers)
        + f"next: reload mosquitto (SIGHUP), set [gateway] workers = {args.count} in {config}, restart the "
        "gateway; under systemd add to the unit first (systemctl edit sgw-gateway, [Service]):\n"
        + "".join(f"  {line}\n" for line in creds)
    )
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from gateway.pki.gateway_keys import rotate_gateway_key  # noqa: PLC0415

    home = home_of(args)
    r = rotate_gateway_key(home, grace_s=args.grace, now_ms=time.time_ns() // 1_000_000)
    if args.json:
        emit_json({"old_key_id": r.old_key_id, "key_id": r.key_id, "accept_until_ms": r.accept_until_ms,
                   "mlkem": r.mlkem, "configs": [str(c) for c in r.configs], "dropped": list(r.dropped)})
        return 0
    sys.stdout.write(
        f"gateway key {r.key_id} made{' (X25519 and ML-KEM-768)' if r.mlkem else ''}; key {r.old_key_id} is "
        f"accepted until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(r.accept_until_ms / 1000))}\n"
        + "".join(f"  rewrote {c}\n" for c in r.configs)
        + "next: restart the gateway(s), then: sgw device cmd --all update-gateway-key\n")
    return 0


def _retire_key(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from gateway.pki.gateway_keys import retire_gateway_keys  # noqa: PLC0415

    ids = retire_gateway_keys(home_of(args), now_ms=time.time_ns() // 1_000_000, key_id=args.key_id)
    if args.json:
        emit_json({"retired": list(ids)})
        return 0
    sys.stdout.write(f"gateway key(s) {', '.join(map(str, ids))} retired; restart the gateway(s) to apply\n")
    return 0


def _add_instance(args: argparse.Namespace) -> int:
    from gateway.pki.broker import refresh_acls  # noqa: PLC0415
    from gateway.pki.instances import add_instance  # noqa: PLC0415

    home = home_of(args)
    inst = add_instance(home, args.instance_id)
    brokers, warnings = refresh_acls(home)
    for warning in warnings:
        sys.stderr.write(f"sgw: warning: {warning}\n")
    if args.json:
        emit_json({"id": inst.gateway_id, "cn": inst.cn, "config": str(inst.config), "cert": str(inst.cert),
                   "acl_updated": [str(b) for b in brokers]})
        return 0
    sys.stdout.write(
        f"gateway instance {inst.gateway_id}: certificate {inst.cert} (CN {inst.cn}), config {inst.config}\n"
        + "".join(f"  ACL updated in {b}\n" for b in brokers)
        + f"next: reload mosquitto (SIGHUP), then sgw gateway --config {inst.config}\n"
    )
    return 0


def _add_sparkplug(args: argparse.Namespace) -> int:
    from gateway.pki.broker import refresh_acls  # noqa: PLC0415
    from gateway.pki.instances import default_instance_id  # noqa: PLC0415
    from gateway.pki.sparkplug import add_sparkplug  # noqa: PLC0415
    from gateway.registry.ids import SCADA_CN, sparkplug_cn  # noqa: PLC0415

    home = home_of(args)
    gid = args.instance_id or default_instance_id(home)
    added = add_sparkplug(home, gid)
    brokers, warnings = refresh_acls(home)
    for warning in warnings:
        sys.stderr.write(f"sgw: warning: {warning}\n")
    node = added.node
    if args.json:
        emit_json({"id": gid, "cn": sparkplug_cn(gid), "cert": str(added.cert), "group_id": node.group_id,
                   "edge_node_id": node.edge_node_id, "scada_cert": str(added.scada_cert),
                   "scada_issued": added.scada_issued, "config": str(added.config), "enabled": added.enabled,
                   "acl_updated": [str(b) for b in brokers]})
        return 0
    enable = (f"  [sparkplug] enabled = true in {added.config}\n" if added.enabled else
              f"  set [sparkplug] enabled = true in {added.config} (not changed: edited by hand)\n")
    sys.stdout.write(
        f"sparkplug edge node spBv1.0/{node.group_id}/+/{node.edge_node_id}: certificate {added.cert} "
        f"(CN {sparkplug_cn(gid)})\n" + enable
        + (f"  SCADA identity {added.scada_cert} (CN {SCADA_CN})\n" if added.scada_issued else "")
        + "".join(f"  ACL updated in {b}\n" for b in brokers)
        + f"next: reload mosquitto (SIGHUP), then restart the gateway (sgw gateway --config {added.config})\n"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from gateway.pki.home import store_in  # noqa: PLC0415
    from gateway.store.base import is_postgres_url  # noqa: PLC0415

    where = store_in(args.status_config) if args.status_config is not None else home_of(args).store_location()
    rows = _tier(where)
    if is_postgres_url(where):
        from gateway.store.postgres import describe  # noqa: PLC0415

        store = describe(str(where))
    else:
        store = str(where)
    if args.json:
        emit_json({"store": store, "instances": rows})
        return 0
    lines = [f"store {store}: {len(rows)} instance(s)\n"]
    lines += [f"{r['id']}\t{r['state']}\thost={r['host']}\tpid={r['pid']}\tversion={r['version']}"
              f"\theartbeat {r['heartbeat_age_s']} s ago\n" for r in rows]
    sys.stdout.write("".join(lines))
    return 0


def _instances(args: argparse.Namespace) -> int:
    from gateway.errors import LocalError  # noqa: PLC0415
    from gateway.pki.instances import gateway_instances, instance_toml, instance_workers  # noqa: PLC0415
    from gateway.registry.ids import gateway_cn, worker_id  # noqa: PLC0415

    home = home_of(args)
    home.require_ca()
    try:
        states = {i["id"]: i for i in _tier(home.store_location())}
    except LocalError as exc:  # the identities are still worth listing; say why the states are missing
        sys.stderr.write(f"sgw: warning: no instance states: {exc}\n")
        states = {}
    rows = [{"id": gid, "cn": gateway_cn(gid), "config": str(instance_toml(home, gid)),
             "workers": [worker_id(gid, k) for k in instance_workers(home, gid)],
             "state": states.get(gid, {}).get("state", "never started"),
             "host": states.get(gid, {}).get("host")}
            for gid in gateway_instances(home)]
    if args.json:
        emit_json(rows)
    else:
        sys.stdout.write("".join(f"{r['id']}\t{r['cn']}\t{r['config']}\t{r['state']}\n" for r in rows))
    return 0


def _tier(where: Path | str) -> list[dict[str, object]]:
    """The store's instance rows as `to_json` dicts (state computed against the clock now)."""
    import time  # noqa: PLC0415

    from gateway.registry.store import Registry  # noqa: PLC0415
    from gateway.server import tier  # noqa: PLC0415

    with Registry.open(where) as registry:
        rows = tier.tier(registry.db)
    now = time.time_ns()
    return [r.to_json(now) for r in rows]
