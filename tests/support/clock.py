"""A test clock: sleeping returns at once and moves time forward; the RNG is seeded."""

from __future__ import annotations

import asyncio
import random
import time

from gateway.clock import Clock


class FakeClock(Clock):
    """Real time plus an offset: what the gateway waits for is skipped (and recorded in
    ``sleeps``), what really takes time (sockets) still counts."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__(random.Random(seed))
        self.offset = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:  # type: ignore[override]
        return time.monotonic() + self.offset

    def time(self) -> float:  # type: ignore[override]
        return time.time() + self.offset

    async def sleep(self, seconds: float) -> None:  # type: ignore[override]
        self.sleeps.append(seconds)
        self.offset += seconds
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.offset += seconds
