"""gateway/core/rollout.py: the staged rollout's health check, signal by signal (pure)."""

from __future__ import annotations

from gateway.core.rollout import PAUSE, PROCEED, ROLLBACK, Counts, Policy, judge

NEW, OLD = "prefilter-1.2.0", "prefilter-1.1.0"


def c(seen: int, forwarded: int, version: str = NEW, **kw: str) -> Counts:
    return Counts(seen, forwarded, version, **kw)


def run(end_canary: Counts | None, *, deployed: str = "installed", end_rest: Counts | None = None,
        start_canary: Counts | None = None) -> tuple[str, str]:
    start = {"a": start_canary or c(1000, 10), "b": c(1000, 10, OLD)}
    end = {"a": end_canary, "b": end_rest or c(1200, 12, OLD)}
    h = judge(NEW, canary=["a"], control=["b"], deployed={"a": deployed},
              before_deploy={"a": c(1000, 10, OLD), "b": c(1000, 10, OLD)}, watch_start=start, watch_end=end,
              policy=Policy())
    return h.decision, h.reason


def test_each_signal() -> None:
    assert run(c(1200, 14)) == (PROCEED, "")  # 2 % against a 1 % baseline: under 2 x 1 % + 5 %
    assert run(c(1200, 200)) == (ROLLBACK, "forward_rate")  # forwards everything it scored
    assert run(c(1200, 14), deployed="refused") == (ROLLBACK, "deploy_failed")
    assert run(c(1200, 14, OLD, rolled_back_from=NEW, rollback_reason="selftest")) == (ROLLBACK, "selftest")
    assert run(c(1200, 14, "prefilter-1.0.0")) == (ROLLBACK, "not_running")
    assert run(c(20, 0)) == (ROLLBACK, "restarted")
    assert run(None) == (PAUSE, "no_reply")
    assert run(c(1010, 0)) == (PAUSE, "too_few_windows")


def test_baseline_falls_back_to_the_canary_before_the_deploy() -> None:
    h = judge(NEW, canary=["a"], control=[], deployed={"a": "installed"},
              before_deploy={"a": c(1000, 500, OLD)}, watch_start={"a": c(1000, 500)},
              watch_end={"a": c(1200, 600)}, policy=Policy())
    assert h.decision == PROCEED and h.baseline_from == "canary_before" and h.baseline_rate == 0.5
