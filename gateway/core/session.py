"""Sealer (device side) and Opener (gateway side) of the v1 envelope. Construction: docs/PROTOCOL.md."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from google.protobuf.message import DecodeError

from gateway.core import envelope as ev
from gateway.core import keys, suites
from gateway.core.reasons import Reason
from gateway.core.replay import DEFAULT_WIDTH, ReplayWindow
from gateway.errors import ConfigError, LocalError
from gateway.pb import envelope_pb2 as pb

DEFAULT_MAX_MESSAGE_BYTES = 65536
DEFAULT_MAX_SESSIONS = 65536
ROTATED_MAX = 4096  # rotations waiting for the gateway to retire their older keys


def _check_uint(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ConfigError(f"{name} must be in 0..{limit}")


class Sealer:
    """Seals one session's messages: one ephemeral key, counters 0, 1, 2, ... Never reuse an epoch.

    Suite 3 (hybrid) also encapsulates once to the gateway's ML-KEM-768 key at session start and puts the
    ciphertext in every header. `ephemeral` and `kem_encapsulation` ((shared secret, ciphertext)) exist
    only so the test vectors can be deterministic: cryptography's encapsulation takes no seed.
    """

    def __init__(
        self, *, device_id: str, device_key: X25519PrivateKey, device_key_id: int,
        gateway_public: bytes, gateway_key_id: int, epoch: int,
        ephemeral: X25519PrivateKey | None = None, first_counter: int = 0,
        suite: int = ev.SUITE, gateway_kem_public: bytes | None = None,
        kem_encapsulation: tuple[bytes, bytes] | None = None,
    ) -> None:
        if not ev.valid_device_id(device_id):
            raise ConfigError("device id must be 1-64 characters of [A-Za-z0-9._-]")
        _check_uint("epoch", epoch, ev.MAX_U64)
        _check_uint("first_counter", first_counter, ev.MAX_U64)
        _check_uint("device_key_id", device_key_id, ev.MAX_U32)
        _check_uint("gateway_key_id", gateway_key_id, ev.MAX_U32)
        if suite not in suites.UPLINK:
            raise ConfigError(f"suite {suite} is not an uplink suite")
        gateway = keys.public_from_bytes(gateway_public)
        eph = ephemeral if ephemeral is not None else keys.generate()
        eph_pub = keys.public_bytes(eph)
        device_pub = keys.public_bytes(device_key)
        kem_ciphertext = b""
        try:
            dh_es, dh_ss = eph.exchange(gateway), device_key.exchange(gateway)
        except ValueError as exc:  # a low-order point: not a usable gateway key
            raise ConfigError("the gateway public key is not a usable X25519 key") from exc
        if suite == suites.HYBRID:
            if gateway_kem_public is None:
                raise ConfigError("suite x25519-mlkem768 needs the gateway's ML-KEM-768 public key")
            kem_public = keys.kem_public_from_bytes(gateway_kem_public)
            shared, kem_ciphertext = kem_encapsulation or kem_public.encapsulate()
            if len(shared) != suites.KEM_SHARED_BYTES or len(kem_ciphertext) != suites.KEM_CIPHERTEXT_BYTES:
                raise ConfigError("an ML-KEM-768 encapsulation is a 32-byte secret, a 1088-byte ciphertext")
            info = ev.hybrid_kdf_info(
                ephemeral_pub=eph_pub, device_pub=device_pub, gateway_pub=gateway_public,
                kem_public=gateway_kem_public, kem_ciphertext=kem_ciphertext, device_id=device_id,
                epoch=epoch, device_key_id=device_key_id, gateway_key_id=gateway_key_id,
            )
            key = ev.hybrid_session_key(shared, dh_es, dh_ss, info)
        else:
            if kem_encapsulation is not None:
                raise ConfigError("a KEM encapsulation is for suite x25519-mlkem768 only")
            info = ev.kdf_info(
                ephemeral_pub=eph_pub, device_pub=device_pub, gateway_pub=gateway_public,
                device_id=device_id, epoch=epoch, device_key_id=device_key_id, gateway_key_id=gateway_key_id,
            )
            key = ev.session_key(dh_es, dh_ss, info)
        self._aead = ChaCha20Poly1305(key)
        self._head, self._tail = ev.encode_header_parts(
            device_id=device_id, epoch=epoch, ephemeral=eph_pub,
            device_key_id=device_key_id, gateway_key_id=gateway_key_id, suite=suite,
            kem_ciphertext=kem_ciphertext,
        )
        self.suite = suite
        self.kem_ciphertext = kem_ciphertext
        self._counter = first_counter
        self.device_id = device_id
        self.epoch = epoch
        self.ephemeral_public = eph_pub

    @property
    def next_counter(self) -> int:
        return self._counter

    def header_bytes(self, counter: int) -> bytes:
        return self._head + ev.counter_field(counter) + self._tail

    def seal(self, plaintext: bytes) -> bytes:
        counter = self._counter
        if counter > ev.MAX_U64:
            raise LocalError("session counter exhausted: start a new session (new epoch)")
        header = self._head + ev.counter_field(counter) + self._tail
        ciphertext = self._aead.encrypt(ev.nonce(counter), plaintext, header)
        self._counter = counter + 1
        return ev.encode_envelope(header, ciphertext)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    public: bytes
    not_after_ns: int | None = None  # end of a rotation grace period; None = no end


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    status: str  # "active" | "revoked"; anything but "active" is refused
    keys: Mapping[int, KeyEntry]
    # The weakest suite this device may seal with (the registry's `min_suite`): below it is `downgrade`.
    min_suite: int = suites.X25519


class KeyLookup(Protocol):
    def __call__(self, device_id: str) -> DeviceKeys | None: ...


@dataclass(frozen=True, slots=True)
class Opened:
    device_id: str
    epoch: int
    counter: int
    plaintext: bytes = field(repr=False)  # never in logs or tracebacks
    header: pb.Header


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    device_id: str | None  # as claimed (unauthenticated), and only if it is a well-formed id
    # For replay and stale_session only: the header's (epoch, counter, device key id), unauthenticated,
    # and whether the window holds that exact counter. Lets the gateway answer a device's resend with a
    # receipt (docs/PROTOCOL.md, "Receipts"): seen = processed before, else never processable.
    claim: tuple[int, int, int] | None = None
    seen: bool = False


# What a cached session key is valid for: (epoch, ephemeral, device key id, gateway key id, device public,
# suite, KEM ciphertext). For suite 3 this is the decapsulation cache: one ML-KEM decapsulation per session.
_SessionId = tuple[int, bytes, int, int, bytes, int, bytes]

_TOO_LARGE = Rejected(Reason.TOO_LARGE, None)
_MALFORMED = Rejected(Reason.MALFORMED, None)
_parse_header = pb.Header.FromString


class Opener:
    """Authenticates envelopes and enforces freshness. State (replay windows, session keys) only moves
    after a message authenticated, so nothing unauthenticated can change what is accepted later."""

    def __init__(
        self, *, gateway_keys: Mapping[int, X25519PrivateKey], lookup: KeyLookup,
        window_bits: int = DEFAULT_WIDTH, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        gateway_kem_keys: Mapping[int, MLKEM768PrivateKey] | None = None,
        suites_allowed: Collection[int] | None = None,
        gateway_key_not_after_ns: Mapping[int, int] | None = None,
    ) -> None:
        """`gateway_kem_keys`: the ML-KEM-768 half of gateway keys (same ids) for suite 3.
        `suites_allowed`: the fleet's allow-list; None = every suite the keys given can open.
        `gateway_key_not_after_ns`: for gateway keys being rotated out, the end of their grace period;
        a message sealed to one after that is refused as gateway_key_retired (docs/PROTOCOL.md)."""
        if not gateway_keys:
            raise ConfigError("the gateway needs at least one end-to-end key")
        kem = dict(gateway_kem_keys or {})
        if not set(kem) <= set(gateway_keys):
            raise ConfigError("every ML-KEM gateway key needs an X25519 gateway key under the same id")
        allowed = (frozenset(suites_allowed) if suites_allowed is not None
                   else frozenset({suites.X25519} | ({suites.HYBRID} if kem else set())))
        if not allowed or not allowed <= suites.UPLINK:
            raise ConfigError(f"allowed suites must be a non-empty subset of {sorted(suites.UPLINK)}")
        if suites.HYBRID in allowed and not kem:
            raise ConfigError("suite x25519-mlkem768 needs the gateway's ML-KEM-768 key")
        try:
            ReplayWindow(window_bits)
        except LocalError as exc:
            raise ConfigError(str(exc)) from exc
        if max_message_bytes < 64:
            raise ConfigError("max_message_bytes must be at least 64")
        retiring = dict(gateway_key_not_after_ns or {})
        if not set(retiring) <= set(gateway_keys):
            raise ConfigError("a grace period for a gateway key id the gateway does not hold")
        if set(retiring) == set(gateway_keys):
            raise ConfigError("at least one gateway key must have no end (the current one)")
        self._retiring = retiring
        self._gateway = {kid: (k, keys.public_bytes(k)) for kid, k in gateway_keys.items()}
        self._kem = {kid: (k, keys.kem_public_bytes(k)) for kid, k in kem.items()}
        self._allowed = allowed
        self._lookup = lookup
        self._width = window_bits
        self._max_bytes = max_message_bytes
        self._max_sessions = max(1, max_sessions)
        self._windows: dict[str, ReplayWindow] = {}
        # One session per device: a device's newer session replaces its older one, so the cache is
        # bounded by the number of devices that authenticated, never by what an attacker sends.
        self._sessions: dict[str, tuple[_SessionId, ChaCha20Poly1305]] = {}
        # DH(G, s_dev) depends on registry keys only (never on attacker input): cache it to halve
        # the cost of a new session.
        self._static: dict[tuple[int, bytes], bytes] = {}
        # (device, key id) for a device that authenticated with a newer key while an older one was still
        # inside its rotation grace: the gateway ends that grace in the registry, off the hot path
        # (`take_rotated`). A deque, because the network thread appends and another thread pops; bounded,
        # because a grace dropped from it still ends at its own time.
        self._rotated: deque[tuple[str, int]] = deque(maxlen=ROTATED_MAX)

    def open(self, raw: bytes, now_ns: int, expected_device_id: str | None = None) -> Opened | Rejected:
        """`expected_device_id` is the identity the transport authenticated (the MQTT topic, which the
        broker's ACL ties to the TLS certificate). A header naming anyone else is refused before any key
        lookup or state change, so a device that stole another's end-to-end key still cannot move that
        device's replay state (e.g. push it to a far epoch and lock it out)."""
        try:
            return self._unseal(raw, now_ns, expected_device_id)
        except Exception:  # noqa: BLE001 - untrusted bytes must never raise; any surprise is malformed
            return _MALFORMED

    def _unseal(self, raw: bytes, now_ns: int, expected_device_id: str | None) -> Opened | Rejected:
        if len(raw) > self._max_bytes:
            return _TOO_LARGE
        # Bounded at suite 3's header size even where suite 3 is not allowed, so such a message is
        # refused as suite_not_allowed (what the operator needs to see), not as malformed.
        parts = ev.split_envelope(raw, ev.MAX_HYBRID_HEADER_BYTES)
        if parts is None:
            return _MALFORMED
        hbytes, ciphertext = parts
        try:
            header = _parse_header(hbytes)
        except DecodeError:
            return _MALFORMED
        device_id = header.device_id
        suite = header.suite
        if header.version != ev.VERSION or suite not in suites.UPLINK:
            return Rejected(Reason.UNSUPPORTED_VERSION, device_id if ev.valid_device_id(device_id) else None)
        if suite not in self._allowed:  # blamed on the transport's identity where there is one
            blamed = expected_device_id or (device_id if ev.valid_device_id(device_id) else None)
            return Rejected(Reason.SUITE_NOT_ALLOWED, blamed)
        if expected_device_id is not None and device_id != expected_device_id:
            return Rejected(Reason.TOPIC_MISMATCH, expected_device_id)
        # An id with a cached session was validated when it first authenticated.
        if device_id not in self._sessions and not ev.valid_device_id(device_id):
            return _MALFORMED
        ephemeral = header.ephemeral
        if len(ephemeral) != ev.EPHEMERAL_BYTES:
            return Rejected(Reason.MALFORMED, device_id)
        kem_ciphertext = header.kem_ciphertext
        if suite == suites.HYBRID:
            if len(kem_ciphertext) != suites.KEM_CIPHERTEXT_BYTES:
                return Rejected(Reason.MALFORMED, device_id)
        elif kem_ciphertext or len(hbytes) > ev.MAX_HEADER_BYTES:  # suite 1 keeps its 256-byte bound
            return Rejected(Reason.MALFORMED, device_id)

        record = self._lookup(device_id)
        if record is None:
            return Rejected(Reason.UNKNOWN_DEVICE, device_id)
        if record.status != "active":
            return Rejected(Reason.REVOKED, device_id)
        if suites.below(suite, record.min_suite):
            return Rejected(Reason.DOWNGRADE, device_id)
        device_key_id = header.device_key_id
        entry = record.keys.get(device_key_id)
        if entry is None or (entry.not_after_ns is not None and entry.not_after_ns < now_ns):
            return Rejected(Reason.BAD_AUTH, device_id)
        gateway_key_id = header.gateway_key_id
        gateway = self._gateway.get(gateway_key_id)
        kem = self._kem.get(gateway_key_id) if suite == suites.HYBRID else None
        if gateway is None or (kem is None and suite == suites.HYBRID):
            return Rejected(Reason.BAD_AUTH, device_id)
        if self._retiring:
            ends = self._retiring.get(gateway_key_id)
            if ends is not None and ends < now_ns:  # checked before any DH: costs an attacker nothing
                return Rejected(Reason.GATEWAY_KEY_RETIRED, device_id)

        epoch = header.epoch
        counter = header.counter
        window = self._windows.get(device_id)
        if window is not None:
            if device_key_id < window.key_floor:
                return Rejected(Reason.BAD_AUTH, device_id)
            reason = window.check(epoch, counter)
            if reason is not None:
                claim = (epoch, counter, device_key_id)
                return Rejected(reason, device_id, claim, window.seen(epoch, counter))

        ident = (epoch, ephemeral, device_key_id, gateway_key_id, entry.public, suite, kem_ciphertext)
        cached = self._sessions.get(device_id)
        fresh = cached is None or cached[0] != ident
        if cached is not None and not fresh:
            aead = cached[1]
        else:
            derived = self._derive(device_id, header, entry.public, gateway, kem)
            if derived is None:
                return Rejected(Reason.BAD_AUTH, device_id)
            aead = derived
        try:
            plaintext = aead.decrypt(ev.nonce(counter), ciphertext, hbytes)
        except InvalidTag:
            return Rejected(Reason.BAD_AUTH, device_id)

        # Authenticated: only now may state move.
        if window is None:
            window = self._windows[device_id] = ReplayWindow(self._width)
        window.commit(epoch, counter)
        window.key_floor = max(window.key_floor, device_key_id)
        if fresh:  # the first message under a new key is always a new session
            self._remember(device_id, (ident, aead))
            if _older_key_in_grace(record, device_key_id, now_ns):
                self._rotated.append((device_id, device_key_id))
        return Opened(device_id, epoch, counter, plaintext, header)

    def _derive(self, device_id: str, header: pb.Header, device_public: bytes,
                gateway: tuple[X25519PrivateKey, bytes],
                kem: tuple[MLKEM768PrivateKey, bytes] | None) -> ChaCha20Poly1305 | None:
        gateway_private, gateway_public = gateway
        try:
            ss_key = (header.gateway_key_id, device_public)
            dh_ss = self._static.get(ss_key)
            if dh_ss is None:
                dh_ss = gateway_private.exchange(X25519PublicKey.from_public_bytes(device_public))
                if len(self._static) >= self._max_sessions:
                    del self._static[next(iter(self._static))]
                self._static[ss_key] = dh_ss
            # cryptography refuses low-order points (all-zero shared secret) with ValueError.
            dh_es = gateway_private.exchange(X25519PublicKey.from_public_bytes(header.ephemeral))
            if kem is not None:
                # ML-KEM rejects implicitly: a bad ciphertext yields an unrelated secret, so the AEAD
                # fails (bad_auth). ValueError only for a wrong length, which was checked already.
                kem_private, kem_public = kem
                shared = kem_private.decapsulate(header.kem_ciphertext)
        except ValueError:
            return None
        if kem is not None:
            info = ev.hybrid_kdf_info(
                ephemeral_pub=header.ephemeral, device_pub=device_public, gateway_pub=gateway_public,
                kem_public=kem_public, kem_ciphertext=header.kem_ciphertext, device_id=device_id,
                epoch=header.epoch, device_key_id=header.device_key_id, gateway_key_id=header.gateway_key_id,
            )
            return ChaCha20Poly1305(ev.hybrid_session_key(shared, dh_es, dh_ss, info))
        info = ev.kdf_info(
            ephemeral_pub=header.ephemeral, device_pub=device_public, gateway_pub=gateway_public,
            device_id=device_id, epoch=header.epoch, device_key_id=header.device_key_id,
            gateway_key_id=header.gateway_key_id,
        )
        return ChaCha20Poly1305(ev.session_key(dh_es, dh_ss, info))

    def _remember(self, device_id: str, session: tuple[_SessionId, ChaCha20Poly1305]) -> None:
        sessions = self._sessions
        sessions.pop(device_id, None)
        if len(sessions) >= self._max_sessions:
            del sessions[next(iter(sessions))]  # the longest-established session; it re-derives if needed
        sessions[device_id] = session

    def load_replay_state(self, device_id: str, state: bytes) -> None:
        """Restore a persisted window (at startup). Raises LocalError if the stored state is invalid."""
        window = ReplayWindow.from_bytes(state)
        if window.width != self._width:
            window = window.resized(self._width)
        self._windows[device_id] = window
        self._sessions.pop(device_id, None)

    def forget(self, device_id: str) -> None:
        """Drop a removed device's state (the gateway's registry poll). Safe to call from another thread
        than `open`'s: two dict pops."""
        self._windows.pop(device_id, None)
        self._sessions.pop(device_id, None)

    def take_rotated(self) -> list[tuple[str, int]]:
        """(device, key id) of each device seen on a newer key while an older key was still valid, since
        the last call: the gateway retires the older keys (`Registry.retire_keys_before`). Safe to call
        from another thread than `open`'s."""
        out = []
        while True:
            try:
                out.append(self._rotated.popleft())
            except IndexError:
                return out


def _older_key_in_grace(record: DeviceKeys, key_id: int, now_ns: int) -> bool:
    return any(kid < key_id and (e.not_after_ns is None or e.not_after_ns >= now_ns)
               for kid, e in record.keys.items())
