"""Per-device token buckets (pure: the caller passes now_ns). Memory is bounded by max_devices."""

from __future__ import annotations

from gateway.errors import ConfigError


class TokenBuckets:
    """`rate` tokens per second up to `burst`; each message takes one.

    Buckets live in an insertion-ordered dict that is used as an LRU (an entry moves to the end when
    used). When full, the least recently used bucket goes. A device idle for burst/rate seconds has a
    full bucket, which is exactly what a new entry starts with, so evicting it loses nothing; only a
    flood of more than max_devices distinct active ids can make eviction forgive a device early.
    """

    __slots__ = ("_buckets", "_burst", "_max", "_per_ns")

    def __init__(self, rate: float, burst: float, max_devices: int) -> None:
        if not rate > 0 or not burst >= 1 or max_devices < 1:
            raise ConfigError("rate limit needs rate > 0, burst >= 1 and max_devices >= 1")
        self._per_ns = rate / 1e9
        self._burst = float(burst)
        self._max = max_devices
        self._buckets: dict[str, tuple[float, int]] = {}  # device_id -> (tokens, last refill ns)

    def allow(self, device_id: str, now_ns: int) -> bool:
        buckets = self._buckets
        state = buckets.pop(device_id, None)
        if state is None:
            if len(buckets) >= self._max:
                del buckets[next(iter(buckets))]
            tokens = self._burst
        else:
            tokens, last = state
            # A clock that steps back refills nothing instead of draining the bucket.
            if now_ns > last:
                tokens = min(self._burst, tokens + (now_ns - last) * self._per_ns)
            else:
                now_ns = last
        if tokens >= 1.0:
            buckets[device_id] = (tokens - 1.0, now_ns)
            return True
        buckets[device_id] = (tokens, now_ns)
        return False

    def forget(self, device_id: str) -> None:
        self._buckets.pop(device_id, None)

    def __len__(self) -> int:
        return len(self._buckets)
