"""A staged rollout's health check (pure): is the canary share's new release as healthy as the old one?

`sgw model rollout` (gateway/cli/model_rollout.py) takes each device's DeviceStatus counters before the
canary deploy, right after it, and at the end of the watch period, and asks `judge`. The signals, in the
order they are checked (the first that fires decides):

  deploy_failed     a canary device refused the release or could not load/fit it        -> rollback
  selftest          a canary device undid the switch itself (its self-test, a crash loop;
                    gateway/agent/probation.py): DeviceStatus model_rolled_back_from      -> rollback
  not_running       a canary device runs another version than the release                -> rollback
  restarted         a canary device's counters went backwards: it restarted in the watch  -> rollback
  no_reply          a device did not answer a status request                              -> pause
  too_few_windows   the canary scored fewer than min_windows windows in the watch         -> pause
  forward_rate      the canary forwards more than baseline x max_forward_ratio + slack    -> rollback

The baseline is the forward rate of the devices not in the canary over the same watch period (same time,
same plant, the previous release); with too few of those windows, the canary devices' own rate on the
previous release since their agents started. Forward rate = forwarded / seen windows, anomalies and
summaries alike (both groups send summaries at the same interval). The shipped prefilter forwards 0.4 %
of healthy windows and its most sensitive curve point 4.2 % (edge_models/manifest.json quality), so the
default limit, 2 x baseline + 5 percentage points, passes a retrained model an order of magnitude more
sensitive on a quiet plant and stops one that forwards everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROCEED, PAUSE, ROLLBACK = "proceed", "pause", "rollback"


@dataclass(frozen=True)
class Counts:
    """What one DeviceStatus says (the fields the check reads)."""

    seen: int
    forwarded: int
    model_version: str
    rolled_back_from: str = ""
    rollback_reason: str = ""


@dataclass(frozen=True)
class Policy:
    max_forward_ratio: float = 2.0
    forward_slack: float = 0.05
    min_windows: int = 50


@dataclass(frozen=True)
class Health:
    decision: str  # proceed | pause | rollback
    reason: str  # "" when proceeding, else one of the signals above
    detail: str = ""
    canary_windows: int = 0
    canary_rate: float | None = None
    baseline_rate: float | None = None
    baseline_from: str = ""  # control | canary_before | none
    limit: float | None = None
    devices: dict[str, str] = field(default_factory=dict)  # device -> what was wrong with it


def _rate(forwarded: int, seen: int) -> float | None:
    return forwarded / seen if seen > 0 else None


def judge(version: str, *, canary: list[str], control: list[str], deployed: dict[str, str],
          before_deploy: dict[str, Counts | None], watch_start: dict[str, Counts | None],
          watch_end: dict[str, Counts | None], policy: Policy) -> Health:
    """`version`: the model_version the release runs as ("prefilter-1.2.0"); `deployed`: device -> the
    canary deploy's outcome (installed, refused, error, ...)."""
    bad = {d: f"deploy {o}" for d, o in deployed.items() if d in canary and o != "installed"}
    if bad:
        return Health(ROLLBACK, "deploy_failed", f"{len(bad)} canary device(s) did not install it",
                      devices=bad)
    ends = {d: c for d in canary if (c := watch_end.get(d)) is not None}
    bad = {d: f"rolled back by itself: {c.rollback_reason}" for d, c in ends.items()
           if c.rolled_back_from == version and c.model_version != version}
    if bad:
        return Health(ROLLBACK, "selftest", "canary device(s) undid the switch themselves", devices=bad)
    bad = {d: f"runs {c.model_version}" for d, c in ends.items() if c.model_version != version}
    if bad:
        return Health(ROLLBACK, "not_running", "canary device(s) run another version", devices=bad)
    bad = {d: "restarted during the watch" for d, e in ends.items()
           if (s := watch_start.get(d)) is not None and e.seen < s.seen}
    if bad:
        return Health(ROLLBACK, "restarted", "canary device(s) restarted during the watch", devices=bad)
    silent = {d: "no status reply" for d in (*canary, *control)
              if watch_start.get(d) is None or watch_end.get(d) is None}
    if any(d in canary for d in silent):
        return Health(PAUSE, "no_reply", "canary device(s) did not answer", devices=silent)
    seen = forwarded = 0
    for d in canary:
        s, e = watch_start[d], watch_end[d]
        assert s is not None and e is not None  # noqa: S101 - checked above
        seen += e.seen - s.seen
        forwarded += e.forwarded - s.forwarded
    canary_rate = _rate(forwarded, seen)
    if seen < policy.min_windows or canary_rate is None:
        return Health(PAUSE, "too_few_windows",
                      f"the canary scored {seen} windows, {policy.min_windows} needed", canary_windows=seen)
    baseline, source = _baseline(canary, control, before_deploy, (watch_start, watch_end), policy)
    limit = (baseline or 0.0) * policy.max_forward_ratio + policy.forward_slack
    health = Health(PROCEED, "", "", seen, canary_rate, baseline, source, limit)
    if canary_rate > limit:
        return Health(ROLLBACK, "forward_rate", f"the canary forwards {canary_rate:.1%} of its windows, "
                      f"at most {limit:.1%} allowed (baseline {(baseline or 0.0):.1%}, {source})",
                      seen, canary_rate, baseline, source, limit)
    return health


def _baseline(canary: list[str], control: list[str], before_deploy: dict[str, Counts | None],
              watch: tuple[dict[str, Counts | None], dict[str, Counts | None]], policy: Policy
              ) -> tuple[float | None, str]:
    watch_start, watch_end = watch
    seen = forwarded = 0
    for d in control:
        s, e = watch_start.get(d), watch_end.get(d)
        if s is None or e is None or e.seen < s.seen:
            continue
        seen += e.seen - s.seen
        forwarded += e.forwarded - s.forwarded
    if seen >= policy.min_windows:
        return _rate(forwarded, seen), "control"
    seen = sum(c.seen for d in canary if (c := before_deploy.get(d)) is not None)
    forwarded = sum(c.forwarded for d in canary if (c := before_deploy.get(d)) is not None)
    if seen >= policy.min_windows:
        return _rate(forwarded, seen), "canary_before"
    return None, "none"
