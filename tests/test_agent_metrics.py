"""The agent's exposition matches docs/ARCHITECTURE.md exactly: names, types, labels and label values."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.agent.metrics import AgentMetrics
from tests.sgw_metrics_contract import contract_metrics


def test_agent_series_are_the_contracts() -> None:
    m = AgentMetrics("vibration")
    m.publish_latency.observe(0.001)
    m.model_info.labels(model="prefilter", version="1.0.0").set(1)  # as every start does (agent/models.py)
    text = generate_latest(m.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    contract = {n: s for n, s in contract_metrics().items() if n.startswith("sgw_agent_")}
    exposed: dict[str, str] = {}
    for fam in families.values():
        for sample in fam.samples:
            if sample.name.endswith("_created"):
                continue
            base = sample.name
            for suffix in ("_bucket", "_sum", "_count"):
                if fam.type == "histogram" and base.endswith(suffix):
                    base = base[: -len(suffix)]
            exposed[base] = fam.type
            spec = contract.get(base)
            assert spec is not None, f"{base} is not in the contract"
            for label, value in sample.labels.items():
                if label == "le":
                    continue
                assert label in spec.labels, f"{base}: label {label} not in the contract"
                allowed = spec.labels[label]
                assert allowed is None or value in allowed, f"{base}{{{label}={value}}} not allowed"
    assert set(exposed) == set(contract), set(contract) ^ set(exposed)
    for name, kind in exposed.items():
        assert kind == contract[name].type, f"{name}: {kind} but the contract says {contract[name].type}"
