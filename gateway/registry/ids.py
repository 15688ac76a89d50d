"""Device id rules (docs/ARCHITECTURE.md): 1-64 chars of [A-Za-z0-9._-], not starting with `sgw-`.

The id becomes an MQTT topic level, the certificate CN and mosquitto's username, so anything that is a
wildcard (`+`, `#`), a level separator (`/`) or a control character would let one device reach another's
topics or confuse logs.
"""

from __future__ import annotations

import re

from gateway.errors import ProvisioningError

MAX_ID_LEN = 64
RESERVED_PREFIX = "sgw-"
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def validate_device_id(device_id: str) -> str:
    if not device_id:
        raise ProvisioningError("invalid device id: empty")
    if len(device_id) > MAX_ID_LEN:
        raise ProvisioningError(f"invalid device id: longer than {MAX_ID_LEN} characters")
    if not _ID.fullmatch(device_id):
        bad = next(c for c in device_id if not re.fullmatch(r"[A-Za-z0-9._-]", c))
        raise ProvisioningError(
            f"invalid device id {device_id!r}: character {bad!r} not allowed (use A-Z a-z 0-9 . _ -)"
        )
    if device_id.lower().startswith(RESERVED_PREFIX):
        raise ProvisioningError(f"invalid device id {device_id!r}: the 'sgw-' prefix is reserved")
    if device_id in {".", ".."}:
        raise ProvisioningError(f"invalid device id {device_id!r}: not usable as a directory name")
    return device_id
