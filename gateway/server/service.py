"""`sgw gateway`: wiring, and the small asyncio shell around the MQTT network thread.

Everything that can fail on our side (config, key file, registry, models) fails in `build()`, before a
socket opens, so a bad install exits 2 with one line. The asyncio shell then does the slow, rare work
that must not sit in the hot path: registry polling (revocations within one poll interval), signals
(SIGTERM drains, SIGHUP reloads), the systemd watchdog. /metrics is served by prometheus-client's
own thread and reads plain counters (see metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.common import systemd
from gateway.common.logs import LogFormat, setup_logging
from gateway.common.mqtt import TlsFiles, make_client
from gateway.core import keys, suites
from gateway.core.downlink import DownlinkSealer
from gateway.core.pipeline import Pipeline, Route
from gateway.core.ratelimit import TokenBuckets
from gateway.core.release import ANY_KIND
from gateway.core.session import DeviceKeys, Opener
from gateway.errors import ConfigError, LocalError
from gateway.inference.engine import Model, load_model
from gateway.inference.releases import ModelStore, Trust, load_trust
from gateway.pki.instances import cert_cn
from gateway.registry.ids import gateway_cn, sparkplug_cn, worker_id
from gateway.registry.store import Registry
from gateway.server import metrics, paho_fast, releases, tier
from gateway.server.config import (
    GatewayConfig,
    edge_node_id,
    for_worker,
    load_config,
    model_store_path,
    state_dir,
    store_location,
)
from gateway.server.receipts import Receipts
from gateway.server.shell import MqttShell, ShellOptions
from gateway.server.sparkplug import SparkplugPublisher, make_publisher
from gateway.server.store import ResultStore

log = logging.getLogger("sgw.gateway")

MAX_DEVICES = 100_000
WINDOW_BITS = 2048
JOIN_TIMEOUT_S = 20.0  # the shell's drain gives up after 10 s
STALL_S = 30.0  # the network thread must come round its loop at least this often, or the watchdog stops


class DeviceCache:
    """The Opener's KeyLookup: a dict swapped whole on registry change (one atomic reference store)."""

    __slots__ = ("devices",)

    def __init__(self, devices: dict[str, DeviceKeys]) -> None:
        self.devices = devices

    def __call__(self, device_id: str) -> DeviceKeys | None:
        return self.devices.get(device_id)


def _count(snapshot: dict[str, DeviceKeys]) -> dict[str, int]:
    out = {"active": 0, "revoked": 0}
    for rec in snapshot.values():
        out[rec.status] = out.get(rec.status, 0) + 1
    return out


@dataclass
class Gateway:
    conf: GatewayConfig
    config_path: Path
    registry: Registry
    cache: DeviceCache
    generation: int
    shell: MqttShell
    store: ResultStore
    stats: metrics.GatewayStats
    pipeline: Pipeline
    models: dict[str, Model]
    sparkplug: SparkplugPublisher | None = None
    ident: str = ""  # this process's identity: gateway.id, or a worker's (ids.worker_id)
    trust: Trust | None = None  # the release keys read at start (a SIGHUP verifies new releases with them)
    model_store: ModelStore | None = None
    opener: Opener | None = None  # the pipeline's: which rotated devices use their new key


def build(conf: GatewayConfig, config_path: Path, *, worker: int = 1) -> Gateway:
    """`conf` as `config.for_worker(conf, worker)` returns it; the worker's identity (client id, result
    rows, downlink sender) is ids.worker_id of the instance's gateway.id."""
    ident = worker_id(conf.gateway.id, worker)
    gateway_key = keys.private_from_bytes(conf.e2e.private_key_file.read_bytes())
    kem_file = conf.e2e.mlkem_private_key_file
    kem_keys = ({} if kem_file == Path()
                else {conf.e2e.key_id: keys.kem_private_from_bytes(kem_file.read_bytes())})
    # Keys being rotated out: opened until their grace ends, never used to seal (docs/PROTOCOL.md).
    gateway_keys = {conf.e2e.key_id: gateway_key}
    retiring: dict[int, int] = {}
    for prev in conf.e2e.previous:
        gateway_keys[prev.key_id] = keys.private_from_bytes(prev.private_key_file.read_bytes())
        if prev.mlkem_private_key_file != Path():
            kem_keys[prev.key_id] = keys.kem_private_from_bytes(prev.mlkem_private_key_file.read_bytes())
        retiring[prev.key_id] = prev.accept_until_ms * 1_000_000
    registry = Registry.open(store_location(conf))
    store: ResultStore | None = None
    try:
        generation = registry.generation()
        snapshot = registry.snapshot()
        manifest = None if conf.inference.manifest == Path() else conf.inference.manifest
        wanted = conf.inference.routes.as_dict()
        models: dict[str, Model] = {}
        inf = conf.inference
        stats = metrics.GatewayStats()
        trust = load_trust(inf.release_public_key_file, role="gateway", kind=ANY_KIND,
                           key="inference.release_public_key_file",
                           pq_public_key_file=inf.release_pq_public_key_file,
                           pq_key="inference.release_pq_public_key_file")
        model_store = ModelStore(model_store_path(conf, config_path))
        released = releases.resolve(inf.releases, trust, model_store, manifest=manifest,
                                    models=wanted.values(), refused=stats.model_refused)
        for name in sorted(set(wanted.values())):
            models[name] = load_model(name, manifest=released.get(name, manifest),
                                      accelerator=inf.accelerator, delegates=inf.delegates,
                                      num_threads=inf.num_threads)
        stats.model_versions = [(n, mdl.version) for n, mdl in models.items()]
        routes = {}
        for kind, name in wanted.items():
            shape = models[name].window_shape
            routes[kind] = Route(model=name, window_shape=(int(shape[0]), int(shape[1])))
        cache = DeviceCache(snapshot)
        opener = Opener(gateway_keys=gateway_keys, lookup=cache, window_bits=WINDOW_BITS,
                        max_message_bytes=conf.pipeline.max_message_bytes, max_sessions=MAX_DEVICES,
                        gateway_kem_keys=kem_keys, suites_allowed=conf.e2e.allowed_suites(),
                        gateway_key_not_after_ns=retiring)
        for device_id, state in registry.load_replay().items():
            try:
                opener.load_replay_state(device_id, state)
            except LocalError as exc:
                where = f"registry {registry.where}: replay state of {device_id}"
                raise LocalError(f"{where}: {exc}") from None
        p = conf.pipeline
        pipeline = Pipeline(
            opener=opener, limiter=TokenBuckets(p.device_rate, p.device_burst, MAX_DEVICES), routes=routes,
            max_batch=conf.batching.max_batch, max_wait_ns=int(conf.batching.max_wait_ms * 1e6),
            queue_max=p.queue_max, max_clock_skew_ns=int(p.max_clock_skew_s * 1e9),
        )
        store = ResultStore(store_location(conf), ident, window_bits=WINDOW_BITS)
        paho_fast.install()
        m = conf.mqtt
        _check_identity(m.cert_file, ident, conf.gateway.id)
        client = make_client(gateway_cn(ident), TlsFiles(m.ca_file, m.cert_file, m.key_file))
        stats.backends = [(n, mdl.backend, conf.inference.accelerator) for n, mdl in models.items()]
        stats.registry_devices = _count(snapshot)
        options = ShellOptions(
            gateway_id=ident, host=m.host, port=m.port, share_group=m.share_group,
            session_expiry_s=m.session_expiry_s, receive_maximum=m.receive_maximum, keepalive_s=m.keepalive_s,
            results_json=conf.results.json, deadletter=conf.results.deadletter,
            takeover_after_s=conf.gateway.takeover_after_s,
        )
        receipts = None
        if conf.results.receipts:
            # One downlink session per start: a fresh ephemeral key under an epoch above every earlier one.
            sealer = DownlinkSealer(sender=ident, gateway_key=gateway_key,
                                    gateway_key_id=conf.e2e.key_id,
                                    epoch=store.next_downlink_epoch(time.time_ns() // 1_000_000))
            receipts = Receipts(sealer=sealer, lookup=cache)
        shell = MqttShell(client=client, options=options, pipeline=pipeline, models=models, store=store,
                          stats=stats, receipts=receipts)
        sparkplug = _sparkplug(conf, config_path)
        shell.sparkplug = sparkplug
        # Everything that can refuse the start has passed: in the tier's list from now on (`sgw gateway
        # status`); the asyncio shell heartbeats it.
        tier.register(registry.db, ident, host=socket.gethostname(), pid=os.getpid(),
                      version=__version__, now_ns=time.time_ns())
    except BaseException:
        if store is not None:
            store.close()
        registry.close()
        raise
    return Gateway(conf, config_path, registry, cache, generation, shell, store, stats, pipeline, models,
                   sparkplug, ident, trust, model_store, opener)


def _sparkplug(conf: GatewayConfig, config_path: Path) -> SparkplugPublisher | None:
    spb, m = conf.sparkplug, conf.mqtt
    if not spb.enabled:
        return None
    _check_cn(spb.cert_file, sparkplug_cn(conf.gateway.id), "sparkplug.cert_file",
              f"run 'sgw gateway add-sparkplug {conf.gateway.id}'")
    # bdSeq is kept in the gateway's state folder: beside the registry (StateDirectory under systemd).
    return make_publisher(gateway_id=conf.gateway.id, group_id=spb.group_id, edge_node_id=edge_node_id(conf),
                          silence_s=spb.silence_s, host=m.host, port=m.port, keepalive_s=m.keepalive_s,
                          tls=TlsFiles(m.ca_file, spb.cert_file, spb.key_file),
                          state_dir=state_dir(conf, config_path))


class Service:
    def __init__(self, gw: Gateway, *, log_format: str | None = None, log_level: str | None = None,
                 worker: int = 1) -> None:
        self.gw = gw
        self._worker = worker  # of [gateway] workers (gateway/server/workers.py); 1 = the instance itself
        self._log_format = log_format
        self._log_level = log_level
        self._stop: asyncio.Event | None = None
        self._swapping = threading.Lock()  # one model reload at a time (two SIGHUPs in a row)
        self._to_retire: set[tuple[str, int]] = set()  # (device, key id) whose older keys to retire
        self._retired: set[tuple[str, int]] = set()  # done: at most one registry write per device and key

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        gw = self.gw
        loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        server: Any = None
        if gw.conf.metrics.port:
            registry = metrics.make_registry(gw.stats, lambda: gw.pipeline)  # type: ignore[arg-type,return-value]
            try:
                server = metrics.serve(registry, gw.conf.metrics.host, gw.conf.metrics.port)
            except OSError as exc:
                where = f"{gw.conf.metrics.host}:{gw.conf.metrics.port}"
                raise ConfigError(f"metrics.port: cannot listen on {where}: {exc.strerror or exc}") from None
        # Models, protobuf descriptors and the registry cache live for the whole run: moving them out of
        # the collector's generations keeps full collections, which pause the network thread, short.
        gc.collect()
        gc.freeze()
        gw.shell.start()
        if gw.sparkplug is not None:
            gw.sparkplug.start()
        systemd.ready("serving")
        log.info("gateway started", extra={"fields": {
            "id": gw.ident, "devices": len(gw.cache.devices),
            "models": ",".join(f"{n}@{m.backend}" for n, m in gw.models.items()),
            "suites": ",".join(suites.NAMES[n] for n in sorted(gw.conf.e2e.allowed_suites())),
            "metrics": f"{gw.conf.metrics.host}:{gw.conf.metrics.port}" if server else "off"}})
        tasks = [asyncio.create_task(self._poll_registry()), asyncio.create_task(self._watchdog()),
                 asyncio.create_task(self._heartbeat())]
        try:
            while not stop.is_set() and gw.shell.alive:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
        finally:
            systemd.stopping()
            log.info("stopping: draining in-flight batches")
            gw.shell.stop()
            await asyncio.to_thread(gw.shell.join, JOIN_TIMEOUT_S)
            if gw.sparkplug is not None:
                await asyncio.to_thread(gw.sparkplug.stop)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if server is not None:
                server.shutdown()
            gw.store.close()
            with contextlib.suppress(LocalError):  # the store may be what failed; the row then goes silent
                tier.stopped(gw.registry.db, gw.ident, time.time_ns())
            gw.registry.close()
        if gw.shell.fatal is not None:
            return 1
        log.info("stopped")
        return 0

    def _refresh_registry(self, *, force: bool = False) -> None:
        gw = self.gw
        generation = gw.registry.generation()
        if generation == gw.generation and not force:
            return
        snapshot = gw.registry.snapshot()
        before = gw.cache.devices
        gw.cache.devices = snapshot  # the network thread sees it at its next lookup
        if gw.opener is not None:
            # Removed devices (`sgw device remove`): their replay window and session go too, so the
            # Opener's state stays bounded by the registry. A message of theirs still in flight is
            # refused as unknown_device at its lookup.
            for gone in before.keys() - snapshot.keys():
                gw.opener.forget(gone)
        gw.generation = generation
        gw.stats.registry_devices = _count(snapshot)
        if gw.sparkplug is not None:
            gw.sparkplug.revoked(d for d, rec in snapshot.items() if rec.status != "active")
        log.info("registry reloaded", extra={"fields": {"generation": generation, **_count(snapshot)}})

    def _retire_rotated(self) -> None:
        """A rotated device sealed with its new key: its older keys' grace ends now, for every instance
        and across restarts (this process already refuses them: the replay window's key floor). Not
        done in the network thread, so the registry write never delays a batch; retried at the next
        poll if the registry was busy."""
        gw = self.gw
        if gw.opener is not None:
            self._to_retire.update(r for r in gw.opener.take_rotated() if r not in self._retired)
        for device_id, key_id in sorted(self._to_retire):
            retired = gw.registry.retire_keys_before(device_id, key_id, time.time_ns())
            self._to_retire.discard((device_id, key_id))
            self._retired.add((device_id, key_id))
            log.info("rotation grace ended: the device uses its new key", extra={"fields": {
                "device": device_id, "key_id": key_id, "keys_retired": retired}})

    async def _poll_registry(self) -> None:
        interval = self.gw.conf.registry.poll_interval_s
        while True:
            try:
                self._retire_rotated()
                self._refresh_registry()
            except Exception as exc:  # noqa: BLE001 - a locked or briefly unreadable DB must not stop polling
                log.warning("registry poll failed", extra={"fields": {"error": str(exc)}})
            await asyncio.sleep(interval)

    async def _heartbeat(self) -> None:
        gw = self.gw
        while True:
            await asyncio.sleep(tier.HEARTBEAT_S)
            try:
                tier.heartbeat(gw.registry.db, gw.ident, time.time_ns())
            except Exception as exc:  # noqa: BLE001 - like the registry poll: a store hiccup must not stop it
                log.warning("heartbeat to the store failed", extra={"fields": {"error": str(exc)}})

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval_s()
        if interval is None:
            return
        shell = self.gw.shell
        while True:
            if shell.alive and time.monotonic() - shell.heartbeat < STALL_S:
                systemd.watchdog()
            await asyncio.sleep(interval)

    def _reload(self) -> None:
        """SIGHUP: re-read the registry now; from the config file, apply what is safe live (logging, and
        [inference] releases: reload_models)."""
        gw = self.gw
        try:
            conf = for_worker(load_config(gw.config_path), self._worker)
        except ConfigError as exc:
            log.error(  # noqa: TRY400 - one line naming the key, not a traceback
                "reload: config refused, keeping the running one", extra={"fields": {"error": str(exc)}}
            )
        else:
            fmt: LogFormat = "json" if (self._log_format or conf.log.format) == "json" else "text"
            setup_logging(self._log_level or conf.log.level, fmt)
            if conf != gw.conf:
                log.info("reload: log settings and [inference] releases applied; other changes need a "
                         "restart")
            # loading a model takes a while: off the event loop, handed to the network thread when ready
            asyncio.get_running_loop().create_task(asyncio.to_thread(self.reload_models, conf))
        try:
            self._refresh_registry(force=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("reload: registry read failed", extra={"fields": {"error": str(exc)}})


    def reload_models(self, conf: GatewayConfig) -> dict[str, str]:
        """[inference] releases again (SIGHUP): each new one verified and installed as at start
        (gateway/server/releases.py); a routed model whose active release changed is loaded, checked
        against the window shape its route was built for, and swapped in by the network thread between
        two batches (MqttShell.swap_models). Returns model -> version swapped to."""
        gw = self.gw
        if gw.trust is None or gw.model_store is None or not self._swapping.acquire(blocking=False):
            return {}
        try:
            return self._swap_models(conf, gw.trust, gw.model_store)
        finally:
            self._swapping.release()

    def _swap_models(self, conf: GatewayConfig, trust: Trust, model_store: ModelStore) -> dict[str, str]:
        gw, inf = self.gw, conf.inference
        manifest = None if inf.manifest == Path() else inf.manifest
        wanted = sorted(set(gw.conf.inference.routes.as_dict().values()))  # routes change with a restart
        try:
            released = releases.resolve(inf.releases, trust, model_store, manifest=manifest, models=wanted,
                                        refused=gw.stats.model_refused)
        except (OSError, LocalError) as exc:  # e.g. a worker installing the same release at the same time
            log.error("reload: releases not read, the models keep running",  # noqa: TRY400
                      extra={"fields": {"error": str(exc)}})
            return {}
        new: dict[str, Model] = {}
        for name in wanted:
            path, running = released.get(name), gw.models[name]
            if path is None:
                continue
            try:
                model = load_model(name, manifest=path, accelerator=inf.accelerator, delegates=inf.delegates,
                                   num_threads=inf.num_threads)
            except (LocalError, OSError, ValueError) as exc:
                log.error("model swap refused: the release does not load",  # noqa: TRY400
                          extra={"fields": {"model": name, "error": str(exc)}})
                continue
            if model.version == running.version:
                continue
            if tuple(model.window_shape) != tuple(running.window_shape):
                log.error("model swap refused: another window shape than its route's (restart to change it)",
                          extra={"fields": {"model": name, "version": model.version,
                                            "shape": list(model.window_shape)}})
                continue
            new[name] = model
        if new:
            gw.models.update(new)
            gw.shell.swap_models(new)
        return {n: m.version for n, m in new.items()}


def _check_cn(cert_file: Path, want: str, key: str, fix: str) -> None:
    try:
        have = cert_cn(cert_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read {cert_file} ({exc})") from None
    if have != want:
        raise ConfigError(f"{key}: {cert_file} is for {have!r}, this gateway needs CN {want!r}; {fix}")


def _check_identity(cert_file: Path, ident: str, gateway_id: str) -> None:
    """Refuse a certificate that is not this instance's (or this worker's): the broker makes its CN our
    client id, so two processes with one certificate would keep displacing each other
    (docs/OPERATIONS.md, instances and workers)."""
    want = gateway_cn(ident)
    try:
        have = cert_cn(cert_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"mqtt.cert_file: cannot read {cert_file} ({exc})") from None
    if have != want and ident != gateway_id:
        raise ConfigError(f"mqtt.cert_file: {cert_file} is for {have!r} but worker {ident!r} needs CN "
                          f"{want!r}; run 'sgw gateway add-workers {gateway_id}' with --count of all workers")
    if have != want:
        raise ConfigError(
            f"mqtt.cert_file: {cert_file} is for {have!r} but gateway.id {gateway_id!r} needs CN {want!r}; "
            f"run 'sgw ca migrate' (a home from before per-instance identities) or "
            f"'sgw gateway add-instance {gateway_id}' and use the gateway-{gateway_id}.toml it writes"
        )
