"""Reading the config again while serving (SIGHUP, ``POST /admin/reload``), and under
``--workers N`` making one worker's reload reach every other worker, each once.

A worker that reloaded itself (``POST /admin/reload`` reached it) writes its pid on a pipe its
parent reads and sends the parent SIGUSR1; the parent sends SIGHUP to every other worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import struct
from typing import Any

from aiohttp import web

from gateway.config import ConfigError, config_warnings
from gateway.config.model import ServerConfig
from gateway.keys import RELOADER, RUNTIME
from gateway.observe.logs import use_scrubber
from gateway.store import StoreMisconfigured

log = logging.getLogger("reliapi")


async def reload_config(app: web.Application) -> dict[str, Any]:
    """Read the config again and swap it in. A config that does not validate is rejected with
    its errors and the running one stays. State in the store (circuits, budgets, cache, usage)
    and the observatory's counters survive; a new listen address needs a restart.
    Returns ``{"reloaded": bool, "errors": [...], "warnings": [...], "source": ..., "targets": [...]}``."""
    reload = app[RELOADER]
    if reload is None:
        return {"reloaded": False, "errors": ["this gateway was not started from a config it can read again"],
                "warnings": [], "source": None, "targets": []}
    slot = app[RUNTIME]
    started, slot_store = slot.current.config, slot.current.store
    try:  # read and checked in a thread: a large config takes a while (≈ 0.25 s for 300 tenants), traffic goes on
        config, source = await asyncio.to_thread(reload)
    except ConfigError as e:
        log.error("reload rejected, the running config stays: %s", "; ".join(e.errors),
                  extra={"fields": {"errors": e.errors}})
        return {"reloaded": False, "errors": list(e.errors), "warnings": [], "source": None,
                "targets": sorted(started.targets)}
    warnings = list(config_warnings(config))
    if (config.server.host, config.server.port) != (started.server.host, started.server.port):
        warnings.append("a new listen address takes effect only after a restart")
    if _listener(config.server) != _listener(started.server):
        warnings.append("new server.header_timeout_s, keepalive_timeout_s or max_connections take effect "
                        "only after a restart")
    if config.server.cors != started.server.cors:
        warnings.append("a new server.cors takes effect only after a restart")
    for line in warnings:
        log.warning("config: %s", line)
    try:
        new = await slot.reload(config)
    except StoreMisconfigured as e:
        log.error("reload rejected, the running config stays: %s: %s", config.store.where, e)
        return {"reloaded": False, "errors": [f"{config.store.where}: {e}"], "warnings": warnings, "source": source,
                "targets": sorted(started.targets)}
    use_scrubber(new.scrub)  # the new config's keys
    if new.store is not slot_store and not config.store.url.startswith("memory:"):
        problem = await _unreachable(config)  # (in service all the same: it may come up; /readyz says so meanwhile)
        if problem is not None:
            warnings.append(f"{config.store.where}: not reachable now: {problem}")
            log.warning("config: %s", warnings[-1])
    store = "" if new.store is slot_store else f"; store now {new.store.url_for_display}"
    log.info("config reloaded from %s (targets: %s%s)", source, ", ".join(config.targets), store)
    return {"reloaded": True, "errors": [], "warnings": warnings, "source": source, "targets": list(config.targets)}


async def _unreachable(config: Any) -> str | None:
    """Why the new store does not answer now (None: it does), as ``--check`` says it."""
    from gateway.store import probe_store

    try:
        return await probe_store(config.store.url, key_prefix=config.store.key_prefix)
    except StoreMisconfigured as e:
        return str(e)


def _listener(server: ServerConfig) -> tuple[Any, ...]:
    return server.header_timeout_s, server.keepalive_timeout_s, server.max_connections


# In a worker of --workers N: the parent, which forwards SIGHUP to all, and the pipe a worker names
# itself on when it asks for that (``reload_all_workers``); set by the CLI when it forks the worker.
supervisor: tuple[int, int] | None = None
# A SIGHUP that reaches a worker before its event loop handles the signal (just after the fork): kept, and
# acted on once the handler is in (``gateway.cli``), instead of the default action, which ends the process.
hup_pending = False
_PID = struct.Struct("=i")  # one asking worker's pid on that pipe (a write this small is atomic)


def reload_all_workers() -> bool:
    """In a worker that has just reloaded itself (``POST /admin/reload``): have the parent send
    SIGHUP to every other worker, so that the reload reaches all, each once. False when this
    process is no worker."""
    if supervisor is None:
        return False
    parent, asks = supervisor
    if os.getppid() != parent:  # an orphan has a new parent
        return False
    try:
        os.write(asks, _PID.pack(os.getpid()))
        os.kill(parent, signal.SIGUSR1)
    except OSError:
        return False
    return True


def defer_hup(signum: int, _frame: object) -> None:
    global hup_pending
    hup_pending = True


def askers(asks: int) -> list[int]:
    """The workers that asked for a reload since the last look (the parent's end never blocks)."""
    data = b""
    while True:
        try:
            chunk = os.read(asks, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return [pid for (pid,) in _PID.iter_unpack(data[: len(data) - len(data) % _PID.size])]
