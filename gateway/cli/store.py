"""`sgw store migrate` / `sgw store status`: the schema of the store the gateways share.

PostgreSQL is migrated only by this command, never by a gateway at start-up (a gateway on an old schema
refuses to start and names this command). SQLite keeps its own scheme: `sgw ca init` creates the file
whole and an older file is upgraded in place when opened (gateway/registry/store.py), so the command only
opens it and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from gateway.cli.ca import add_dir_arg, emit_json, home_of
from gateway.errors import ConfigError
from gateway.pki.home import store_in
from gateway.store.base import POSTGRESQL, SQLITE, is_postgres_url
from gateway.store.migrations import LATEST


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "store", help="the shared store: migrate (PostgreSQL), copy (SQLite -> PostgreSQL), status",
        description=(
            "The store holds the registry, replay windows, pending results and downlink epochs: SQLite at "
            "registry.path by default, or PostgreSQL when [store] url names one (docs/OPERATIONS.md, "
            "'When to move to PostgreSQL'). The store is the one gateway.toml names (--config), else "
            "HOME/gateway.toml's (--dir), or --url."
        ),
    )
    sub = p.add_subparsers(title="store commands", metavar="ACTION", required=True)
    mig = sub.add_parser(
        "migrate", help="apply the missing schema migrations (PostgreSQL; idempotent, safe concurrently)",
        description=(
            "Applies every schema migration the PostgreSQL store lacks, each in its own transaction, and "
            "prints the versions before and after. Run it before the first gateway starts on a new "
            "database and after upgrading sgw; gateways refuse an old schema and never migrate themselves. "
            "On SQLite there is nothing to apply."
        ),
    )
    cp = sub.add_parser(
        "copy", help="move a fleet from the SQLite registry to an empty PostgreSQL store (all or nothing)",
        description=(
            "Copies HOME's SQLite registry (or --from FILE) into the empty, migrated PostgreSQL store --to "
            "names, in one transaction: devices, keys, certificates, replay windows, results not yet "
            "confirmed, downlink epochs and enrollment records. Stop every gateway first (refused while one "
            "heartbeats): what a gateway commits after the copy would be missing from the new store. With "
            "--switch, HOME/gateway.toml and every gateway-ID.toml then get [store] url = the target."
        ),
    )
    add_dir_arg(cp)
    cp.add_argument("--to", required=True, metavar="URL", help="the target: postgresql://user@host:port/db")
    cp.add_argument("--from", dest="source", type=Path, default=None, metavar="FILE",
                    help="the SQLite registry to copy (default: HOME/registry.db)")
    cp.add_argument("--switch", action="store_true",
                    help="afterwards set [store] url in HOME's gateway.toml and gateway-ID.toml files")
    cp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    cp.set_defaults(func=_copy)
    st = sub.add_parser("status", help="the store's kind, address and schema version (against this sgw's)")
    for q in (mig, st):
        _where_args(q)
        q.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    mig.set_defaults(func=_migrate)
    st.set_defaults(func=_status)


def _where_args(p: argparse.ArgumentParser) -> None:
    add_dir_arg(p)
    p.add_argument("--config", type=Path, default=None,
                   help="a gateway.toml: its [store] url or registry.path")
    p.add_argument("--url", default=None, help="a postgresql:// URL (password from ~/.pgpass or PGPASSWORD)")


def _location(args: argparse.Namespace) -> Path | str:
    if args.url is not None:
        if not is_postgres_url(args.url):
            raise ConfigError("--url: expected postgresql://user@host:port/db")
        return str(args.url)
    if args.config is not None:
        return store_in(args.config)
    return home_of(args).store_location()


def _migrate(args: argparse.Namespace) -> int:
    where = _location(args)
    if isinstance(where, str):
        from gateway.store.postgres import migrate  # noqa: PLC0415 - psycopg only for PostgreSQL

        res = migrate(where)
        out: dict[str, object] = {"store": POSTGRESQL, "where": res.where, "before": res.before,
                                  "after": res.after, "applied": list(res.applied), "latest": LATEST}
        done = ", ".join(map(str, res.applied))
        text = (f"{res.where}: schema {res.before} -> {res.after} (applied {done})" if res.applied
                else f"{res.where}: schema {res.after}, up to date")
    else:
        from gateway.registry.store import SCHEMA_VERSION, Registry  # noqa: PLC0415

        _require_sqlite(where)
        Registry.open(where).close()  # SQLite upgrades an older registry file in place when it opens
        out = {"store": SQLITE, "where": str(where), "applied": []}
        text = f"{where}: SQLite, registry schema {SCHEMA_VERSION}; nothing to migrate"
    if args.json:
        emit_json(out)
    else:
        sys.stdout.write(text + "\n")
    return 0


def _status(args: argparse.Namespace) -> int:
    where = _location(args)
    if isinstance(where, str):
        from gateway.store.postgres import describe, schema_version  # noqa: PLC0415

        version = schema_version(where)
        out: dict[str, object] = {"store": POSTGRESQL, "where": describe(where), "version": version,
                                  "latest": LATEST, "current": version == LATEST}
        state = "current" if version == LATEST else f"needs 'sgw store migrate' (this sgw: {LATEST})"
        text = f"{describe(where)}: PostgreSQL, schema {version}, {state}"
    else:
        _require_sqlite(where)
        out = {"store": SQLITE, "where": str(where), "current": True}
        text = f"{where}: SQLite"
    if args.json:
        emit_json(out)
    else:
        sys.stdout.write(text + "\n")
    return 0


def _copy(args: argparse.Namespace) -> int:
    from gateway.common import tomledit  # noqa: PLC0415 - only this command edits files
    from gateway.registry.store import Registry  # noqa: PLC0415
    from gateway.server import tier  # noqa: PLC0415
    from gateway.store.copy import copy_store  # noqa: PLC0415
    from gateway.store.postgres import PostgresDatabase  # noqa: PLC0415 - psycopg only for PostgreSQL

    if not is_postgres_url(args.to):
        raise ConfigError("--to: expected postgresql://user@host:port/db")
    home = home_of(args)
    source_path = args.source if args.source is not None else home.registry_path
    _require_sqlite(source_path)
    source = Registry.open(source_path)  # a current SQLite schema (an older file is upgraded as it opens)
    try:
        now_ns = time.time_ns()
        running = [i for i in tier.tier(source.db) if i.state(now_ns) == tier.RUNNING]
        if running:
            first = running[0]
            raise ConfigError(f"gateway {first.gateway_id} on {first.host} is running on {source_path} "
                              f"({len(running)} running): stop every gateway before copying")
        target = PostgresDatabase.connect(str(args.to), name="sgw-copy")
        try:
            res = copy_store(source.db, target)
        finally:
            target.close()
    finally:
        source.close()
    switched = []
    if args.switch:
        for config in (c for c in home.gateway_configs() if c.is_file()):
            tomledit.edit_file(config, {"store": {"url": str(args.to)}})
            switched.append(str(config))
    if args.json:
        emit_json({"source": res.source, "target": res.target, "rows": res.rows, "generation": res.generation,
                   "switched": switched})
        return 0
    counts = ", ".join(f"{n} {t}" for t, n in res.rows.items())
    sys.stdout.write(f"copied {res.source} -> {res.target}: {counts}\n")
    if switched:
        sys.stdout.write(f"[store] url set in {', '.join(switched)}; restart the gateways on it\n")
    else:
        sys.stdout.write("next: set [store] url in every instance's gateway.toml (or run again with --switch "
                         "on a new database), then start the gateways\n")
    return 0


def _require_sqlite(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"no registry at {path}; run 'sgw ca init' first")
