"""Dashboard integration: a real Prometheus (/usr/bin/prometheus) runs deploy/prometheus/prometheus.yml and
rules/sgw.rules.yml against live /metrics targets; every dashboard panel query and every rule evaluates,
through the HTTP API, to non-empty data.

The targets (`scrape_targets`) are real: `sgw gateway` and two `sgw agent` processes (simulated vibration
sources with a bearing fault, so every window is forwarded) against a real mosquitto, provisioned by the
real CLI (tests/support).

Alert expressions are conditions, so a healthy system leaves most of them empty. For alerts the test
checks that Prometheus evaluates them without error (rule health "ok") and that every series selector
inside them returns data (with a matcher that picks the bad case, e.g. requested="npu", reduced to "the
label is exported"), i.e. no alert watches a metric or label that is not exported.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sgw_metrics_contract import (
    BUILTIN_SERIES,
    DEPLOY,
    RULES,
    TARGET_LABELS,
    dashboard_queries,
    matcher_labels,
    selectors,
)

from gateway.common.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).is_file(), reason="prometheus (Debian package) missing")

# Grafana's $__rate_interval, at a 1 s scrape interval: wide enough for several samples.
RATE_INTERVAL = "30s"
WAIT_S = 45.0  # upper bound for scrapes and rule evaluations to fill in, not a performance assertion


@dataclass(frozen=True)
class ScrapeTargets:
    gateway: str  # host:port serving the gateway's /metrics
    agents: list[str]  # host:port of each agent's /metrics


# ---- real target: sgw gateway + sgw agents + mosquitto --------------------------------------------------


def _with_metrics_port(text: str, port: int) -> str:
    out, n = re.subn(r"(?ms)(^\[metrics\].*?^port = )\d+", rf"\g<1>{port}", text)
    assert n == 1, "no [metrics] port in the config"
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _real_targets(tmp: Path) -> Iterator[ScrapeTargets]:
    from tests.support.cli import SGW_ARGV
    from tests.support.mosquitto import start_broker
    from tests.support.provision import provision

    devices = ["dash-1", "dash-2"]
    port = free_port()
    prov = provision(tmp / "home", devices, broker_port=port)
    broker = start_broker(prov.home, tmp / "broker", port=port)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        gw_port = free_port()
        gw_conf = prov.home / "gateway-dashboard.toml"  # same folder: relative paths hold
        gw_conf.write_text(_with_metrics_port(prov.gateway_toml.read_text(), gw_port))
        cmds = [[*SGW_ARGV, "gateway", "--config", str(gw_conf)]]
        agent_ports = []
        for dev in devices:
            agent_ports.append(free_port())
            text = _with_metrics_port((prov.bundle(dev) / "agent.toml").read_text(), agent_ports[-1])
            # A fault from t=0 makes the prefilter forward every window: steady load on the gateway.
            text, n = re.subn(
                r"(?m)^faults = .*$",
                'faults = [{ at_s = 0.0, duration_s = 3600.0, fault = "bearing" }]',
                text,
            )
            assert n == 1
            conf = prov.bundle(dev) / "agent-dashboard.toml"
            conf.write_text(text)
            cmds.append([*SGW_ARGV, "agent", "--config", str(conf)])
        for i, cmd in enumerate(cmds):
            with (tmp / f"proc{i}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
                )
        for p in procs:
            assert p.poll() is None, [f.read_text()[-2000:] for f in sorted(tmp.glob("proc*.log"))]
        yield ScrapeTargets(gateway=f"127.0.0.1:{gw_port}", agents=[f"127.0.0.1:{p}" for p in agent_ports])
    finally:
        for p in reversed(procs):  # agents first, so they flush to a gateway that is still there
            _stop(p)
        broker.stop()


@pytest.fixture(scope="module")
def scrape_targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapeTargets]:
    yield from _real_targets(tmp_path_factory.mktemp("sgw-real"))


# ---- the real Prometheus -----------------------------------------------------------------------------


def _test_config(targets: ScrapeTargets, tmp: Path) -> Path:
    """deploy/prometheus/prometheus.yml with only addresses, paths and intervals changed."""
    file_sd = tmp / "agents.yml"
    # JSON is valid YAML; file_sd reads either.
    file_sd.write_text(json.dumps([{"targets": targets.agents, "labels": {"kind": "vibration"}}]))
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    for old, new in (
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("scrape_interval: 30s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ('"127.0.0.1:9108"', f'"{targets.gateway}"'),
        ('"targets/agents/*.yml"', f'"{file_sd}"'),
        ("rules/sgw.rules.yml", str(RULES)),
    ):
        assert old in text, f"prometheus.yml no longer contains {old!r}; update this test"
        text = text.replace(old, new)
    cfg = tmp / "prometheus.yml"
    cfg.write_text(text)
    return cfg


def _get(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our own loopback server
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def prometheus(scrape_targets: ScrapeTargets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={_test_config(scrape_targets, tmp)}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(base: str, expr: str) -> list[Any]:
    body = _get(base, "/api/v1/query", query=expr)
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def _rules(base: str) -> list[dict[str, Any]]:
    return [r for g in _get(base, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]


def _input_queries(name: str, matchers: str) -> list[str]:
    """Queries proving an alert's input exists. A matcher on a metric's own label selects the bad case
    (backend="cpu", requested="npu"), which a healthy system lacks: check the label is exported instead.
    Matchers on target labels (job) pick the scrape job and are kept as written."""
    labels = matcher_labels(matchers)
    if all(label in TARGET_LABELS for label in labels):
        return [f"{name}{matchers}"]
    return [f'{name}{{{label}!=""}}' for label in labels]


def _checks(base: str) -> dict[str, str]:
    """what -> PromQL that must return data."""
    checks = {
        f"panel {title!r}: {expr}": expr.replace("$__rate_interval", RATE_INTERVAL)
        for title, expr in dashboard_queries()
    }
    for rule in _rules(base):
        if rule["type"] == "recording":
            checks[f"recording rule {rule['name']}"] = rule["query"]
            checks[f"recorded series {rule['name']}"] = rule["name"]
        else:
            for name, matchers in selectors(rule["query"]):
                for q in _input_queries(name, matchers):
                    checks[f"alert {rule['name']} input {q}"] = q
    # ALERTS only exists while an alert is pending or firing.
    return {what: q for what, q in checks.items() if not q.startswith(tuple(BUILTIN_SERIES - {"up"}))}


def test_every_panel_and_rule_returns_data(prometheus: str, scrape_targets: ScrapeTargets) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        targets = _get(prometheus, "/api/v1/targets")["data"]["activeTargets"]
        rules = _rules(prometheus)
        checks = _checks(prometheus)
        empty = [what for what, q in checks.items() if not _query(prometheus, q)]
        unhealthy = [
            f"{r['name']}: {r.get('health')} {r.get('lastError', '')}" for r in rules if r["health"] != "ok"
        ]
        down = [
            f"{t['labels']['job']} {t['scrapeUrl']}: {t['health']}" for t in targets if t["health"] != "up"
        ]
        if not (empty or unhealthy or down) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(targets) == 1 + len(scrape_targets.agents), targets
    assert not down, down
    assert not unhealthy, unhealthy
    assert not empty, "queries with no data:\n" + "\n".join(empty)
    assert len(rules) >= 20
    assert len(checks) >= 60


def test_alerts_evaluate_without_error(prometheus: str) -> None:
    # Every alert expression is valid PromQL against real data (no many-to-many matching, bad types).
    for rule in _rules(prometheus):
        if rule["type"] == "alerting":
            _query(prometheus, rule["query"])
