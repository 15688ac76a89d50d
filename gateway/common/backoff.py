"""Reconnect delays: exponential with full jitter, so a fleet that lost its broker does not return in step."""

from __future__ import annotations

import random


class Backoff:
    def __init__(
        self,
        initial_s: float = 0.2,
        max_s: float = 30.0,
        factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self._initial = initial_s
        self._max = max_s
        self._factor = factor
        self._attempt = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def next_delay(self) -> float:
        ceiling = min(self._max, self._initial * self._factor**self._attempt)
        self._attempt += 1
        return self._initial / 2 + self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0
