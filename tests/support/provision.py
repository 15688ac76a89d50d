"""Provisioned sgw homes for tests, made through the real CLI functions (`sgw ca init`, `sgw device add`).

    env = provision(tmp_path / "home", ["dev-1", "dev-2"], broker_port=port)
    env.bundle("dev-1")          # HOME/devices/dev-1 (agent.toml, keys, certificates)
    env.identity("dev-1")        # TLSIdentity for mosquitto/paho; also "gateway" and "observer"
    env.gateway_toml             # HOME/gateway.toml, ready for `sgw gateway run`

Many devices go through one `sgw device add --from CSV` call (one registry transaction), which is the
fast path: a few hundred devices take about a second. Calling `provision` again on the same home adds
devices to it (the CA is created only once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.cli import run_cli
from tests.support.mosquitto import TLSIdentity

__all__ = ["Provisioned", "add_instance", "provision", "run_cli"]


@dataclass(frozen=True)
class Provisioned:
    home: Path
    device_ids: tuple[str, ...]
    broker_port: int
    broker_host: str = "127.0.0.1"
    output: str = field(default="", repr=False)

    def bundle(self, device_id: str) -> Path:
        return self.home / "devices" / device_id

    @property
    def gateway_toml(self) -> Path:
        return self.home / "gateway.toml"

    @property
    def ca_file(self) -> Path:
        return self.home / "ca" / "ca.crt"

    def identity(self, name: str) -> TLSIdentity:
        """TLS files for a device id, or for the service identities "gateway" (instance gw-1),
        "gateway:<id>" (an instance from `add_instance`), "observer" and "admin"."""
        if name.startswith("gateway:"):
            gid = name.split(":", 1)[1]
            folder = self.home / "gateway" / "instances" / gid
            return TLSIdentity(f"sgw-gateway-{gid}", self.ca_file, folder / "client.crt",
                               folder / "client.key")
        if name in ("gateway", "sgw-gateway"):
            folder = self.home / "gateway"
            return TLSIdentity("sgw-gateway-gw-1", self.ca_file, folder / "client.crt", folder / "client.key")
        if name in ("observer", "sgw-observer", "admin", "sgw-admin"):
            folder = self.home / name.removeprefix("sgw-")
            return TLSIdentity(f"sgw-{name.removeprefix('sgw-')}", self.ca_file, folder / "client.crt",
                               folder / "client.key")
        b = self.bundle(name)
        return TLSIdentity(name, b / "ca.crt", b / "device.crt", b / "device.key")

    def anonymous(self) -> TLSIdentity:
        """Trusts the broker but presents no client certificate."""
        return TLSIdentity("anonymous", self.ca_file, None, None)


def provision(
    home: Path, device_ids: Sequence[str], *, broker_port: int = 8883, broker_host: str = "127.0.0.1",
    kind: str = "vibration", sans: Sequence[str] = (), suite: str = "x25519",
) -> Provisioned:
    """Create (if needed) an sgw home at `home` and add `device_ids` to it. Raises on any CLI error."""
    home = Path(home)
    output: list[str] = []
    if not (home / "ca" / "ca.key").exists():
        argv = ["ca", "init", "--dir", str(home), "--broker-host", broker_host,
                "--broker-port", str(broker_port)]
        for san in sans:
            argv += ["--san", san]
        output.append(_check(argv))
    if len(device_ids) == 1:
        output.append(_check(["device", "add", device_ids[0], "--dir", str(home), "--kind", kind,
                              "--broker-host", broker_host, "--broker-port", str(broker_port),
                              "--suite", suite]))
    elif device_ids:
        csv_path = home / f".provision-{len(device_ids)}.csv"
        csv_path.write_text("id\n" + "".join(f"{d}\n" for d in device_ids))
        try:
            output.append(_check(["device", "add", "--from", str(csv_path), "--dir", str(home),
                                  "--kind", kind, "--broker-host", broker_host,
                                  "--broker-port", str(broker_port), "--suite", suite]))
        finally:
            csv_path.unlink()
    return Provisioned(home, tuple(device_ids), broker_port, broker_host, "".join(output))


def _check(argv: list[str]) -> str:
    rc, out, err = run_cli(argv)
    if rc != 0:
        raise RuntimeError(f"sgw {' '.join(argv)} failed ({rc}): {err.strip()}")
    return out + err


def add_instance(prov: Provisioned, gateway_id: str) -> Path:
    """`sgw gateway add-instance` on the home; returns the gateway-<id>.toml it wrote."""
    _check(["gateway", "add-instance", gateway_id, "--dir", str(prov.home)])
    return prov.home / f"gateway-{gateway_id}.toml"
