"""sgw: a secure sensor-to-model telemetry gateway."""

__version__ = "0.1.0"
