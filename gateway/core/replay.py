"""Per-device anti-replay state: a session epoch plus an RFC 6479 / WireGuard style sliding bitmap.

Bit i of `bitmap` says counter `top - i` was accepted in the current epoch. A Python int is the bitmap:
shifting and masking a 2048-bit int costs well under a microsecond. `check` never changes state;
`commit` is called only after the message authenticated, so forged messages cannot move the window.
"""

from __future__ import annotations

import struct

from gateway.core.reasons import Reason
from gateway.errors import LocalError

MIN_WIDTH = 1024
MAX_WIDTH = 65536
DEFAULT_WIDTH = 2048

_MAGIC = b"sgwr"
_FORMAT_VERSION = 1
_HAS_SESSION = 0x01
_HEAD = struct.Struct(">4sBBIIQQ")  # magic, format version, flags, width, key floor, epoch, top


def _check_width(width: int) -> None:
    if not (MIN_WIDTH <= width <= MAX_WIDTH) or width % 64:
        raise LocalError(f"replay window width must be a multiple of 64 in {MIN_WIDTH}..{MAX_WIDTH}")


class ReplayWindow:
    """Freshness state of one device. `key_floor` is the highest device key id seen authenticated:
    it travels with the window so a finished key rotation survives a gateway restart."""

    __slots__ = ("_mask", "bitmap", "epoch", "key_floor", "top", "width")

    def __init__(self, width: int = DEFAULT_WIDTH) -> None:
        _check_width(width)
        self.width = width
        self._mask = (1 << width) - 1
        self.epoch = -1  # no session yet: every epoch is new
        self.top = -1
        self.bitmap = 0
        self.key_floor = 0

    def check(self, epoch: int, counter: int) -> Reason | None:
        if epoch != self.epoch:
            return Reason.STALE_SESSION if epoch < self.epoch else None
        behind = self.top - counter
        if behind < 0:
            return None
        if behind >= self.width or (self.bitmap >> behind) & 1:
            return Reason.REPLAY
        return None

    def seen(self, epoch: int, counter: int) -> bool:
        """This exact (epoch, counter) passed `check` and was committed (not merely too old to tell)."""
        behind = self.top - counter
        return epoch == self.epoch and 0 <= behind < self.width and bool((self.bitmap >> behind) & 1)

    def commit(self, epoch: int, counter: int) -> None:
        """Record an authenticated (epoch, counter) that `check` passed. A newer epoch starts afresh."""
        if epoch != self.epoch:
            if epoch < self.epoch:
                raise LocalError("commit of a stale epoch: check() must pass first")
            self.epoch = epoch
            self.top = counter
            self.bitmap = 1
            return
        ahead = counter - self.top
        if ahead > 0:
            self.bitmap = ((self.bitmap << ahead) | 1) & self._mask if ahead < self.width else 1
            self.top = counter
        elif -ahead < self.width:
            self.bitmap |= 1 << -ahead
        else:  # also keeps a misuse from allocating a huge int
            raise LocalError("commit of a counter older than the window: check() must pass first")

    def resized(self, width: int) -> ReplayWindow:
        """The same state in another width. Growing marks the new, unknown slots as seen: a restart with
        a wider window must not re-open counters the old window had already forgotten."""
        out = ReplayWindow(width)
        out.epoch, out.top, out.key_floor = self.epoch, self.top, self.key_floor
        bitmap = self.bitmap & out._mask
        if width > self.width and self.top >= 0:
            bitmap |= out._mask ^ self._mask
        out.bitmap = bitmap
        return out

    def to_bytes(self) -> bytes:
        has = self.top >= 0
        head = _HEAD.pack(
            _MAGIC, _FORMAT_VERSION, _HAS_SESSION if has else 0, self.width, self.key_floor,
            self.epoch if has else 0, self.top if has else 0,
        )
        return head + self.bitmap.to_bytes(self.width // 8, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplayWindow:
        """Inverse of to_bytes. Every field is validated: a corrupt store must not weaken replay checks."""
        if len(data) < _HEAD.size or len(data) > _HEAD.size + MAX_WIDTH // 8:
            raise LocalError("replay state has an impossible length")
        magic, version, flags, width, key_floor, epoch, top = _HEAD.unpack_from(data)
        if magic != _MAGIC or version != _FORMAT_VERSION:
            raise LocalError("replay state has an unknown format")
        _check_width(width)
        if len(data) != _HEAD.size + width // 8 or flags & ~_HAS_SESSION:
            raise LocalError("replay state is corrupt")
        bitmap = int.from_bytes(data[_HEAD.size:], "big")
        window = cls(width)
        window.key_floor = key_floor
        if flags & _HAS_SESSION:
            if not bitmap & 1:
                raise LocalError("replay state is corrupt: its top counter is not marked")
            window.epoch, window.top, window.bitmap = epoch, top, bitmap
        elif epoch or top or bitmap:
            raise LocalError("replay state is corrupt: data without a session")
        return window
