#!/usr/bin/env python3
"""The gateway on the standard asyncio loop in debug mode, reporting every step that holds the loop.

``bench/large_bodies.py --stretches`` runs the gateway through this: asyncio's debug mode logs each
callback or task step longer than ``slow_callback_duration`` ("Executing … took 0.061 seconds"),
which measures what the issue asks — how long one body holds the event loop at a stretch — from
inside the gateway, free of the probe's own scheduling. Debug mode slows Python code down, so a
step it reports under the bound is under it without debug mode too. Arguments are the CLI's.
"""
from __future__ import annotations

import asyncio
import asyncio.base_events
import sys

SLOW_S = 0.02  # report every step longer than this


def main() -> int:
    sys.modules["uvloop"] = None  # type: ignore[assignment]  # the standard loop: it is the one with a debug mode
    asyncio.base_events.BaseEventLoop.slow_callback_duration = SLOW_S
    from gateway.cli import main as gateway_main

    return gateway_main(sys.argv[1:])


if __name__ == "__main__":  # (gateway.offload's helper process imports __main__: it must not start a gateway)
    sys.exit(main())
