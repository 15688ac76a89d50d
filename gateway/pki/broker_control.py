"""Making a revocation reach a running mosquitto: reload its CRL, then disconnect the device.

mosquitto checks the CRL only during the TLS handshake, so a revoked device stays connected (also across
SIGHUP, shared/notes/broker-behaviour.md). Two steps close that, in this order:

1. SIGHUP every broker made by `sgw broker config` whose pid file names a live mosquitto, so the new CRL
   refuses any new connection of the device;
2. ask the dynamic-security plugin, as the `sgw-admin` identity, to disable the device's username, which
   closes its open connection at once (`mosquitto_kick_client_by_username`). The plugin only knows the
   clients it is told about, so the device is created there, disabled (the kick) and deleted again; for
   every other client the plugin defers to the ACL file.

The other ways considered (docs/SECURITY.md, "Revocation"): restarting the broker drops every client;
a connection opened with the device's own certificate would displace it (same client id) but needs the
device key, which the home need not keep; a custom mosquitto plugin is C we would have to ship.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.common.mqtt import TlsFiles, connect_properties, make_client
from gateway.core.topics import UP_FILTER
from gateway.errors import ConfigError
from gateway.pki.home import Home, crl_targets
from gateway.registry.ids import ADMIN_CN

DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE = f"{DYNSEC_TOPIC}/response"
RUN_DIR = "run"  # owned by the broker user, world-readable: mosquitto writes its pid after dropping root
PID_FILE = f"{RUN_DIR}/mosquitto.pid"
DYNSEC_FILE = "dynamic-security.json"  # in the broker folder's data/ (the plugin rewrites it)
KICK_TIMEOUT_S = 3.0


def dynsec_config() -> str:
    """The plugin's initial file: the admin identity may use the control topic; nobody else is known."""
    acls = [{"acltype": t, "topic": f"{DYNSEC_TOPIC}/#", "priority": 0, "allow": True}
            for t in ("publishClientSend", "publishClientReceive", "subscribePattern")]
    # `sgw device cmd` (the same grants as in acl_file: the plugin decides for the clients it knows).
    acls += [{"acltype": "publishClientSend", "topic": "sgw/v1/dev/+/cmd", "priority": 0, "allow": True},
             {"acltype": "subscribePattern", "topic": UP_FILTER, "priority": 0, "allow": True},
             {"acltype": "publishClientReceive", "topic": UP_FILTER, "priority": 0, "allow": True}]
    return json.dumps({
        # Applies only to clients the plugin knows (the admin, and a revoked device for a moment).
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": [{"username": ADMIN_CN, "roles": [{"rolename": "sgw-admin"}]}],
        "groups": [],
        "roles": [{"rolename": "sgw-admin", "acls": acls}],
    }, indent=2) + "\n"


@dataclass
class Enforcement:
    """What a revocation did at the broker; `warnings` say what the operator must still do."""

    reloaded: list[int] = field(default_factory=list)  # broker pids sent SIGHUP
    disconnected: bool = False
    warnings: list[str] = field(default_factory=list)


def enforce_revocation(home: Home, device_id: str, *, timeout_s: float = KICK_TIMEOUT_S) -> Enforcement:
    out = Enforcement()
    for target in crl_targets(home):
        pid, warning = reload_broker(target)
        if pid is not None:
            out.reloaded.append(pid)
        if warning:
            out.warnings.append(warning)
    try:
        kick(home, device_id, timeout_s=timeout_s)
        out.disconnected = True
    except BrokerControlError as exc:
        out.warnings.append(
            f"could not disconnect {device_id} at the broker ({exc}); an open connection stays open until "
            "it drops. Reload the broker (SIGHUP) and restart it if the device must go at once"
        )
    return out


def reload_broker(folder: Path) -> tuple[int | None, str | None]:
    """SIGHUP the mosquitto running from `folder` (its pid file); (pid, None), or (None, a warning)."""
    pid_path = folder / PID_FILE
    try:
        pid = int(pid_path.read_text().strip())
    except FileNotFoundError:
        return None, None  # that broker is not running (or was never started from this folder)
    except (OSError, ValueError):
        return None, f"could not read {pid_path}; reload that broker (SIGHUP) so its CRL is re-read"
    if not _is_mosquitto(pid):
        return None, None  # a stale pid file: the broker stopped and the pid may belong to anyone
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return None, None
    except PermissionError:
        return None, (f"not allowed to signal mosquitto (pid {pid}); run 'systemctl reload mosquitto' "
                      f"or 'kill -HUP {pid}' so it re-reads the CRL")
    return pid, None


def _is_mosquitto(pid: int) -> bool:
    """The pid runs mosquitto: a recycled pid of another program must not get our SIGHUP (another
    mosquitto would only re-read its own files)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return Path(argv0.decode(errors="replace")).name == "mosquitto"


class BrokerControlError(Exception):
    """The broker's dynamic-security plugin could not be reached or refused a command."""


def kick(home: Home, username: str, *, timeout_s: float = KICK_TIMEOUT_S) -> None:
    """Disconnect every connection of `username` through the dynamic-security plugin, within timeout_s."""
    host, port, _key_id = home.broker_defaults()
    files = TlsFiles(home.ca_cert, home.admin_dir / "client.crt", home.admin_dir / "client.key")
    if not files.cert_file.exists():
        raise BrokerControlError(f"no admin identity in {home.admin_dir}; run 'sgw ca migrate'")
    commands = [{"command": "createClient", "username": username},
                {"command": "disableClient", "username": username},
                {"command": "deleteClient", "username": username}]
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            result["error"] = f"connack: {rc}"
            done.set()
            return
        c.subscribe(DYNSEC_RESPONSE, qos=1)

    def on_subscribe(c: Any, _u: Any, _m: int, codes: Any, _p: Any) -> None:
        if any(code.is_failure for code in codes):
            result["error"] = "the broker refused the control topic (no dynamic-security plugin?)"
            done.set()
            return
        c.publish(DYNSEC_TOPIC, json.dumps({"commands": commands}), qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            result["responses"] = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            result["error"] = "unreadable response from the dynamic-security plugin"
        done.set()

    try:
        client = make_client(f"{ADMIN_CN}-{os.getpid()}", files)
    except ConfigError as exc:
        raise BrokerControlError(str(exc)) from None
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect_timeout = timeout_s
    try:
        client.connect(host, port, keepalive=30, clean_start=True, properties=connect_properties())
    except OSError as exc:
        raise BrokerControlError(f"{host}:{port}: {exc}") from None
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise BrokerControlError(f"no answer from the dynamic-security plugin at {host}:{port} "
                                     f"within {timeout_s:g} s")
    finally:
        with contextlib.suppress(OSError, ValueError):
            client.disconnect()
        client.loop_stop()
    if "error" in result:
        raise BrokerControlError(result["error"])
    # createClient fails harmlessly if an earlier kick was interrupted; the disable is what matters.
    errors = [r.get("error") for r in result["responses"]
              if isinstance(r, dict) and r.get("command") == "disableClient" and r.get("error")]
    if errors:
        raise BrokerControlError(f"disableClient: {errors[0]}")
