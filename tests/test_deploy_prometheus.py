"""deploy/prometheus and deploy/grafana, checked with the real promtool and against the metrics contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib

import pytest
from sgw_metrics_contract import (
    BUILTIN_SERIES,
    DASHBOARD,
    DEPLOY,
    RULES,
    TARGET_LABELS,
    all_series_names,
    contract_metrics,
    dashboard_queries,
    grouping_labels,
    matcher_labels,
    rule_entries,
    selectors,
)

PROM = DEPLOY / "prometheus"
TESTS = PROM / "tests" / "sgw.test.yml"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian prometheus) missing"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=PROM, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_check_config() -> None:
    proc = _promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # promtool only warns (exit 0) when a file_sd glob matches nothing: the agents job would be empty.
    assert "WARNING" not in proc.stdout + proc.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = _promtool("check", "rules", str(RULES.relative_to(PROM)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    proc = _promtool("test", "rules", str(TESTS.relative_to(PROM)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def _alert_cases() -> dict[str, dict[str, int]]:
    """alertname -> {'firing': n, 'quiet': n} counted from the promtool test file."""
    cases: dict[str, dict[str, int]] = {}
    lines = TESTS.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*alertname: (\S+)", line)
        if not m:
            continue
        exp = next(x for x in lines[i + 1 :] if "exp_alerts:" in x)
        kind = "quiet" if exp.strip().endswith("[]") else "firing"
        cases.setdefault(m.group(1), {"firing": 0, "quiet": 0})[kind] += 1
    return cases


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    alerts = {name for kind, name, _ in rule_entries() if kind == "alert"}
    assert len(alerts) >= 6
    cases = _alert_cases()
    assert set(cases) <= alerts, f"tests name alerts that do not exist: {set(cases) - alerts}"
    for alert in sorted(alerts):
        assert cases.get(alert, {}).get("firing"), f"{alert}: no firing case in {TESTS.name}"
        assert cases.get(alert, {}).get("quiet"), f"{alert}: no not-firing case in {TESTS.name}"


def test_contract_parses() -> None:
    metrics = contract_metrics()
    assert len(metrics) >= 25
    assert metrics["sgw_gateway_e2e_latency_seconds"].type == "histogram"
    assert metrics["sgw_gateway_windows_total"].labels == {"kind": None}
    assert metrics["sgw_agent_outbox_oldest_age_seconds"].type == "gauge"


def _check_queries(queries: list[tuple[str, str]], recorded: set[str]) -> list[str]:
    metrics = contract_metrics()
    known = all_series_names()
    all_labels = set(TARGET_LABELS) | {"le"} | {lbl for m in metrics.values() for lbl in m.labels}
    problems: list[str] = []
    for where, expr in queries:
        for name, matchers in selectors(expr):
            if name in BUILTIN_SERIES or name in recorded:
                continue
            if name not in known:
                problems.append(f"{where}: {name} is not in docs/ARCHITECTURE.md's Metrics list")
                continue
            base = next(m for m in metrics.values() if name in m.series_names())
            allowed = set(base.labels) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            problems += [
                f"{where}: {name} has no label {label!r} in the contract"
                for label in matcher_labels(matchers)
                if label not in allowed
            ]
        problems += [
            f"{where}: grouping label {label!r} is on no contract metric"
            for label in grouping_labels(expr)
            if label not in all_labels
        ]
    return problems


def test_rules_use_only_contract_metrics() -> None:
    entries = rule_entries()
    recorded = {name for kind, name, _ in entries if kind == "record"}
    assert all(r.startswith("sgw:") for r in recorded), "recording rules follow level:metric:operations"
    problems = _check_queries([(f"rule {name}", expr) for _, name, expr in entries], recorded)
    assert not problems, "\n".join(problems)


def test_dashboard_uses_only_contract_metrics() -> None:
    recorded = {name for kind, name, _ in rule_entries() if kind == "record"}
    queries = dashboard_queries()
    assert len(queries) >= 20
    problems = _check_queries([(f"panel {title!r}", expr) for title, expr in queries], recorded)
    assert not problems, "\n".join(problems)


def test_dashboard_covers_the_issue_panels_and_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for q in ("0.5,", "0.99,", "0.999,"):
        assert f"histogram_quantile({q} sum by (le) (rate(sgw_gateway_e2e_latency_seconds_bucket" in exprs
    for needle in (
        "sgw_gateway_messages_total",  # throughput
        "sum by (reason) (rate(sgw_gateway_rejections_total",  # rejections by reason
        "sum by (model, backend)",  # inference by model and backend
        "sgw_gateway_batch_size_bucket",  # batch size
        "sgw_agent_outbox_messages",  # outbox depth
        "sgw_agent_outbox_oldest_age_seconds",  # outbox age
        'up{job="sgw-agent"}',  # agents online
    ):
        assert needle in exprs, needle
    ds_uid = re.search(
        r"^\s*uid:\s*(\S+)",
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "sgw.yml").read_text(encoding="utf-8"),
        re.M,
    )
    assert ds_uid is not None
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == ds_uid.group(1), panel["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "sgw.yml").read_text(encoding="utf-8")
    assert "type: file" in provider


def test_static_check_catches_a_renamed_metric_or_label() -> None:
    problems = _check_queries(
        [
            ("x", "rate(sgw_gateway_message_total[5m])"),
            ("y", 'sgw_gateway_windows_total{device="d1"}'),
            ("z", "sum by (device) (sgw_gateway_queue_depth)"),
            ("ok", 'sum by (le) (rate(sgw_gateway_batch_size_bucket{model="m"}[1m]))'),
        ],
        recorded=set(),
    )
    assert [p.split(":")[0] for p in problems] == ["x", "y", "z"], problems


def test_gateway_scrape_targets_match_the_shipped_workers() -> None:
    """One target per worker (docs/OPERATIONS.md, "Workers"): worker K serves metrics.port + K - 1."""
    conf = tomllib.loads((DEPLOY / "config" / "gateway.toml").read_text(encoding="utf-8"))
    workers, host, port = conf["gateway"]["workers"], conf["metrics"]["host"], conf["metrics"]["port"]
    assert isinstance(workers, int), "the shipped config names its worker count (its targets are listed)"
    text = (PROM / "prometheus.yml").read_text(encoding="utf-8")
    job = text.split("job_name: sgw-gateway", 1)[1].split("job_name:", 1)[0]
    targets = re.findall(r'"([0-9.]+:[0-9]+)"', job.split("targets:", 1)[1].splitlines()[0])
    assert targets == [f"{host}:{port + k}" for k in range(workers)]
