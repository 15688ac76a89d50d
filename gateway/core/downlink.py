"""Sealed downlink, gateway -> device on sgw/v1/dev/{id}/cmd: DownlinkSealer and DownlinkOpener.

The uplink's one-way K construction (docs/PROTOCOL.md) turned around: the gateway is the sender with a
static key `g` and one ephemeral `e` per session (epoch), the device the recipient with its registered
static key `S`. Its own suite number (2) and HKDF label keep the two directions apart, so the broker
cannot reflect one into the other. A sender's counter is shared by all its recipients, so a (key, nonce)
pair can never repeat even when the sealer re-derives an evicted device key. The envelope framing,
nonce, HKDF and replay bitmap are the uplink's own code. Construction byte by byte: docs/PROTOCOL.md
("Downlink"); tests/vectors/downlink_v1.json pins it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from google.protobuf.message import DecodeError

from gateway.core import envelope as ev
from gateway.core import keys, ranges, suites
from gateway.core.reasons import DownlinkReason
from gateway.core.release import MAX_RELEASE_BYTES
from gateway.core.replay import MAX_WIDTH, ReplayWindow
from gateway.core.topics import cmd_topic_for
from gateway.errors import ConfigError, LocalError, RemoteError
from gateway.pb import downlink_pb2 as pb

DOWNLINK_SUITE = 2  # X25519 K one-way (gateway -> device) + HKDF-SHA256 + ChaCha20-Poly1305
DOWNLINK_LABEL = b"sgw/v1 downlink key"
DEFAULT_MAX_MESSAGE_BYTES = 16384  # a receipt at its range bounds is about 16 KB; a command far less
DEFAULT_WINDOW_BITS = 4096  # in the sender's counter space, which all its devices share: room for gaps
DEFAULT_MAX_SENDERS = 8
MAX_SENDERS = 255  # the state format counts senders in one byte
MAX_TRUSTED_KEYS = 64

MAX_COMMAND_ID = 64
MAX_CONFIG_ENTRIES = 32
MAX_CONFIG_KEY = 64
MAX_CONFIG_VALUE = 256
MAX_REJECTIONS = ranges.MAX_RANGES
MAX_DER_BYTES = 2048  # rotate_key's certificate request / certificate (P-256: under 600 bytes)
MAX_REPLY_ERROR = 256
MAX_REPLY_STATUS_BYTES = 1024
MAX_REPLY_BYTES = 16384
# A model chunk's data: with the command's framing it stays under DEFAULT_MAX_MESSAGE_BYTES (the sealer's
# bound, far below the broker's 128 KiB packet limit), so a release needs no other transport.
MAX_CHUNK_BYTES = 12288
MIN_CHUNK_BYTES = 1024
MAX_RELEASE_CHUNKS = 4096  # 4 MiB at the smallest chunk size; MAX_RELEASE_BYTES (32 MiB) caps the rest

_TAG_SENDER = 0x4A  # DownlinkHeader field 9, length-delimited
_STATE_MAGIC = b"sgwd"
_STATE_VERSION = 1
_WINDOW_LEN = struct.Struct(">I")
_MAX_WINDOW_BYTES = 28 + MAX_WIDTH // 8  # ReplayWindow.to_bytes at the widest
_MAX_STATE_BYTES = 4 + 1 + 1 + 64 + 1 + MAX_SENDERS * (1 + 64 + _WINDOW_LEN.size + _MAX_WINDOW_BYTES)
_MS = 1_000_000  # ns per ms

_parse_header = pb.DownlinkHeader.FromString
_parse_downlink = pb.Downlink.FromString


class DownlinkRefusedError(RemoteError):
    """The one error a refused downlink raises. Its text is fixed per reason: it never carries ids, keys,
    header fields or plaintext, so it is safe to log as is."""

    def __init__(self, reason: DownlinkReason) -> None:
        super().__init__(reason.value, f"downlink refused: {reason.value}")
        self.reason: DownlinkReason = reason


def _refuse(reason: DownlinkReason) -> DownlinkRefusedError:
    return DownlinkRefusedError(reason)


def _check_uint(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ConfigError(f"{name} must be in 0..{limit}")


def header_bytes(
    *,
    device_id: str,
    sender: str,
    epoch: int,
    counter: int,
    ephemeral: bytes,
    device_key_id: int,
    gateway_key_id: int,
) -> bytes:
    """The canonical DownlinkHeader: the uplink header's fields 1-8 (suite 2), then the sender (field 9).
    Equal to DownlinkHeader.SerializeToString() (tested); the opener refuses any other encoding."""
    head, tail = ev.encode_header_parts(
        device_id=device_id,
        epoch=epoch,
        ephemeral=ephemeral,
        device_key_id=device_key_id,
        gateway_key_id=gateway_key_id,
        suite=DOWNLINK_SUITE,
    )
    return head + ev.counter_field(counter) + tail + _sender_field(sender)


def _sender_field(sender: str) -> bytes:
    raw = sender.encode("ascii")
    return bytes((_TAG_SENDER,)) + ev.varint(len(raw)) + raw


def associated_data(topic: str, header: bytes) -> bytes:
    """u8(len(topic)) || topic || header: the topic is authenticated with the header, not just routed on."""
    raw = topic.encode("ascii")
    return bytes((len(raw),)) + raw + header


def kdf_info(
    *,
    ephemeral_pub: bytes,
    gateway_pub: bytes,
    device_pub: bytes,
    device_id: str,
    sender: str,
    epoch: int,
    device_key_id: int,
    gateway_key_id: int,
) -> bytes:
    did, snd = device_id.encode("ascii"), sender.encode("ascii")
    return b"".join(
        (
            DOWNLINK_LABEL,
            ephemeral_pub,
            gateway_pub,
            device_pub,
            len(did).to_bytes(1, "big"),
            did,
            len(snd).to_bytes(1, "big"),
            snd,
            epoch.to_bytes(8, "big"),
            device_key_id.to_bytes(4, "big"),
            gateway_key_id.to_bytes(4, "big"),
        )
    )


def body_problem(message: pb.Downlink) -> str | None:
    """What makes a Downlink invalid, or None. One rule set for both ends: the sealer refuses to send what
    the opener would refuse. Every repeated field and string is bounded here."""
    body = message.WhichOneof("body")
    if body == "receipt":
        receipt = message.receipt
        if len(receipt.accepted) > ranges.MAX_RANGES or len(receipt.rejected) > MAX_REJECTIONS:
            return "too many receipt ranges"
        accepted = [(r.epoch, r.counter_first, r.counter_last) for r in receipt.accepted]
        if not ranges.is_canonical(accepted):
            return "accepted ranges are not canonical"
        for rejection in receipt.rejected:
            r = rejection.range
            if r.counter_first > r.counter_last:
                return "a rejection range is inverted"
            if rejection.reason not in pb.RejectReason.values() or not rejection.reason:
                return "a rejection has no known reason"
        return None
    if body == "command":
        command = message.command
        if not ev.valid_device_id(command.id):  # the same safe charset: the id is logged and printed
            return "command id must be 1-64 characters of [A-Za-z0-9._-]"
        if command.kind not in pb.CommandKind.values() or not command.kind:
            return "unknown command kind"
        if not command.expires_at_ms:
            return "a command must expire"
        if len(command.config) > MAX_CONFIG_ENTRIES:
            return "too many config entries"
        if command.config and command.kind != pb.COMMAND_KIND_SET_CONFIG:
            return "config entries only go with set_config"
        if (command.new_key_id or command.certificate) and command.kind != pb.COMMAND_KIND_ROTATE_KEY:
            return "a certificate only goes with rotate_key"
        if len(command.certificate) > MAX_DER_BYTES or bool(command.new_key_id) != bool(command.certificate):
            return "rotate_key needs both a key id and a certificate, or neither"
        for entry in command.config:
            if not 0 < len(entry.key) <= MAX_CONFIG_KEY or len(entry.value) > MAX_CONFIG_VALUE:
                return "a config entry is out of bounds"
        gateway_key = command.gateway_key_id or command.gateway_public or command.gateway_mlkem_public
        update = command.kind == pb.COMMAND_KIND_UPDATE_GATEWAY_KEY
        if (gateway_key or command.previous_until_ms) and not update:
            return "gateway key fields only go with update_gateway_key"
        if update and (len(command.gateway_public) != ev.EPHEMERAL_BYTES
                       or len(command.gateway_mlkem_public) not in (0, suites.KEM_PUBLIC_BYTES)
                       or not command.previous_until_ms):
            return "update_gateway_key needs a 32-byte key, an optional ML-KEM-768 key and an end of trust"
        if bool(command.suite) != (command.kind == pb.COMMAND_KIND_SET_SUITE):
            return "a suite goes with set_suite, and only there"
        if command.suite and command.suite not in suites.UPLINK:
            return "set_suite names no uplink suite"
        if command.HasField("model_chunk") != (command.kind == pb.COMMAND_KIND_MODEL_CHUNK):
            return "a model chunk goes with model_chunk, and only there"
        if command.HasField("model_chunk"):
            return chunk_problem(command.model_chunk)
        return None
    return "no body"


def chunk_count(chunk: pb.ModelChunk) -> int:
    return -(-chunk.total_bytes // chunk.chunk_bytes) if chunk.chunk_bytes else 0


def chunk_problem(chunk: pb.ModelChunk) -> str | None:
    """What makes a ModelChunk invalid, or None (its data's hash is the receiver's to check)."""
    rid = chunk.release_id
    if len(rid) != 64 or any(c not in "0123456789abcdef" for c in rid):
        return "release_id must be 64 lowercase hex characters"
    if not MIN_CHUNK_BYTES <= chunk.chunk_bytes <= MAX_CHUNK_BYTES or not chunk.total_bytes:
        return "chunk size out of bounds"
    if chunk.total_bytes > MAX_RELEASE_BYTES:  # what a device stages is bounded before the first byte
        return "release larger than a release may be"
    count = chunk_count(chunk)
    if count > MAX_RELEASE_CHUNKS or chunk.index >= count:
        return "chunk index or release size out of bounds"
    if not chunk.data:
        return None if not chunk.sha256 and chunk.index == 0 else "an empty chunk is only a probe at index 0"
    last = chunk.index == count - 1
    want = chunk.total_bytes - chunk.index * chunk.chunk_bytes if last else chunk.chunk_bytes
    if len(chunk.data) != want or len(chunk.sha256) != 32:
        return "chunk data or hash has the wrong length"
    return None


def reject_reason_name(value: int) -> str:
    """A receipt's RejectReason as a metric label: REJECT_REASON_CLOCK_SKEW -> "clock_skew"."""
    return pb.RejectReason.DESCRIPTOR.values_by_number[value].name.removeprefix("REJECT_REASON_").lower()


REJECT_REASON_NAMES = tuple(reject_reason_name(v) for v in pb.RejectReason.values() if v)


def command_kind_name(kind: int) -> str:
    """A CommandKind as a metric label: COMMAND_KIND_SET_CONFIG -> "set_config"."""
    return pb.CommandKind.DESCRIPTOR.values_by_number[kind].name.removeprefix("COMMAND_KIND_").lower()


COMMAND_KINDS = tuple(command_kind_name(v) for v in pb.CommandKind.values() if v)


def receipt_ranges(receipt: pb.Receipt) -> list[ranges.Range]:
    """The accepted ranges of a receipt that opened (so they are canonical), for `ranges.contains`."""
    return [(r.epoch, r.counter_first, r.counter_last) for r in receipt.accepted]


def make_receipt(
    accepted: Sequence[ranges.Range], rejected: Sequence[tuple[ranges.Range, pb.RejectReason.ValueType]] = ()
) -> pb.Downlink:
    """A receipt body from `ranges.compact` output and (range, RejectReason) pairs; `seal` checks it."""
    return pb.Downlink(
        receipt=pb.Receipt(
            accepted=[pb.CounterRange(epoch=e, counter_first=f, counter_last=la) for e, f, la in accepted],
            rejected=[
                pb.Rejection(range=pb.CounterRange(epoch=e, counter_first=f, counter_last=la), reason=why)
                for (e, f, la), why in rejected
            ],
        )
    )


def parse_reply(raw: bytes) -> pb.CommandReply:
    """A device's CommandReply (the gateway's side), bounded before and after parsing. Raises
    DownlinkRefusedError(too_large | malformed); the caller has already authenticated the bytes."""
    if len(raw) > MAX_REPLY_BYTES:
        raise _refuse(DownlinkReason.TOO_LARGE)
    try:
        reply = pb.CommandReply.FromString(raw)
    except DecodeError:
        raise _refuse(DownlinkReason.MALFORMED) from None
    if (
        not ev.valid_device_id(reply.command_id)
        or len(reply.error) > MAX_REPLY_ERROR
        or len(reply.status) > MAX_REPLY_STATUS_BYTES
        or len(reply.values) > MAX_CONFIG_ENTRIES
        or any(len(v.key) > MAX_CONFIG_KEY or len(v.value) > MAX_CONFIG_VALUE for v in reply.values)
        or len(reply.csr) > MAX_DER_BYTES
        or len(reply.new_e2e_public) not in (0, 32)
    ):
        raise _refuse(DownlinkReason.MALFORMED)
    return reply


class DownlinkSealer:
    """Seals one gateway session's downlink messages: one ephemeral key, counters first_counter, +1, ...
    for all devices together. Never reuse an (sender, epoch) pair with a different ephemeral key."""

    def __init__(
        self,
        *,
        sender: str,
        gateway_key: X25519PrivateKey,
        gateway_key_id: int,
        epoch: int,
        ephemeral: X25519PrivateKey | None = None,
        first_counter: int = 0,
        max_cached_devices: int = 4096,
    ) -> None:
        if not ev.valid_device_id(sender):
            raise ConfigError("the downlink sender id must be 1-64 characters of [A-Za-z0-9._-]")
        _check_uint("epoch", epoch, ev.MAX_U64)
        _check_uint("first_counter", first_counter, ev.MAX_U64)
        _check_uint("gateway_key_id", gateway_key_id, ev.MAX_U32)
        self._gateway = gateway_key
        self._gateway_pub = keys.public_bytes(gateway_key)
        self._eph = ephemeral if ephemeral is not None else keys.generate()
        self.ephemeral_public = keys.public_bytes(self._eph)
        self.sender = sender
        self.epoch = epoch
        self.gateway_key_id = gateway_key_id
        self._counter = first_counter
        self._max_cached = max(1, max_cached_devices)
        # Per recipient (id, key id, public key): the AEAD and the header around the counter. Only the
        # gateway's own registry data keys it; an evicted entry is derived again (the counter is shared,
        # so nothing repeats).
        self._cache: dict[tuple[str, int, bytes], tuple[ChaCha20Poly1305, bytes, bytes, str]] = {}

    @property
    def next_counter(self) -> int:
        return self._counter

    def seal(
        self, message: pb.Downlink, *, device_id: str, device_public: bytes, device_key_id: int
    ) -> bytes:
        """The envelope for `device_id`'s cmd topic. Raises LocalError for a message the opener would
        refuse or an unusable device key: both are the gateway's own data."""
        problem = body_problem(message)
        if problem is not None:
            raise LocalError(f"refusing to seal an invalid downlink: {problem}")
        plaintext = message.SerializeToString()
        if len(plaintext) + 512 > DEFAULT_MAX_MESSAGE_BYTES:  # 512: header, framing and tag, generously
            raise LocalError("downlink message too large to seal")
        counter = self._counter
        if counter > ev.MAX_U64:
            raise LocalError("downlink counter exhausted: start a new session (new epoch)")
        aead, head, tail, topic = self._recipient(device_id, device_public, device_key_id)
        header = head + ev.counter_field(counter) + tail
        ciphertext = aead.encrypt(ev.nonce(counter), plaintext, associated_data(topic, header))
        self._counter = counter + 1
        return ev.encode_envelope(header, ciphertext)

    def _recipient(
        self, device_id: str, device_public: bytes, device_key_id: int
    ) -> tuple[ChaCha20Poly1305, bytes, bytes, str]:
        ident = (device_id, device_key_id, device_public)
        cached = self._cache.get(ident)
        if cached is not None:
            return cached
        if not ev.valid_device_id(device_id):
            raise LocalError("device id must be 1-64 characters of [A-Za-z0-9._-]")
        if not 0 <= device_key_id <= ev.MAX_U32:
            raise LocalError(f"device_key_id must be in 0..{ev.MAX_U32}")
        try:
            device = keys.public_from_bytes(device_public)
            dh_es, dh_ss = self._eph.exchange(device), self._gateway.exchange(device)
        except (ConfigError, ValueError) as exc:  # wrong length or a low-order point
            raise LocalError("the device's registered key is not a usable X25519 key") from exc
        info = kdf_info(
            ephemeral_pub=self.ephemeral_public,
            gateway_pub=self._gateway_pub,
            device_pub=device_public,
            device_id=device_id,
            sender=self.sender,
            epoch=self.epoch,
            device_key_id=device_key_id,
            gateway_key_id=self.gateway_key_id,
        )
        head, tail = ev.encode_header_parts(
            device_id=device_id,
            epoch=self.epoch,
            ephemeral=self.ephemeral_public,
            device_key_id=device_key_id,
            gateway_key_id=self.gateway_key_id,
            suite=DOWNLINK_SUITE,
        )
        entry = (
            ChaCha20Poly1305(ev.session_key(dh_es, dh_ss, info)),
            head,
            tail + _sender_field(self.sender),
            cmd_topic_for(device_id),
        )
        if len(self._cache) >= self._max_cached:
            del self._cache[next(iter(self._cache))]
        self._cache[ident] = entry
        return entry


@dataclass(frozen=True, slots=True)
class DownlinkOpened:
    sender: str
    gateway_key_id: int
    epoch: int
    counter: int
    message: pb.Downlink = field(repr=False)  # commands and receipts stay out of logs and tracebacks
    expired: bool = False  # a command past expires_at_ms (only returned with refuse_expired=False)


# What a cached key is valid for: (epoch, ephemeral, gateway key id, device key id).
_SessionId = tuple[int, bytes, int, int]


class DownlinkOpener:
    """The agent's side: authenticates downlink messages for one device and enforces freshness per
    sender. State (windows, cached keys) moves only after a message authenticated."""

    def __init__(
        self,
        *,
        device_id: str,
        device_keys: Mapping[int, X25519PrivateKey],
        trusted_gateways: Mapping[int, bytes],
        window_bits: int = DEFAULT_WINDOW_BITS,
        max_senders: int = DEFAULT_MAX_SENDERS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        trusted_until_ns: Mapping[int, int] | None = None,
    ) -> None:
        """`trusted_until_ns`: for a gateway key being rotated out, when its grace period ends; from then
        on what it seals is refused as retired_key (keys not named here are trusted without an end)."""
        if not ev.valid_device_id(device_id):
            raise ConfigError("device id must be 1-64 characters of [A-Za-z0-9._-]")
        if not device_keys:
            raise ConfigError("the downlink needs at least one device key")
        if not 0 < len(trusted_gateways) <= MAX_TRUSTED_KEYS:
            raise ConfigError(f"trust 1..{MAX_TRUSTED_KEYS} gateway keys for the downlink")
        if not 1 <= max_senders <= MAX_SENDERS:
            raise ConfigError(f"max_senders must be in 1..{MAX_SENDERS}")
        if max_message_bytes < 64:
            raise ConfigError("max_message_bytes must be at least 64")
        try:
            ReplayWindow(window_bits)
        except LocalError as exc:
            raise ConfigError(str(exc)) from exc
        self.device_id = device_id
        self._topic = cmd_topic_for(device_id)
        self._width = window_bits
        self._max_senders = max_senders
        self._max_bytes = max_message_bytes
        self._gateways: dict[int, bytes] = {}
        self._until = dict(trusted_until_ns or {})
        if not set(self._until) <= set(trusted_gateways):
            raise ConfigError("a trust end for a gateway key that is not trusted")
        # DH(s, G) for every (device key, trusted gateway key): configuration, not attacker input, and
        # computed up front so an unusable trusted key is a startup error rather than a refusal later.
        self._static: dict[tuple[int, int], bytes] = {}
        self._device: dict[int, tuple[X25519PrivateKey, bytes]] = {}
        for dkid, dkey in device_keys.items():
            _check_uint("device_key_id", dkid, ev.MAX_U32)
            self._device[dkid] = (dkey, keys.public_bytes(dkey))
        for gkid, gpub in trusted_gateways.items():
            _check_uint("gateway_key_id", gkid, ev.MAX_U32)
            gateway = keys.public_from_bytes(gpub)
            self._gateways[gkid] = gpub
            for dkid, (dkey, _) in self._device.items():
                try:
                    self._static[gkid, dkid] = dkey.exchange(gateway)
                except ValueError as exc:
                    raise ConfigError(f"trusted gateway key {gkid} is not a usable X25519 key") from exc
        self._windows: dict[str, ReplayWindow] = {}
        self._sessions: dict[str, tuple[_SessionId, ChaCha20Poly1305]] = {}
        self._changed = False

    def add_device_key(self, key_id: int, key: X25519PrivateKey) -> None:
        """Also open what is sealed to `key_id`: the device's new key while a rotation it started is
        pending (the registry already seals to it; the device switches on the second step)."""
        _check_uint("device_key_id", key_id, ev.MAX_U32)
        self._device[key_id] = (key, keys.public_bytes(key))
        for gkid, gpub in self._gateways.items():
            try:
                self._static[gkid, key_id] = key.exchange(keys.public_from_bytes(gpub))
            except ValueError as exc:
                raise ConfigError(f"trusted gateway key {gkid} is not a usable X25519 key") from exc

    def add_gateway_key(self, key_id: int, public: bytes, *, others_until_ns: int | None = None) -> None:
        """Also trust `public` under `key_id` from now on: the new gateway key an authenticated
        update_gateway_key named, so receipts sealed with it open while the agent drains before its
        restart. `others_until_ns`: the end of trust of every key trusted before (its grace)."""
        _check_uint("gateway_key_id", key_id, ev.MAX_U32)
        if key_id not in self._gateways and len(self._gateways) >= MAX_TRUSTED_KEYS:
            raise ConfigError(f"trust at most {MAX_TRUSTED_KEYS} gateway keys for the downlink")
        gateway = keys.public_from_bytes(public)
        static = {}
        for dkid, (dkey, _) in self._device.items():
            try:
                static[key_id, dkid] = dkey.exchange(gateway)
            except ValueError as exc:
                raise ConfigError(f"gateway key {key_id} is not a usable X25519 key") from exc
        if others_until_ns is not None:
            for kid in self._gateways:
                if kid != key_id:
                    self._until[kid] = min(self._until.get(kid, others_until_ns), others_until_ns)
        self._gateways[key_id] = public
        self._until.pop(key_id, None)
        self._static.update(static)

    def open(self, raw: bytes, *, topic: str, now_ns: int, refuse_expired: bool = True) -> DownlinkOpened:
        """`topic` is where the message arrived. Raises DownlinkRefusedError; never anything else on untrusted
        input (a surprise inside becomes malformed). With `refuse_expired=False` an expired command is
        returned with `expired` set instead (authenticated, counter spent), so the agent can say so in
        its reply; it must not act on it."""
        try:
            opened = self._unseal(raw, topic, now_ns)
        except DownlinkRefusedError:
            raise
        except Exception:  # noqa: BLE001 - untrusted bytes must never raise anything but a refusal
            raise _refuse(DownlinkReason.MALFORMED) from None
        if opened.expired and refuse_expired:
            raise _refuse(DownlinkReason.EXPIRED)
        return opened

    def _unseal(self, raw: bytes, topic: str, now_ns: int) -> DownlinkOpened:
        if topic != self._topic:
            raise _refuse(DownlinkReason.WRONG_DEVICE)
        if len(raw) > self._max_bytes:
            raise _refuse(DownlinkReason.TOO_LARGE)
        parts = ev.split_envelope(raw)  # bounds the header to 256 bytes before it is parsed
        if parts is None:
            raise _refuse(DownlinkReason.MALFORMED)
        hbytes, ciphertext = parts
        try:
            header = _parse_header(hbytes)
        except DecodeError:
            raise _refuse(DownlinkReason.MALFORMED) from None
        if header.version != ev.VERSION or header.suite != DOWNLINK_SUITE:
            raise _refuse(DownlinkReason.UNSUPPORTED_VERSION)
        if header.device_id != self.device_id:
            raise _refuse(DownlinkReason.WRONG_DEVICE)
        sender = header.sender
        if not ev.valid_device_id(sender) or len(header.ephemeral) != ev.EPHEMERAL_BYTES:
            raise _refuse(DownlinkReason.MALFORMED)
        # One byte string per message: anything but the sealer's encoding (unknown fields, other order,
        # padded varints) is refused, so the header the AEAD covers is the header this code read.
        canonical = header_bytes(
            device_id=header.device_id,
            sender=sender,
            epoch=header.epoch,
            counter=header.counter,
            ephemeral=header.ephemeral,
            device_key_id=header.device_key_id,
            gateway_key_id=header.gateway_key_id,
        )
        if canonical != hbytes:
            raise _refuse(DownlinkReason.MALFORMED)
        gateway_pub = self._gateways.get(header.gateway_key_id)
        if gateway_pub is None:
            raise _refuse(DownlinkReason.UNKNOWN_SENDER)
        until = self._until.get(header.gateway_key_id)
        if until is not None and until <= now_ns:
            raise _refuse(DownlinkReason.RETIRED_KEY)
        device = self._device.get(header.device_key_id)
        if device is None:
            raise _refuse(DownlinkReason.UNKNOWN_KEY)

        epoch, counter = header.epoch, header.counter
        window = self._windows.get(sender)
        if window is None:
            if len(self._windows) >= self._max_senders:
                raise _refuse(DownlinkReason.TOO_MANY_SENDERS)
        else:
            self._precheck(window, epoch, counter)

        ident = (epoch, header.ephemeral, header.gateway_key_id, header.device_key_id)
        cached = self._sessions.get(sender)
        if cached is not None and cached[0] == ident:
            aead = cached[1]
        else:
            aead = self._derive(header, device, gateway_pub)
        try:
            plaintext = aead.decrypt(ev.nonce(counter), ciphertext, associated_data(topic, hbytes))
        except InvalidTag:
            raise _refuse(DownlinkReason.FORGED) from None

        # Authenticated: only now may state move. A body refused below stays consumed (its counter is
        # spent), which is what the sender must expect of a message it should not have sent.
        if window is None:
            window = self._windows[sender] = ReplayWindow(self._width)
        window.commit(epoch, counter)
        self._changed = True
        self._sessions[sender] = (ident, aead)
        try:
            message = _parse_downlink(plaintext)
        except DecodeError:
            raise _refuse(DownlinkReason.MALFORMED) from None
        if body_problem(message) is not None:
            raise _refuse(DownlinkReason.MALFORMED)
        expired = message.HasField("command") and message.command.expires_at_ms * _MS <= now_ns
        return DownlinkOpened(sender, header.gateway_key_id, epoch, counter, message, expired)

    @staticmethod
    def _precheck(window: ReplayWindow, epoch: int, counter: int) -> None:
        """ReplayWindow.check, with its one replay reason split: seen before, or too far behind to know."""
        if window.check(epoch, counter) is None:
            return
        if epoch < window.epoch:
            raise _refuse(DownlinkReason.STALE_EPOCH)
        if window.top - counter >= window.width:
            raise _refuse(DownlinkReason.TOO_OLD)
        raise _refuse(DownlinkReason.REPLAY)

    def _derive(
        self, header: pb.DownlinkHeader, device: tuple[X25519PrivateKey, bytes], gateway_pub: bytes
    ) -> ChaCha20Poly1305:
        device_key, device_pub = device
        try:
            dh_es = device_key.exchange(X25519PublicKey.from_public_bytes(header.ephemeral))
        except ValueError:  # a low-order ephemeral: nobody who holds a gateway key sent it
            raise _refuse(DownlinkReason.FORGED) from None
        info = kdf_info(
            ephemeral_pub=header.ephemeral,
            gateway_pub=gateway_pub,
            device_pub=device_pub,
            device_id=header.device_id,
            sender=header.sender,
            epoch=header.epoch,
            device_key_id=header.device_key_id,
            gateway_key_id=header.gateway_key_id,
        )
        dh_ss = self._static[header.gateway_key_id, header.device_key_id]
        return ChaCha20Poly1305(ev.session_key(dh_es, dh_ss, info))

    def take_changed(self) -> bool:
        """Whether the replay state moved since the last call: the agent then persists `state()`."""
        changed, self._changed = self._changed, False
        return changed

    def state(self) -> bytes:
        """The replay state to persist, before acting on what was opened. Format: docs/PROTOCOL.md."""
        did = self.device_id.encode("ascii")
        out = bytearray(_STATE_MAGIC + bytes((_STATE_VERSION, 0, len(did))) + did)
        out.append(len(self._windows))
        for sender in sorted(self._windows):
            snd = sender.encode("ascii")
            window = self._windows[sender].to_bytes()
            out += bytes((len(snd),)) + snd + _WINDOW_LEN.pack(len(window)) + window
        return bytes(out)

    def load_state(self, data: bytes) -> None:
        """Restore persisted state (at startup, before opening anything). Raises LocalError if it is
        corrupt, for another device, or holds more senders than allowed: a damaged store must not weaken
        the replay checks, so nothing is loaded then."""
        if not 7 <= len(data) <= _MAX_STATE_BYTES:
            raise LocalError("downlink state has an impossible length")
        if data[:4] != _STATE_MAGIC or data[4] != _STATE_VERSION or data[5] != 0:
            raise LocalError("downlink state has an unknown format")
        i = 7 + data[6]
        if data[7:i].decode("ascii", "replace") != self.device_id or i >= len(data):
            raise LocalError("downlink state is for another device or truncated")
        count = data[i]
        i += 1
        if count > self._max_senders:
            raise LocalError("downlink state holds more senders than max_senders")
        windows: dict[str, ReplayWindow] = {}
        for _ in range(count):
            if i >= len(data):
                raise LocalError("downlink state is truncated")
            end = i + 1 + data[i]
            sender = data[i + 1 : end].decode("ascii", "replace")
            if not ev.valid_device_id(sender) or sender in windows or end + _WINDOW_LEN.size > len(data):
                raise LocalError("downlink state is corrupt")
            (length,) = _WINDOW_LEN.unpack_from(data, end)
            start = end + _WINDOW_LEN.size
            if length > _MAX_WINDOW_BYTES or start + length > len(data):
                raise LocalError("downlink state is corrupt")
            window = ReplayWindow.from_bytes(data[start : start + length])
            windows[sender] = window if window.width == self._width else window.resized(self._width)
            i = start + length
        if i != len(data):
            raise LocalError("downlink state has trailing bytes")
        self._windows = windows
        self._sessions.clear()
        self._changed = False
