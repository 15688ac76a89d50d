"""The two configuration files provisioning writes, in the schema of docs/ARCHITECTURE.md."""

from __future__ import annotations

import json
from typing import Any

from gateway.common import tomledit


def _e2e(text: str, key: str) -> Any:
    return tomledit.get(text, "e2e", key)


def with_mlkem_key(text: str, path: str = "gateway/e2e_mlkem.key") -> str | None:
    """gateway.toml's text with `[e2e] mlkem_private_key_file` added; the text unchanged if it already
    names one; None when it is not TOML with an [e2e] private_key_file."""
    if _e2e(text, "mlkem_private_key_file") is not None:
        return text
    if _e2e(text, "private_key_file") is None:
        return None
    return tomledit.set_keys(text, {"e2e": {"mlkem_private_key_file": path}})


def with_suite(text: str, suite: str, kem_file: str) -> str | None:
    """agent.toml's text sealing with `suite` (and naming the gateway's ML-KEM key file); None when it is
    not TOML with an [e2e] gateway_key_id."""
    if _e2e(text, "gateway_key_id") is None:
        return None
    return tomledit.set_keys(text, {"e2e": {"suite": suite, "gateway_mlkem_public_key_file": kem_file}})


def _q(value: str) -> str:
    # JSON string escaping is valid TOML basic-string escaping for everything we put here.
    return json.dumps(value)


def with_gateway_key_id(text: str, key_id: int) -> str | None:
    """agent.toml's text with a new `[e2e] gateway_key_id` (a bundle made after a gateway key rotation);
    None when it is not TOML with one."""
    if not isinstance(_e2e(text, "gateway_key_id"), int):
        return None
    return tomledit.set_keys(text, {"e2e": {"gateway_key_id": key_id}})


def with_device_key_id(text: str, key_id: int) -> str | None:
    """agent.toml's text with a new `[e2e] device_key_id` (what a key rotation changes; the operator's
    edits stay); None when it is not TOML with one."""
    if not isinstance(_e2e(text, "device_key_id"), int):
        return None
    return tomledit.set_keys(text, {"e2e": {"device_key_id": key_id}})


def agent_identity_toml(*, device_id: str, kind: str, host: str, port: int, device_key_id: int,
                        gateway_key_id: int, suite: str = "x25519", gateway_kem_file: str = "") -> str:
    """agent.toml's identity sections; enrollment (gateway/agent/enroll.py) prepends them to the
    operator's enrollment config, `sgw device add` writes them at the top of a bundle's agent.toml."""
    return f"""[device]
id = {_q(device_id)}
kind = {_q(kind)}

[mqtt]
host = {_q(host)}
port = {port}
ca_file = "ca.crt"
cert_file = "device.crt"
key_file = "device.key"
keepalive_s = 30

[e2e]
device_key_file = "e2e.key"
device_key_id = {device_key_id}
gateway_public_key_file = "gateway_e2e.pub"
gateway_key_id = {gateway_key_id}
suite = {_q(suite)}{" " * max(1, 17 - len(suite))}# x25519 | x25519-mlkem768 (post-quantum hybrid)
gateway_mlkem_public_key_file = {_q(gateway_kem_file)}
"""


def agent_toml(*, device_id: str, kind: str, host: str, port: int, device_key_id: int,
               gateway_key_id: int, seed: int = 1, release_key: bool = False,
               release_pq_key: bool = False, suite: str = "x25519", gateway_kem_file: str = "") -> str:
    release_file = _q("release.pub" if release_key else "")
    release_pq_file = _q("release-mldsa65.pub" if release_pq_key else "")
    identity = agent_identity_toml(device_id=device_id, kind=kind, host=host, port=port,
                                   device_key_id=device_key_id, gateway_key_id=gateway_key_id, suite=suite,
                                   gateway_kem_file=gateway_kem_file)
    return f"""# Written by `sgw device add`. Paths are relative to this file's folder.
{identity}
[source]
type = "simulated"          # simulated | replay | iio | pipe (docs/OPERATIONS.md, "Adding a sensor")
seed = {seed}
sample_rate_hz = 1600.0
window = 128
faults = []                 # [{{ at_s = 30.0, duration_s = 5.0, fault = "bearing" }}]
path = ""                   # replay: .csv or .npy; pipe: a FIFO or file, "" = stdin
speed = 1.0                 # replay speed factor
device = ""                 # iio: the device's name ("adxl355") or number ("0", "iio:device0")
channels = ["accel_x", "accel_y", "accel_z"]  # iio: scan elements, one per axis
buffer_length = 0           # iio: kernel buffer in scans, 0 = 8 windows
trigger = ""                # iio: "" = the driver's own; else written to trigger/current_trigger
format = "frames"           # pipe: frames (binary) | csv (t,x,y,z)

[filter]
summary_interval_s = 10.0
manifest = ""               # "" = the packaged edge_models/manifest.json

[model]                     # signed model releases (docs/OPERATIONS.md, "Releasing a model")
release_public_key_file = {release_file}  # "" = no trusted release key: every release is refused
release_pq_public_key_file = {release_pq_file}  # set: an ML-DSA-65 signature is required too
store = ""                  # installed releases; "" = beside the outbox: <outbox.path>.models
probation_windows = 64      # a switch is confirmed after this many windows and a passed self-test
selftest_windows = 64       # the new release scores the last windows the old one kept ...
selftest_max_forward = 0.25 # ... and may forward at most this share of them, or it is rolled back
max_unconfirmed_starts = 3  # starts on an unconfirmed release before it counts as a crash loop

[outbox]
path = "outbox.db"
max_bytes = 67108864
max_age_s = 604800
policy = "drop_oldest"      # drop_oldest | refuse_newest
delete_on = "receipt"       # receipt (the gateway confirmed it) | puback (gateways without receipts)
receipt_timeout_s = 30.0    # no receipt this long after sending: sent again

[commission]                # learn this machine's own normal first (docs/OPERATIONS.md)
enabled = false             # true: forward no anomaly until the baseline is learned
windows = 300               # windows collected before the fit (60..)
target_false_forward = 0.01 # healthy windows forwarded after commissioning (0.001..0.2)
path = ""                   # "" = beside the outbox: <outbox.path>.baseline

[metrics]
port = 0                    # 0 = off
host = "127.0.0.1"

[log]
level = "info"
format = "text"             # text | json
"""


def gateway_toml(*, host: str, port: int, gateway_id: str = "gw-1", key_id: int = 1,
                 identity_dir: str = "gateway", written_by: str = "sgw ca init", store_url: str = "") -> str:
    return f"""# Written by `{written_by}`. Paths are relative to this file's folder (the sgw home).
[gateway]
id = {_q(gateway_id)}
workers = 1                 # processes under this one service, or "auto" (one per CPU); add-workers
takeover_after_s = 60       # publish results another instance left unconfirmed once it is silent this long

[mqtt]
host = {_q(host)}
port = {port}
ca_file = "ca/ca.crt"
cert_file = "{identity_dir}/client.crt"   # CN sgw-gateway-<gateway.id>: one identity per instance
key_file = "{identity_dir}/client.key"
share_group = "sgw"
keepalive_s = 30
session_expiry_s = 3600
receive_maximum = 1024

[e2e]
private_key_file = "gateway/e2e.key"
key_id = {key_id}
mlkem_private_key_file = "gateway/e2e_mlkem.key"   # suite x25519-mlkem768 (docs/PROTOCOL.md)
suites = ["x25519", "x25519-mlkem768"]              # the uplink suites this fleet accepts

[registry]
path = "registry.db"          # the SQLite store, when store.url is ""
poll_interval_s = 0.25

[store]
url = {_q(store_url)}
# store.url: "" = SQLite at registry.path; postgresql://user@host:5432/sgw shares the state across hosts
# (then 'sgw store migrate'; docs/OPERATIONS.md, "When to move to PostgreSQL").

[pipeline]
max_message_bytes = 65536
max_clock_skew_s = 30.0
device_rate = 200.0          # messages/s per device, token bucket
device_burst = 400
queue_max = 8192

[inference]
accelerator = "auto"         # auto | npu | gpu | cpu | delegate:/path/lib.so
delegates = []
manifest = ""
num_threads = 1
release_public_key_file = ""  # trusted model-release key, e.g. "release.pub" ('sgw model keygen --trust')
release_pq_public_key_file = ""  # e.g. "release-mldsa65.pub": releases need an ML-DSA-65 signature too
releases = []                # signed release files to run instead of the manifest's models of that name

[inference.routes]           # sensor kind -> model name in the manifest
vibration = "classifier"

[batching]
max_batch = 64
max_wait_ms = 5.0

[results]
json = false
deadletter = false
receipts = true              # end-to-end receipts to the agents (docs/PROTOCOL.md, "Receipts")

[sparkplug]                  # Sparkplug B edge node for SCADA (docs/OPERATIONS.md, "SCADA")
enabled = false              # true after 'sgw gateway add-sparkplug' issued the identity below
group_id = "sgw"
edge_node_id = ""            # "" = gateway.id
silence_s = 60.0             # DDEATH after a device sent nothing for this long
cert_file = "sparkplug/{gateway_id}/client.crt"   # CN sgw-sparkplug-<gateway.id>: the edge node's own
key_file = "sparkplug/{gateway_id}/client.key"

[metrics]
host = "127.0.0.1"
port = 9108

[log]
level = "info"
format = "text"
"""
