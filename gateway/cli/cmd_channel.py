"""The CLI's side of the sealed downlink: pick target devices, seal commands to them, read their replies.

Shared by `sgw device cmd` and `sgw model deploy`. Commands are sealed end to end to each device's
registered key with the home's gateway key, as the downlink sender `sgw-cli` (its own replay window on
each device, epochs persisted in the registry), and published on the device's cmd topic as the
`sgw-admin` identity. Replies come sealed through the device's outbox on its up topic; the channel reads
those topics meanwhile and opens them with the gateway key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from gateway.errors import ProvisioningError
from gateway.pb import downlink_pb2 as dpb
from gateway.pb import messages_pb2 as pb
from gateway.pki.home import Home

SENDER = "sgw-cli"


@dataclass(frozen=True)
class Target:
    device_id: str
    kind: str
    key_id: int
    public: bytes


@dataclass(frozen=True)
class Reply:
    device_id: str
    reply: dpb.CommandReply
    status: pb.DeviceStatus | None
    suite: int = 0  # the uplink suite the reply came sealed in


def select_targets(home: Home, *, ids: Sequence[str] = (), kind: str | None = None,
                   every: bool = False) -> dict[str, Target]:
    """Active devices by id (each must exist and be active), by sensor kind, or all of them."""
    from gateway.registry.ids import validate_device_id  # noqa: PLC0415

    targets: dict[str, Target] = {}
    with home.open_registry() as registry:
        if ids:
            records = []
            for device_id in ids:
                validate_device_id(device_id)
                rec = registry.get(device_id)
                if rec is None:
                    raise ProvisioningError(f"device {device_id} is not registered")
                if rec.status != "active":
                    raise ProvisioningError(f"device {rec.device_id} is {rec.status}: it takes no commands")
                records.append(rec)
        else:
            records = [r for r in registry.list() if r.status == "active" and (every or r.kind == kind)]
        for rec in records:
            current = [k for k in rec.keys if k.not_after_ns is None] or list(rec.keys)
            newest = max(current, key=lambda k: k.key_id)
            targets[rec.device_id] = Target(rec.device_id, rec.kind, newest.key_id, newest.public)
    if not targets:
        raise ProvisioningError("no active device matches")
    return targets


class CommandChannel:
    """One MQTT connection as sgw-admin: `send` seals and publishes, `replies` returns what came back."""

    def __init__(self, home: Home, targets: dict[str, Target]) -> None:
        from gateway.core.downlink import DownlinkSealer  # noqa: PLC0415
        from gateway.core.session import DeviceKeys, Opener  # noqa: PLC0415
        from gateway.server.store import ResultStore  # noqa: PLC0415

        self.home = home
        self.targets = targets
        from gateway.pki.gateway_keys import load_keys  # noqa: PLC0415

        self.host, self.port, _ = home.broker_defaults()
        loaded = load_keys(home)
        self.gateway_keys = loaded
        # While a gateway key is being rotated out, commands are sealed with it: every device trusts it,
        # whether or not it has been told of the new key yet (docs/PROTOCOL.md, "Gateway key rotation").
        gateway_key_id = loaded.downlink_key(time.time_ns() // 1_000_000)
        gateway_key = loaded.x25519[gateway_key_id]
        with home.open_registry() as registry:
            lookup = registry.snapshot()
        store = ResultStore(home.store_location(), SENDER)
        try:
            epoch = store.next_downlink_epoch(time.time_ns() // 1_000_000)
        finally:
            store.close()
        self._sealer = DownlinkSealer(sender=SENDER, gateway_key=gateway_key, gateway_key_id=gateway_key_id,
                                      epoch=epoch)

        def find(device_id: str) -> DeviceKeys | None:  # the Opener's KeyLookup over a registry snapshot
            return lookup.get(device_id)

        # Replies come up sealed in each device's own suite (suite 3 needs the ML-KEM keys too) and to
        # whichever gateway key the device seals with: the current one or one still in its grace.
        self._opener = Opener(gateway_keys=loaded.x25519, lookup=find, gateway_kem_keys=loaded.mlkem,
                              gateway_key_not_after_ns=loaded.accept_until_ns)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._arrived = threading.Condition(self._lock)
        self._inbox: list[tuple[str, bytes]] = []
        self._client: Any = None

    def __enter__(self) -> CommandChannel:
        from gateway.common.mqtt import TlsFiles, connect_properties, make_client  # noqa: PLC0415
        from gateway.core.topics import topic_for  # noqa: PLC0415
        from gateway.registry.ids import ADMIN_CN  # noqa: PLC0415

        targets = self.targets

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if rc.is_failure:
                self._subscribed.set()
                return
            filt = topic_for("+") if len(targets) > 1 else topic_for(next(iter(targets)))
            c.subscribe(filt, qos=1)

        def on_subscribe(*_a: Any) -> None:
            self._subscribed.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self._arrived:
                self._inbox.append((msg.topic, bytes(msg.payload)))
                self._arrived.notify_all()

        home = self.home
        files = TlsFiles(home.ca_cert, home.admin_dir / "client.crt", home.admin_dir / "client.key")
        if not files.cert_file.exists():
            raise ProvisioningError(f"no admin identity in {home.admin_dir}; run 'sgw ca migrate'")
        client = make_client(f"{ADMIN_CN}-cmd", files)
        client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
        client.connect_timeout = 5.0
        try:
            client.connect(self.host, self.port, keepalive=30, clean_start=True,
                           properties=connect_properties())
        except OSError as exc:
            raise ProvisioningError(f"cannot reach the broker at {self.host}:{self.port}: {exc}") from None
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(10):
            self.close()
            raise ProvisioningError(f"the broker at {self.host}:{self.port} did not answer within 10 s")
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def send(self, device_id: str, command: dpb.Command) -> bool:
        from gateway.core.topics import cmd_topic_for  # noqa: PLC0415

        t = self.targets[device_id]
        payload = self._sealer.seal(dpb.Downlink(command=command), device_id=t.device_id,
                                    device_public=t.public, device_key_id=t.key_id)
        return bool(self._client.publish(cmd_topic_for(t.device_id), payload, qos=1).rc == 0)

    def replies(self, timeout_s: float, wanted: Iterable[str] = ()) -> list[Reply]:
        """Replies that arrived, waiting up to timeout_s for the first. `wanted`: command ids to keep
        (others, e.g. answers to earlier commands, are dropped); empty = all."""
        from gateway.core.downlink import parse_reply  # noqa: PLC0415
        from gateway.core.session import Opened  # noqa: PLC0415
        from gateway.core.topics import device_of  # noqa: PLC0415

        keep = set(wanted)
        with self._arrived:
            if not self._inbox:
                self._arrived.wait(max(0.0, timeout_s))
            batch, self._inbox[:] = list(self._inbox), []
        out = []
        for topic, raw in batch:
            dev = device_of(topic)
            if dev is None or dev not in self.targets:
                continue
            opened = self._opener.open(raw, time.time_ns(), dev)
            if type(opened) is not Opened:
                continue
            plain = pb.Plaintext.FromString(opened.plaintext)
            if plain.WhichOneof("body") != "command_reply":
                continue
            reply = parse_reply(plain.command_reply)
            if keep and reply.command_id not in keep:
                continue
            status = pb.DeviceStatus.FromString(reply.status) if reply.status else None
            out.append(Reply(dev, reply, status, opened.header.suite))
        return out


def send_and_wait(channel: CommandChannel, commands: dict[str, dpb.Command], wait_s: float
                  ) -> tuple[set[str], dict[str, Reply]]:
    """Send one command per device; wait up to wait_s for their replies. (devices sent to, replies)."""
    sent = {d for d, c in commands.items() if channel.send(d, c)}
    ids = {c.id: d for d, c in commands.items()}
    replies: dict[str, Reply] = {}
    deadline = time.monotonic() + wait_s
    while len(replies) < len(sent) and time.monotonic() < deadline:
        for r in channel.replies(min(0.2, max(0.0, deadline - time.monotonic())), ids):
            if ids.get(r.reply.command_id) == r.device_id:
                replies[r.device_id] = r
    return sent, replies
