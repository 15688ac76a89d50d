"""Identity rules (docs/ARCHITECTURE.md): device ids, gateway instance ids and the CNs sgw issues.

Device ids: 1-64 chars of [A-Za-z0-9._-], not starting with `sgw-` (the prefix of sgw's own CNs).

The id becomes an MQTT topic level, the certificate CN and mosquitto's username, so anything that is a
wildcard (`+`, `#`), a level separator (`/`) or a control character would let one device reach another's
topics or confuse logs.
"""

from __future__ import annotations

import re
from pathlib import Path

from gateway.core.envelope import ID_CHARS, MAX_DEVICE_ID_LEN, id_pattern, valid_device_id
from gateway.errors import ProvisioningError

MAX_ID_LEN = MAX_DEVICE_ID_LEN
RESERVED_PREFIX = "sgw-"
_ID_CHAR = re.compile(f"[{ID_CHARS}]")


def validate_device_id(device_id: str) -> str:
    if not device_id:
        raise ProvisioningError("invalid device id: empty")
    if len(device_id) > MAX_ID_LEN:
        raise ProvisioningError(f"invalid device id: longer than {MAX_ID_LEN} characters")
    if not valid_device_id(device_id):
        bad = next(c for c in device_id if not _ID_CHAR.fullmatch(c))
        raise ProvisioningError(
            f"invalid device id {device_id!r}: character {bad!r} not allowed (use A-Z a-z 0-9 . _ -)"
        )
    if device_id.lower().startswith(RESERVED_PREFIX):
        raise ProvisioningError(f"invalid device id {device_id!r}: the 'sgw-' prefix is reserved")
    if device_id in {".", ".."}:
        raise ProvisioningError(f"invalid device id {device_id!r}: not usable as a directory name")
    return device_id


def is_device_id(value: str) -> bool:
    """What `validate_device_id` accepts, as a yes/no (config files, enrollment answers)."""
    try:
        validate_device_id(value)
    except ProvisioningError:
        return False
    return True


# sgw's own identities. The broker turns each CN into the MQTT username and client id
# (use_username_as_clientid), so every gateway instance needs a CN of its own or instances would
# displace each other's sessions.
GATEWAY_CN_PREFIX = "sgw-gateway-"
LEGACY_GATEWAY_CN = "sgw-gateway"  # one CN shared by every instance (homes made before issue 14)
OBSERVER_CN = "sgw-observer"
SPARKPLUG_CN_PREFIX = "sgw-sparkplug-"  # a gateway instance's Sparkplug B edge node (its own connection)
SCADA_CN = "sgw-scada"  # the SCADA / host application: reads spBv1.0/#, sends node commands
ADMIN_CN = "sgw-admin"  # broker administration: dynamic-security commands only (pki/broker_control.py)
ENROLL_CN = "sgw-enroll"  # the enrollment service: reads enrollment requests, answers them (sgw enroll serve)
DEFAULT_GATEWAY_ID = "gw-1"
MAX_GATEWAY_ID_LEN = 48
_GATEWAY_ID = id_pattern(MAX_GATEWAY_ID_LEN)


# Worker processes of one instance (`[gateway] workers`): worker 1 is the instance itself; worker k >= 2
# is the identity `<id>.w<k>` (its own CN, MQTT session, pending-results rows and downlink sender), so an
# instance id may not end like a worker id.
MAX_WORKERS = 64
_WORKER_SUFFIX = re.compile(r"\.w[0-9]+")


def is_gateway_id(gateway_id: str) -> bool:
    return (bool(_GATEWAY_ID.fullmatch(gateway_id)) and gateway_id not in {".", ".."}
            and not _WORKER_SUFFIX.fullmatch(gateway_id[gateway_id.rfind("."):]))


def worker_id(gateway_id: str, worker: int) -> str:
    """The identity of worker `worker` (1-based) of instance `gateway_id`."""
    if not 1 <= worker <= MAX_WORKERS:
        raise ValueError(f"worker {worker} not in 1..{MAX_WORKERS}")
    return gateway_id if worker == 1 else f"{gateway_id}.w{worker}"


def worker_file(path: Path, worker: int) -> Path:
    """Worker k's certificate or key next to the instance's own: client.crt -> client-w2.crt. One flat
    folder, so the files can travel as systemd credentials (LoadCredential= copies single files)."""
    return path if worker == 1 else path.with_name(f"{path.stem}-w{worker}{path.suffix}")


def validate_gateway_id(gateway_id: str) -> str:
    if not is_gateway_id(gateway_id):
        raise ProvisioningError(
            f"invalid gateway id {gateway_id!r}: 1-{MAX_GATEWAY_ID_LEN} characters of A-Z a-z 0-9 . _ -, "
            "not ending in .w<digits> (the ids of an instance's workers)"
        )
    return gateway_id


def gateway_cn(gateway_id: str) -> str:
    """The certificate CN (= MQTT username = client id) of one gateway instance."""
    return GATEWAY_CN_PREFIX + gateway_id


def sparkplug_cn(gateway_id: str) -> str:
    """The CN of one gateway instance's Sparkplug B edge node connection."""
    return SPARKPLUG_CN_PREFIX + gateway_id


_SPARKPLUG_ID = id_pattern(64)


def is_sparkplug_id(value: str) -> bool:
    """A Sparkplug group or edge node id: a topic level, so no '+', '#' or '/' (the spec's rule), and
    sgw's id alphabet so that ACL lines and logs stay plain."""
    return bool(_SPARKPLUG_ID.fullmatch(value))


def enrolled_device_id(prefix: str, serial: str) -> str:
    """The device id an enrolled IDevID gets: the allow-list entry's prefix and the serial number from
    its subject. ProvisioningError when that is not a valid device id (the serial is refused)."""
    return validate_device_id(prefix + serial)
