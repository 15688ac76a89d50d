"""`sgw model deploy RELEASE --to ID[,ID] | --kind K | --percent N | --gateway`: a release over the sealed
downlink, or into this home's gateway.

`--gateway` checks a gateway release with the home's trusted key, stores it beside gateway.toml
(`releases/`) and names it in `[inference] releases` in place of any earlier release of the same model;
the running gateway swaps it in on SIGHUP (`systemctl reload sgw-gateway`), between two batches.

The release is checked here first with the home's trusted release key (so a bad one is refused before
anything is sent), then sent to each device in ModelChunk commands (docs/PROTOCOL.md, "Model releases"):
a probe first, whose reply says how much the device already holds (a transfer that stopped resumes
there), then up to --window chunks in flight, each reply naming the next chunk the device wants. The
device verifies the whole release and switches (gateway/agent/models.py); its last reply says installed
or refused with the reason. Exit 0 only when every target installed it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.cli.ca import add_dir_arg, home_of, os_errors
from gateway.errors import LocalError, ProvisioningError

EXIT_NOT_ALL_INSTALLED = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.core.downlink import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES  # noqa: PLC0415

    d = sub.add_parser("deploy", help="send a signed release to devices over the sealed downlink",
                       description="Checks RELEASE with the home's trusted release key, then sends it in "
                                   "hashed chunks (resumable: run it again and it continues where the "
                                   "device stopped). Each device verifies it as a whole and switches "
                                   "atomically; the running model serves until then. Exit 0 when every "
                                   "target installed it, 1 otherwise.")
    d.add_argument("release", type=Path, metavar="RELEASE", help="a .sgwrel from 'sgw model release'")
    target = d.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="ID[,ID]", help="these devices")
    target.add_argument("--kind", metavar="KIND", help="every active device of this sensor kind")
    target.add_argument("--percent", type=float, metavar="N",
                        help="N %% of the active devices of the release's kind (a stable choice per release)")
    target.add_argument("--gateway", action="store_true",
                        help="a gateway release: store it, name it in gateway.toml ([inference] releases); "
                             "then reload the gateway (SIGHUP) to swap it in")
    d.add_argument("--gateway-config", type=Path, default=None, metavar="FILE",
                   help="with --gateway: the gateway.toml to edit (default: the home's)")
    add_dir_arg(d)
    d.add_argument("--chunk-size", type=int, default=MAX_CHUNK_BYTES, metavar="BYTES",
                   help=f"bytes per chunk, {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} (default {MAX_CHUNK_BYTES})")
    d.add_argument("--window", type=int, default=4, help="chunks in flight per device (default 4)")
    d.add_argument("--wait", type=float, default=30.0, metavar="S",
                   help="give up on a device that has not answered for S seconds (default 30)")
    d.add_argument("--max-chunks", type=int, default=None, metavar="N",
                   help="send at most N chunks per device this run (a metered link); run again to resume")
    d.add_argument("--unchecked", action="store_true",
                   help="do not verify here first (to see the fleet refuse a bad release)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=os_errors(deploy))


@dataclass
class _Device:
    device_id: str
    next: int | None = None  # from the device's last reply
    resumed_from: int | None = None
    sent_upto: int = -1  # highest chunk index sent
    data_sent: int = 0
    last_heard: float = 0.0
    outcome: str = ""  # installed | refused | error | partial | no_reply
    detail: dict[str, Any] = field(default_factory=dict)


def _pick(home: Any, args: argparse.Namespace, release_kind: str, digest: str) -> dict[str, Any]:
    from gateway.cli.cmd_channel import select_targets  # noqa: PLC0415

    if args.to:
        return select_targets(home, ids=[s for s in args.to.split(",") if s])
    if args.kind:
        return select_targets(home, kind=args.kind)
    if not 0 < args.percent <= 100:
        raise ProvisioningError("--percent: must be in (0, 100]")
    every = select_targets(home, every=True)
    fits = sorted((d for d, t in every.items() if release_kind in ("*", t.kind)),
                  key=lambda d: hashlib.sha256(f"{digest}/{d}".encode()).digest())
    if not fits:
        raise ProvisioningError(f"no active device of kind {release_kind}")
    chosen = fits[:max(1, math.ceil(len(fits) * args.percent / 100))]
    return {d: every[d] for d in chosen}


def deploy(args: argparse.Namespace) -> int:
    from gateway.core.downlink import MAX_CHUNK_BYTES, MAX_RELEASE_CHUNKS, MIN_CHUNK_BYTES  # noqa: PLC0415

    if not MIN_CHUNK_BYTES <= args.chunk_size <= MAX_CHUNK_BYTES:
        raise ProvisioningError(f"--chunk-size: must be in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    if not 1 <= args.window <= 64 or not 0 < args.wait <= 3600:
        raise ProvisioningError("--window must be in 1..64 and --wait in (0, 3600]")
    if args.max_chunks is not None and args.max_chunks < 0:
        raise ProvisioningError("--max-chunks: must not be negative")
    home = home_of(args)
    try:
        blob = args.release.read_bytes()
    except OSError as exc:
        raise LocalError(f"{args.release}: {exc.strerror or exc}") from None
    if args.gateway:
        return _to_gateway(home, args, blob)
    digest = hashlib.sha256(blob).hexdigest()
    count = math.ceil(len(blob) / args.chunk_size)
    if count > MAX_RELEASE_CHUNKS:
        raise ProvisioningError(f"{count} chunks: over {MAX_RELEASE_CHUNKS}; use a larger --chunk-size")
    kind = "*" if args.unchecked else checked(home, blob).kind
    targets = _pick(home, args, kind, digest)
    rows = deliver(home, blob, targets, chunk_size=args.chunk_size, window=args.window, wait=args.wait,
                   max_chunks=args.max_chunks)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    else:
        for row in rows:
            extra = row.get("version") or row.get("reason") or row.get("error") or \
                f"{row['next'] or 0}/{count} chunks on the device"
            sys.stdout.write(f"{row['device']}\t{row['outcome']}\t{extra}\n")
    return 0 if all(r["outcome"] == "installed" for r in rows) else EXIT_NOT_ALL_INSTALLED


def _to_gateway(home: Any, args: argparse.Namespace, blob: bytes) -> int:
    import tomllib  # noqa: PLC0415

    from gateway.common import tomledit  # noqa: PLC0415
    from gateway.core.release import claimed_model  # noqa: PLC0415
    from gateway.pki.files import PUBLIC, write_atomic  # noqa: PLC0415

    release = checked(home, blob, role="gateway")
    config: Path = args.gateway_config or home.root / "gateway.toml"
    try:
        doc = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LocalError(f"{config}: {getattr(exc, 'strerror', None) or exc}") from None
    folder = config.parent / "releases"
    target = folder / f"{release.model}-{release.version}.sgwrel"
    kept = []
    for entry in doc.get("inference", {}).get("releases", []):
        path = Path(entry) if Path(entry).is_absolute() else config.parent / entry
        try:
            same = claimed_model(path.read_bytes()) == release.model
        except OSError:
            same = False  # unreadable: the gateway refuses it at start anyway; not ours to drop
        if not same and path != target:
            kept.append(str(entry))
    folder.mkdir(mode=0o755, exist_ok=True)
    write_atomic(target, blob, mode=PUBLIC)
    releases = [*kept, str(target.relative_to(config.parent))]
    edited = tomledit.set_keys(config.read_text(), {"inference": {"releases": releases}})
    write_atomic(config, edited.encode(), mode=config.stat().st_mode & 0o777)
    row = {"gateway_config": str(config), "release": str(target), "model": release.model,
           "version": release.version, "releases": releases,
           "next": "reload the gateway to swap it in: systemctl reload sgw-gateway (or kill -HUP its pid)"}
    if args.json:
        sys.stdout.write(json.dumps(row, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"{release.model} {release.version} named in {config}; {row['next']}\n")
    return 0


def checked(home: Any, blob: bytes, *, role: str = "agent") -> Any:
    """The release (a core.release.Release) once the home's trusted key verifies it (a refusal: one line,
    exit 1)."""
    from gateway.inference.releases import load_trust  # noqa: PLC0415

    if not home.release_pub.is_file():
        raise ProvisioningError(f"no trusted release key in {home.root} ('sgw model keygen --trust')")
    pq = home.release_pq_pub if home.release_pq_pub.is_file() else Path()
    trust = load_trust(home.release_pub, role=role, kind="*", key="release key", pq_public_key_file=pq,
                       pq_key="ML-DSA-65 release key")
    return trust.verify(blob, installed_version=None)


def deliver(home: Any, blob: bytes, targets: dict[str, Any], *, chunk_size: int, window: int, wait: float,
            max_chunks: int | None = None) -> list[dict[str, Any]]:
    """Sends the release to each target (probe, then chunks as the replies ask); one row per device."""
    from gateway.cli.cmd_channel import CommandChannel  # noqa: PLC0415
    from gateway.pb import downlink_pb2 as dpb  # noqa: PLC0415

    digest = hashlib.sha256(blob).hexdigest()
    count = math.ceil(len(blob) / chunk_size)
    devices = {d: _Device(d) for d in targets}
    chunks = [blob[i * chunk_size:(i + 1) * chunk_size] for i in range(count)]
    hashes = [hashlib.sha256(c).digest() for c in chunks]
    expires_ms = int((time.time() + wait + 3600) * 1000)
    budget = max_chunks

    def command(index: int, data: bytes = b"") -> dpb.Command:
        chunk = dpb.ModelChunk(release_id=digest, total_bytes=len(blob), chunk_bytes=chunk_size,
                               index=index, data=data, sha256=hashes[index] if data else b"")
        return dpb.Command(id="m" + secrets.token_hex(8), kind=dpb.COMMAND_KIND_MODEL_CHUNK,
                           expires_at_ms=expires_ms, model_chunk=chunk)

    with CommandChannel(home, targets) as channel:
        now = time.monotonic()
        for dev in devices.values():
            dev.last_heard = now
            if not channel.send(dev.device_id, command(0)):
                dev.outcome = "error"
                dev.detail["error"] = "not sent (the broker connection failed)"
        while True:
            open_ = [d for d in devices.values() if not d.outcome]
            if not open_:
                break
            now = time.monotonic()
            for dev in open_:
                if now - dev.last_heard > wait:
                    dev.outcome = "no_reply" if dev.next is None else "partial"
            for r in channel.replies(0.2):
                dev = devices[r.device_id]
                if dev.outcome:
                    continue
                dev.last_heard = time.monotonic()
                values = {v.key: v.value for v in r.reply.values}
                if "next" in values and dev.resumed_from is None:
                    dev.resumed_from = int(values["next"])
                if "next" in values and ("installed" in values or "refused" in values):
                    dev.next = int(values["next"])
                if "installed" in values:
                    dev.outcome, dev.detail["version"] = "installed", values["installed"]
                    dev.detail["already_running"] = values.get("already") == "1"
                    continue
                if "refused" in values:
                    dev.outcome, dev.detail["reason"] = "refused", values["refused"]
                    dev.detail["error"] = r.reply.error
                    continue
                if "next" not in values:
                    dev.outcome, dev.detail["error"] = "error", r.reply.error or "no progress in the reply"
                    continue
                wanted = int(values["next"])
                if not r.reply.ok:
                    if wanted >= count:  # all there, but it would not load or fit
                        dev.outcome, dev.detail["error"] = "error", r.reply.error
                        continue
                    dev.sent_upto = min(dev.sent_upto, wanted - 1)  # a chunk went missing: again from there
                dev.next = max(dev.next or 0, wanted) if r.reply.ok else wanted
                dev.sent_upto = max(dev.sent_upto, dev.next - 1)  # what it holds already is not sent again
                while (dev.sent_upto + 1 < count and dev.sent_upto + 1 < dev.next + window
                       and (budget is None or dev.data_sent < budget)):
                    dev.sent_upto += 1
                    channel.send(dev.device_id, command(dev.sent_upto, chunks[dev.sent_upto]))
                    dev.data_sent += 1
                if budget is not None and dev.data_sent >= budget and dev.next >= dev.sent_upto + 1 \
                        and dev.next < count:
                    dev.outcome = "partial"
    return [{"device": dev.device_id, "outcome": dev.outcome, "chunks": count, "chunk_bytes": chunk_size,
             "release": digest[:16], "resumed_from": dev.resumed_from, "chunks_sent": dev.data_sent,
             "next": dev.next, **dev.detail} for dev in devices.values()]
