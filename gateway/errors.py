"""One exception root for sgw, split by whose fault it is.

RemoteError: the other side (a device, a peer) sent something we refuse. The process keeps serving.
LocalError: our own configuration, files or models are wrong. The operator must act.
"""

from __future__ import annotations


class SgwError(Exception):
    """Root of every error sgw raises on purpose."""


class RemoteError(SgwError):
    """A remote party sent bad data. Carries a reason from the closed rejection set."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


class LocalError(SgwError):
    """A fault on our side: configuration, files, models, provisioning state."""


class ConfigError(LocalError):
    """A configuration file or option is invalid. The message names the key."""


class ModelError(LocalError):
    """A model is missing, tampered with, or cannot run on the requested backend."""


class ProvisioningError(LocalError):
    """A CA, registry or bundle operation cannot be done as asked."""


class SourceError(LocalError):
    """A sensor source cannot be opened or read as configured (device missing, permissions, rate)."""
