"""Work on a large body in a helper process, so that the event loop never holds still for it.

msgspec decodes and encodes at hundreds of MB/s, but it never lets go of the GIL: a 10 MB
body with half a million keys takes a couple of hundred milliseconds to decode into objects,
and a thread would hold every other request up just as long. Pure functions of a body that
must decode it whole (an edit of a top-level field, a translation to another dialect) run
inline for bodies up to ``INLINE_MAX_BYTES`` — where a round trip to another process would
cost more than the work — and beyond that in a small process pool, started on first use, one
per gateway process (each ``--workers`` child starts its own).
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

INLINE_MAX_BYTES = 1 << 20  # typed reads and top-level edits: a few ms for 1 MB
WHOLE_MAX_BYTES = 128 << 10  # work that may decode a body into objects whole: up to ~20 ms for 128 KB
WORKERS = 2  # a queue of large bodies must not stall every other large body behind one

T = TypeVar("T")

_pool: ProcessPoolExecutor | None = None


async def run(fn: Callable[..., T], body: bytes, *args: Any, inline_max: int = INLINE_MAX_BYTES) -> T:
    """``fn(body, *args)``: inline for a body up to ``inline_max`` bytes, in a helper process for a larger
    one (work that may decode a body into objects whole: a lower bound). ``fn`` must be a module-level
    function whose arguments, result and exceptions pickle."""
    if len(body) <= inline_max:
        return fn(body, *args)
    global _pool
    if _pool is None:
        # spawn, not fork: the gateway process has threads (aiohttp's resolver, the pool's own)
        _pool = ProcessPoolExecutor(max_workers=WORKERS, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        return await asyncio.get_running_loop().run_in_executor(_pool, fn, body, *args)
    except BrokenProcessPool:  # the helper died (killed, out of memory): a new one next time, this one inline
        _pool = None
        return fn(body, *args)


def _die_with_parent(parent: int) -> None:
    """In the helper: exit when the gateway process does, however it ends (a SIGKILL leaves no time to say so)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends it
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def shutdown() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None
