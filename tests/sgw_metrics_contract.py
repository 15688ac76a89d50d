"""The one place tests learn metric names: docs/ARCHITECTURE.md's "Metrics" section, parsed.

Rules, dashboard panels and the stand-in scrape target are all checked against this, so renaming a metric
in the contract (or in a rule or panel) without the other fails a test. Also: small extractors for the
PromQL in our rules file and dashboard (no YAML library in the venv; the rules file's shape is fixed and
promtool checks its syntax separately).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "sgw.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sgw.json"

# Labels Prometheus adds at scrape time, and the histogram bucket label.
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus itself makes.
BUILTIN_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: str  # counter | gauge | histogram
    labels: dict[str, tuple[str, ...] | None]  # label -> allowed values (None: open set)

    def series_names(self) -> set[str]:
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


_TOKEN = re.compile(r"`(sgw_[a-z0-9_]+)(?:\{([^}]*)\})?`([^`]*)")


def contract_metrics() -> dict[str, MetricSpec]:
    section = _section(ARCHITECTURE.read_text(encoding="utf-8"), "Metrics")
    specs: dict[str, MetricSpec] = {}
    for name, labels_src, after in _TOKEN.findall(section):
        labels: dict[str, tuple[str, ...] | None] = {}
        for part in filter(None, (p.strip() for p in labels_src.split(","))):
            key, _, values = part.partition("=")
            labels[key.strip()] = tuple(values.strip('"').split("|")) if values else None
        if after.lstrip().startswith("histogram"):
            kind = "histogram"
        elif name.endswith("_total"):
            kind = "counter"
        else:
            kind = "gauge"
        specs[name] = MetricSpec(name, kind, labels)
    return specs


def rejection_reasons() -> list[str]:
    section = _section(ARCHITECTURE.read_text(encoding="utf-8"), "Rejection reasons")
    body = section.split("\n\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"`([a-z_]+)`", body)


def contract_toml(name: str) -> str:
    """The example config block under the '## {name}' heading (gateway.toml, agent.toml)."""
    section = _section(ARCHITECTURE.read_text(encoding="utf-8"), name)
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def all_series_names() -> set[str]:
    return set().union(*(m.series_names() for m in contract_metrics().values()))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rule_entries(path: Path = RULES) -> list[tuple[str, str, str]]:
    """(kind, name, expr) for every rule; kind is 'record' or 'alert'."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[tuple[str, str, str]] = []
    i = 0
    while i < len(lines):
        m = re.match(r"\s*- (record|alert): (\S+)", lines[i])
        if not m:
            i += 1
            continue
        kind, name = m.groups()
        i += 1
        while not re.match(r"\s*expr:", lines[i]):
            i += 1
        indent = _indent(lines[i])
        value = lines[i].split("expr:", 1)[1].strip()
        if value == "|":
            block = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                block.append(lines[i].strip())
                i += 1
            value = " ".join(b for b in block if b)
        out.append((kind, name, value))
    return out


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, expr) for every panel target."""
    dash = json.loads(path.read_text(encoding="utf-8"))
    return [
        (panel["title"], target["expr"]) for panel in dash["panels"] for target in panel.get("targets", [])
    ]


# A series selector: a metric name (ours or Prometheus' own), optional {matchers}. Function names are
# excluded by the lookahead for '('; label names in by()/on() never start with sgw_ or equal 'up'.
_SELECTOR = re.compile(r"(?<![\w:.$\"])((?:sgw[_:][\w:]*)|up|ALERTS)(?![\w:(])\s*(\{[^}]*\})?")


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, '{matchers}' or '') for each series selector in a PromQL expression."""
    return [(m.group(1), m.group(2) or "") for m in _SELECTOR.finditer(expr)]


def matcher_labels(matchers: str) -> list[str]:
    return re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers)


def grouping_labels(expr: str) -> list[str]:
    labels: list[str] = []
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels += [x.strip() for x in group.split(",") if x.strip()]
    return labels
