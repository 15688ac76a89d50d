"""Logs carry no secrets: a real agent and a real gateway at `--log-level debug`, in text and in JSON,
against a real mosquitto, under a little attack, for a few seconds; then everything both wrote to stderr
is searched for key material and plaintext.

Searched for (each as raw bytes, hex and base64, and a 24-byte prefix of each, so a truncated dump is
caught too): the device's and the gateway's e2e private keys, the device's and the gateway's TLS private
keys (the PEM body, line by line, and the DER), the samples of windows a test publisher sealed, and a
random marker sealed as a status message's agent_version. The attacks (a garbage payload, a replayed
envelope, a tampered envelope, all published with a device certificate) make the gateway log
rejections, so the rejection path is covered too. The test checks that the logs are not empty and that
they hold the lines it expects, so it would see a leak if there were one.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from gateway.core.codec import encode_window
from gateway.pb import messages_pb2 as pb
from tests.support.agent import agent_toml, running_agent, wait_for
from tests.support.gateway import Device, Env, GatewayProc, metric
from tests.support.mosquitto import free_port, start_broker
from tests.support.provision import Provisioned, provision

AGENT_DEV = "dev-agent"
PUB_DEV = "dev-pub"
PREFIX = 24  # bytes: a multiple of 3, so the base64 of the prefix is a prefix of the base64


def _forms(raw: bytes) -> list[bytes]:
    """Ways a byte string may show up in a log line; hex forms are searched in the lower-cased log."""
    out = []
    for b in {raw, raw[:PREFIX]}:
        out += [b, b.hex().encode(), base64.b64encode(b), base64.urlsafe_b64encode(b),
                base64.b64encode(b).rstrip(b"="), repr(b)[2:-1].encode()]
    return out


def _pem_body(path: Path) -> tuple[list[bytes], bytes]:
    """The base64 lines of a PEM file (header and footer dropped) and the DER they encode."""
    lines = [ln.strip() for ln in path.read_bytes().splitlines() if ln.strip() and b"-----" not in ln]
    return lines, base64.b64decode(b"".join(lines))


def _secrets(prov: Provisioned) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for name, path in {"device e2e key": prov.bundle(AGENT_DEV) / "e2e.key",
                       "publisher e2e key": prov.bundle(PUB_DEV) / "e2e.key",
                       "gateway e2e key": prov.home / "gateway" / "e2e.key"}.items():
        raw = path.read_bytes()
        assert len(raw) == 32, (name, len(raw))
        found[name] = _forms(raw)
    for name, path in {"device TLS key": prov.bundle(AGENT_DEV) / "device.key",
                       "publisher TLS key": prov.bundle(PUB_DEV) / "device.key",
                       "gateway TLS key": prov.home / "gateway" / "client.key"}.items():
        lines, der = _pem_body(path)
        assert lines and b"PRIVATE KEY" in path.read_bytes(), name
        found[name] = [*lines, b"".join(lines), *_forms(der)]
    return found


def _publish(dev: Device, payload: bytes) -> None:
    info = dev.client.publish(dev.topic, payload, qos=1)
    assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
    info.wait_for_publish(10)


def _attack_and_talk(dev: Device, marker: str) -> tuple[list[bytes], int]:
    """Sealed windows (their samples are returned), a sealed status carrying `marker`, and three attacks.
    Returns the samples and how many messages the gateway should accept."""
    rng = np.random.default_rng(secrets.randbits(32))
    samples: list[bytes] = []
    sealed_windows: list[bytes] = []
    for seq in range(5):
        now = time.time_ns()
        w = encode_window(rng.normal(0, 0.3, size=(128, 3)).astype(np.float32), kind="vibration",
                          sample_rate_hz=1600.0, start_ns=now - 80_000_000, window_seq=seq,
                          prefilter_version=marker)
        samples.append(w.samples)
        sealed_windows.append(dev.sealer.seal(pb.Plaintext(sealed_at_ns=now, window=w).SerializeToString()))
    status = pb.Plaintext(sealed_at_ns=time.time_ns(), status=pb.DeviceStatus(
        state=pb.DeviceStatus.STATE_HEARTBEAT, agent_version=marker, uptime_s=7))
    for payload in [*sealed_windows, dev.sealer.seal(status.SerializeToString())]:
        _publish(dev, payload)
    _publish(dev, b"\x0a\x00not an envelope")  # malformed
    _publish(dev, sealed_windows[0])  # replay
    tampered = bytearray(dev.sealer.seal(status.SerializeToString()))
    tampered[-1] ^= 0x01  # bad_auth: the AEAD tag no longer matches
    _publish(dev, bytes(tampered))
    return samples, len(sealed_windows) + 1


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_debug_logs_hold_no_keys_and_no_plaintext(tmp_path: Path, fmt: str) -> None:
    port = free_port()
    prov = provision(tmp_path / "home", [AGENT_DEV, PUB_DEV], broker_port=port)
    broker = start_broker(prov.home, tmp_path / "broker", port=port)
    env = Env(prov, broker, tmp_path)
    marker = f"sgw-log-marker-{secrets.token_hex(12)}"
    gw: GatewayProc | None = None
    dev: Device | None = None
    try:
        gw = g = env.gateway("gw-1", "--log-level", "debug", "--log-format", fmt)
        cfg = agent_toml(prov, AGENT_DEV, tmp_path, source={
            "speed": 8.0, "faults": [{"at_s": 0.0, "duration_s": 1e6, "fault": "bearing"}]},
            filter={"summary_interval_s": 0.5})
        with running_agent(cfg, tmp_path / "agent.log", "--log-level", "debug", "--log-format", fmt,
                           "--max-publish-rate", "50") as agent:
            dev = Device(prov, PUB_DEV, port)
            samples, accepted_pub = _attack_and_talk(dev, marker)
            wait_for(lambda: all(metric(g.scrape(), "sgw_gateway_rejections_total", reason=r) >= 1
                                 for r in ("malformed", "replay", "bad_auth")), 20, "the three rejections",
                     agent=agent)
            wait_for(lambda: metric(g.scrape(), "sgw_gateway_messages_total", outcome="accepted")
                     >= accepted_pub + 10, 30, "agent traffic", agent=agent)
            time.sleep(1.0)
            assert agent.stop() == 0, agent.log()[-2000:]
        text = gw.scrape()
    finally:
        if dev is not None:
            dev.close()
        code = gw.stop() if gw is not None else 0
        broker.stop()
    assert code == 0, gw.log()[-2000:]
    assert metric(text, "sgw_gateway_windows_total", kind="vibration") >= 5

    logs = {"gateway": gw.log_path.read_bytes(), "agent": (tmp_path / "agent.log").read_bytes()}
    gw_text, agent_text = (logs[k].decode(errors="replace") for k in ("gateway", "agent"))
    # The logs are there and say what happened: a test that reads empty logs would pass vacuously.
    assert "gateway started" in gw_text and "connected" in gw_text, gw_text[-2000:]
    assert "message rejected" in gw_text, gw_text[-2000:]
    for reason in ("malformed", "replay", "bad_auth"):
        assert reason in gw_text, f"no {reason} rejection logged:\n{gw_text[-2000:]}"
    assert "agent starting" in agent_text and "agent stopped" in agent_text, agent_text[-2000:]
    debug_line = '"level":"debug"' if fmt == "json" else "\ndebug "
    for name, data in logs.items():  # --log-level debug took effect (asyncio logs its selector at debug)
        assert debug_line in "\n" + data.decode(errors="replace"), f"{name}: no debug-level line"
    if fmt == "json":
        for name, data in logs.items():
            ours = [ln for ln in data.decode().splitlines() if '"logger":"sgw.' in ln]
            assert ours, f"{name}: no JSON lines from sgw loggers"
            assert all(json.loads(ln)["level"] for ln in ours)
    else:
        assert '"logger":"sgw.' not in gw_text + agent_text

    needles = _secrets(prov)
    needles["plaintext marker"] = [marker.encode(), marker.encode().hex().encode(),
                                   base64.b64encode(marker.encode()[:PREFIX])]
    needles["window samples"] = [f for s in samples for f in _forms(s)]
    leaks = []
    for where, data in logs.items():
        lowered = data.lower()
        for what, forms in needles.items():
            for form in forms:
                hay = lowered if form == form.lower() and form.isalnum() else data
                if form in hay:
                    leaks.append(f"{where} log holds the {what} ({form[:16]!r}...)")
    assert not leaks, "\n".join(sorted(set(leaks)))
    print(f"\nlog secrecy ({fmt}): gateway {len(logs['gateway'])} B, agent {len(logs['agent'])} B of "
          f"debug logs, {sum(map(len, needles.values()))} needles, none found")
