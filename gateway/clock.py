"""Time and chance, injectable: every policy that waits, times or draws a random number uses one ``Clock``.

``monotonic`` times local state (circuit cooldowns, deadlines, backoff); ``time`` is wall
time, used only where several gateway instances must agree through the store (a shared
circuit's reopen time, a key's cooldown). Tests pass a clock whose ``sleep`` returns at
once and moves virtual time forward, and a seeded RNG, so retry schedules and breaker
timers are checked exactly without real waiting (stamina's ``set_testing``; Polly's
``FakeTimeProvider``).
"""

from __future__ import annotations

import asyncio
import random
import time


class Clock:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.random = (rng or random.Random()).random  # uniform [0, 1)

    # the C functions themselves, not Python wrappers around them: read on every request
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    @staticmethod
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)
