"""`sgw agent --config agent.toml`: the edge agent (gateway/agent/service.py)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path

from gateway.agent.baseline import CommissioningScorer
from gateway.agent.config import AgentConfig, load_agent_config, load_e2e_keys
from gateway.agent.enroll import ensure_enrolled, log_settings
from gateway.agent.gateway_key import apply as apply_downlink_state
from gateway.agent.ledger import Ledger
from gateway.agent.metrics import AgentMetrics
from gateway.agent.models import AgentModels
from gateway.agent.outbox import Outbox
from gateway.agent.rotation import recover as recover_rotation
from gateway.agent.rotation import rotation_paths
from gateway.agent.service import Agent, AgentOptions, Scorer
from gateway.agent.sources import Source, make_source
from gateway.common.logs import setup_logging
from gateway.errors import ConfigError, SgwError
from gateway.inference import features
from gateway.inference.decision import BASELINE_PREFIX
from gateway.inference.engine import Prefilter


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "agent", help="run the edge agent: read a sensor, filter, seal and publish via a durable outbox",
        description="Reads windows from the configured source, forwards anomalies and periodic summaries "
                    "sealed end to end over MQTT (QoS 1, mutual TLS), keeping every accepted message in "
                    "an SQLite outbox until the broker acknowledges it. SIGTERM flushes and exits 0. "
                    "[source] type: simulated, replay (a .npy/.csv recording), iio (a Linux IIO "
                    "accelerometer: device, channels, buffer_length, trigger) or pipe (frames or CSV "
                    "from a FIFO or stdin: path, format); see docs/OPERATIONS.md, 'Adding a sensor'.",
    )
    p.add_argument("--config", type=Path, required=True, help="agent.toml (written by `sgw device add`)")
    p.add_argument("--log-format", choices=("text", "json"), default=None, help="overrides [log] format")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                   help="overrides [log] level")
    p.add_argument("--ledger", type=Path, default=None,
                   help="append one JSON line per forwarded window to this file (audits, tests)")
    p.add_argument("--heartbeat-s", type=float, default=30.0, help="HEARTBEAT status interval (default 30)")
    p.add_argument("--flush-timeout-s", type=float, default=10.0,
                   help="on SIGTERM, wait at most this long for PUBACKs before exiting (default 10)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="stop the source after this many windows, then flush and exit (tests, benchmarks)")
    p.add_argument("--max-publish-rate", type=float, default=100.0,
                   help="messages/s when replaying a backlog, under the gateway's per-device limit "
                        "(default 100, burst 2x; 0 = unpaced)")
    p.add_argument("--keep-running", action="store_true",
                   help="when a replay or --max-windows source ends, keep publishing until SIGTERM")
    p.add_argument("--commission", action="store_true",
                   help="discard this device's baseline and learn its normal afresh (after maintenance); "
                        "implies [commission] enabled")
    p.add_argument("--enroll-only", action="store_true",
                   help="with an [enroll] section: enrol (or finish an interrupted install), then exit 0 "
                        "without running (first start under a read-only unit: docs/OPERATIONS.md)")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace, prefilter_version: str) -> AgentOptions:
    for name in ("heartbeat_s", "flush_timeout_s"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be positive")
    if args.max_publish_rate < 0:
        raise ConfigError("--max-publish-rate: must not be negative")
    return AgentOptions(heartbeat_s=args.heartbeat_s, flush_timeout_s=args.flush_timeout_s,
                        prefilter_version=prefilter_version, exit_when_source_ends=not args.keep_running,
                        publish_rate=args.max_publish_rate,
                        publish_burst=max(1, int(2 * args.max_publish_rate)), config_path=Path(args.config))


def build(args: argparse.Namespace, cfg: AgentConfig) -> Agent:
    """Everything that can fail on our side fails here, before the agent connects or reads a sensor."""
    if args.max_windows is not None and args.max_windows < 0:
        raise ConfigError("--max-windows: must not be negative")
    e2e = load_e2e_keys(cfg.e2e)
    source = make_source(cfg.source, kind=cfg.device.kind, max_windows=args.max_windows)
    metrics = AgentMetrics(cfg.device.kind)
    models = AgentModels(cfg, metrics)

    def fits(candidate: Prefilter) -> str | None:
        try:
            _check_fits(cfg, source, candidate)
        except ConfigError as exc:
            return str(exc)
        return None

    commissioning = cfg.commission.enabled or getattr(args, "commission", False)
    models.judges = not commissioning  # a baseline scores the windows: no probation for prefilter switches
    # the active signed release (an unconfirmed switch that fails to load, fit or self-test goes back),
    # else the packaged model (gateway/agent/models.py)
    prefilter = models.load(fits)
    _check_fits(cfg, source, prefilter)
    options = _options(args, models.version)
    ledger = Ledger(args.ledger) if args.ledger is not None else None
    outbox = Outbox(cfg.outbox.path, max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s,
                    policy=cfg.outbox.policy)
    if cfg.metrics.port:
        metrics.serve(cfg.metrics.host, cfg.metrics.port)
    scorer: Scorer = prefilter
    if commissioning:
        scorer = commissioning_scorer(cfg, recommission=getattr(args, "commission", False))
        # the gateway trusts a per-device gate's verdict (gateway/inference/decision.py gate_of)
        options = dataclasses.replace(options, prefilter_version=f"{BASELINE_PREFIX}{features.ORDER_SET}")
    return Agent(cfg, e2e=e2e, scorer=scorer, source=source, outbox=outbox, metrics=metrics,
                 ledger=ledger, options=options, models=models, fits=fits)


def commissioning_scorer(cfg: AgentConfig, *, recommission: bool = False) -> CommissioningScorer:
    """The per-device baseline scorer for this config; recommission=True forgets the stored baseline."""
    scorer = CommissioningScorer(cfg.baseline_path, windows=cfg.commission.windows,
                                 target_rate=cfg.commission.target_false_forward,
                                 sample_rate_hz=cfg.source.sample_rate_hz)
    if recommission:
        scorer.recommission()
    return scorer


def _check_fits(cfg: AgentConfig, source: Source, prefilter: Prefilter) -> None:
    """The prefilter only means something on windows shaped like its training data."""
    prep = prefilter.model.spec.preprocessing
    if cfg.source.window != prep.window:
        raise ConfigError(f"source.window: the prefilter model expects {prep.window}-sample windows, "
                          f"got {cfg.source.window}")
    if abs(source.sample_rate_hz - prep.sample_rate_hz) > 1e-6 * prep.sample_rate_hz:
        key = "source.resample_hz" if cfg.source.resample_hz else "source.sample_rate_hz"
        raise ConfigError(f"{key}: the prefilter model expects {prep.sample_rate_hz:g} Hz, got "
                          f"{source.sample_rate_hz:g} (a sensor that cannot sample at that rate: set "
                          f"[source] resample_hz = {prep.sample_rate_hz:g})")
    axes = getattr(source, "axes", 3)
    if axes != prefilter.model.window_shape[1]:
        raise ConfigError(f"source.path: the prefilter model expects {prefilter.model.window_shape[1]} axes, "
                          f"the recording has {axes}")


def run(args: argparse.Namespace) -> int:
    # First start of a device that has only its factory identity: enrol (or finish an interrupted
    # install) before the config is read, so the agent only ever runs on a complete identity.
    level, fmt = log_settings(Path(args.config))
    setup_logging(args.log_level or level, args.log_format or fmt)
    ensure_enrolled(Path(args.config))
    if args.enroll_only:
        load_agent_config(args.config)  # the installed identity must be a complete config
        return 0
    cfg = load_agent_config(args.config)
    setup_logging(args.log_level or cfg.log.level, args.log_format or cfg.log.format)
    if recover_rotation(rotation_paths(cfg, Path(args.config))):
        cfg = load_agent_config(args.config)  # the rotation rewrote device_key_id
    # What the downlink installed (a new gateway key, a suite) lives beside the outbox: laid over [e2e].
    cfg = apply_downlink_state(cfg)
    agent = build(args, cfg)

    async def main() -> int:
        return await agent.run()

    try:
        return asyncio.run(main())
    except ExceptionGroup as group:
        # A task failed on something we can name (outbox disk, model): one line, not a task-group trace.
        first = _first_sgw_error(group)
        if first is None:
            raise
        raise first from None


def _first_sgw_error(group: BaseExceptionGroup[BaseException]) -> SgwError | None:
    for exc in group.exceptions:
        if isinstance(exc, SgwError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_sgw_error(exc)
            if inner is not None:
                return inner
    return None
