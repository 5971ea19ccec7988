"""``python -m gateway`` / ``reliapi``: flags, environment, config discovery, lifecycle (SPEC §1).

Precedence: flags beat environment variables, which beat the config file.
Without any config file the built-in default (``config/gateway.yaml``) is used.

Lifecycle: SIGTERM/SIGINT stop accepting connections, let in-flight requests and
streams finish for up to ``server.shutdown_grace_s``, then exit 0. SIGHUP reloads
the config (file, environment and flags read again); a bad config is rejected with
its errors logged and the old one keeps serving. ``--workers N`` runs N processes
sharing one port through SO_REUSEPORT; the parent forwards signals and restarts a
worker that dies. A worker asked to reload (``POST /admin/reload``) reloads itself, then
has the parent send SIGHUP to every other worker: each reloads once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from gateway import __version__
from gateway import reload as reloading
from gateway.config import ConfigError, config_warnings, load_config, seed_env
from gateway.config.model import Config
from gateway.config.store import memory_bound_errors, store_url_errors
from gateway.keys import Reloader
from gateway.store.url import parse_store_url
from gateway.workers import run_workers

if TYPE_CHECKING:
    from gateway.edge.server import GatewayRunner
    from gateway.runtime import RuntimeSlot

log = logging.getLogger("reliapi")

LOG_LEVELS = ("debug", "info", "warning", "error")
_DISCOVERED = ("config.yaml",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reliapi", description="ReliAPI reliability gateway for HTTP and LLM APIs.")
    p.add_argument("--config", help="YAML config file (env RELIAPI_CONFIG; default ./config.yaml, else built-in)")
    p.add_argument("--host", help="listen address (env RELIAPI_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (env RELIAPI_PORT; default 8000)")
    p.add_argument("--redis-url", help="store URL, e.g. redis://127.0.0.1:6379/0 (env REDIS_URL; default memory://)")
    p.add_argument("--workers", type=int, default=None, help="processes sharing the port (env RELIAPI_WORKERS; default 1)")
    p.add_argument("--check", action="store_true", help="validate the config and exit (0 valid, 2 invalid)")
    p.add_argument("--healthcheck", action="store_true",
                   help="ask the gateway this config describes for /healthz on its port and exit (0 healthy, 1 not): "
                        "the image's HEALTHCHECK, which follows RELIAPI_PORT, PORT and server.port like the server")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS,
                   help="debug, info, warning or error, in any case (env LOG_LEVEL); default info")
    p.add_argument("--version", action="version", version=f"reliapi {__version__}")
    return p


def _config_path(flag: str | None) -> str | None:
    path = flag or os.environ.get("RELIAPI_CONFIG")
    if path:
        return path
    return next((p for p in _DISCOVERED if Path(p).is_file()), None)


def resolve_config(args: argparse.Namespace) -> tuple[Config, str]:
    """Load the config and apply environment variables and flags on top of it."""
    path = _config_path(args.config)
    config = load_config(path)
    server, store = config.server, config.store
    host = args.host or os.environ.get("RELIAPI_HOST") or server.host
    port = args.port if args.port is not None else _env_int("RELIAPI_PORT", server.port)
    if not 0 <= port <= 65535:  # the file's port is range-checked by the Struct; flags and env are not
        name, origin = ("--port", "command line") if args.port is not None else ("RELIAPI_PORT", "environment")
        raise ConfigError([f"{name}: expected a port number 0-65535, got {port}"], source=origin)
    url = args.redis_url or os.environ.get("REDIS_URL") or store.url
    replaced: list[str] = []
    if url != store.url:  # it replaces the file's url or block
        given = "--redis-url" if args.redis_url else "REDIS_URL"
        if problems := store_url_errors(url, store.key_prefix, where=given):
            raise ConfigError(problems, source="command line" if args.redis_url else "environment")
        block = "sentinel" if store.sentinel is not None else "cluster" if store.cluster is not None else None
        if block is not None:  # said, not done silently: the file's block (and its password, tls) is not used
            replaced.append(f"{given} replaces store.{block} (with its username, password and tls) of the config "
                            f"file: the store is {parse_store_url(url).display}")
        store = msgspec.structs.replace(store, url=url, sentinel=None, cluster=None, username=None, password=None,
                                        tls=None)
        if problems := memory_bound_errors(store):  # the file's memory bound, now for another store
            raise ConfigError([f"{given} replaces the file's memory:// store: " + problems[0]],
                              source="command line" if args.redis_url else "environment")
    config = msgspec.structs.replace(
        config,
        server=msgspec.structs.replace(server, host=host, port=port),
        store=store,
    )
    try:  # the seed documents' variables (PORT, DEFAULT_PROVIDER, …): after RELIAPI_*, before flags win
        config, applied, warnings = seed_env.apply(
            config, os.environ, port_given=args.port is not None or "RELIAPI_PORT" in os.environ)
    except seed_env.SeedEnvError as e:
        raise ConfigError([str(e)], source="environment") from None
    seed_notes[:] = [applied, warnings, replaced]
    return config, path or "<built-in default>"


# the last resolve_config's seed variables (applied, warnings), and a store block REDIS_URL / --redis-url replaced
seed_notes: list[list[str]] = [[], [], []]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError([f"{name}: expected an integer, got {value!r}"], source="environment") from None


def _check_store(config: Config) -> str | None:
    """``--check`` asks a Redis store too: a wrong password, an untrusted certificate or a cluster URL on a
    single node is an error; a store that does not answer now is only a warning (it may be up at start)."""
    from gateway.store import StoreMisconfigured, probe_store

    if config.store.url.startswith("memory:"):
        return None
    try:
        problem = asyncio.run(probe_store(config.store.url, key_prefix=config.store.key_prefix))
    except StoreMisconfigured as e:
        return f"{config.store.where}: {e}"
    if problem is not None:
        print(f"warning: {config.store.where}: not reachable now, not checked further: {problem}", file=sys.stderr)
    return None


def healthcheck(config: Config) -> int:
    """GET /healthz of the gateway listening where ``config`` says (a wildcard address: over loopback)."""
    import urllib.request

    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}.get(config.server.host,
                                                                                       config.server.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{config.server.port}/healthz"
    try:  # (no proxy: an HTTP_PROXY in the environment must not answer for the gateway)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as resp:
            ok = resp.status == 200
    except OSError as e:  # refused, timed out, or an HTTP error status
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = args.log_level or os.environ.get("LOG_LEVEL", "info").lower()
    if level not in LOG_LEVELS:
        print(f"LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, got {level!r}", file=sys.stderr)
        return 2
    try:
        config, source = resolve_config(args)
    except ConfigError as e:
        print(f"invalid config ({e.source}):", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    if args.config is None and source != "<built-in default>":
        # a reload reads the file the gateway started from: one found as ./config.yaml and gone when SIGHUP comes
        # (a deploy that moves it aside) is an error that keeps the running config — never the built-in default,
        # open to anyone, in its place
        args.config = source
    applied, env_warnings, replaced = seed_notes
    if args.healthcheck:
        return healthcheck(config)
    try:  # (checked before --check answers: a setting --check passes, the server must not then refuse)
        workers = args.workers if args.workers is not None else _env_int("RELIAPI_WORKERS", 1)
    except ConfigError as e:
        print(e.errors[0], file=sys.stderr)
        return 2
    if workers < 1:
        print("--workers: must be at least 1", file=sys.stderr)
        return 2
    if args.check:
        for line in [*applied, *replaced]:
            print(f"environment: {line}", file=sys.stderr)
        for line in [*env_warnings, *config_warnings(config)]:
            print(f"warning: {line}", file=sys.stderr)
        problem = _check_store(config)
        if problem is not None:
            print(f"invalid config ({source}):\n  {problem}", file=sys.stderr)
            return 2
        print(f"config OK: {source} ({len(config.targets)} targets: {', '.join(config.targets) or 'none'})")
        return 0

    from gateway.observe.logs import setup_logging

    setup_logging(level, pid=workers > 1)
    if applied:
        log.info("environment: %s", "; ".join(applied), extra={"fields": {"seed_environment": applied}})
    for line in [*env_warnings, *replaced]:
        log.warning("environment: %s", line)
    for line in config_warnings(config):
        log.warning("config: %s", line)
    if workers > 1:
        if config.store.url.startswith("memory://"):
            log.warning("--workers %d with the memory store: cache, limits and circuits are per process; "
                        "use redis:// to share them", workers)
        return run_workers(config, source, workers, lambda: resolve_config(args), serve)
    return serve(config, source, reuse_port=False, reload=lambda: resolve_config(args))


def serve(config: Config, source: str, *, reuse_port: bool, reload: Reloader) -> int:
    try:
        import uvloop
    except ImportError:  # optional: the gateway runs on the default loop too
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    runner(_serve(config, source, reuse_port=reuse_port, reload=reload))
    return 0


async def _serve(config: Config, source: str, *, reuse_port: bool, reload: Reloader) -> None:
    from gateway import offload
    from gateway.app import create_app
    from gateway.edge.server import GatewayRunner
    from gateway.keys import RUNTIME
    from gateway.observe.logs import use_scrubber

    app = create_app(config, reload=reload)
    use_scrubber(app[RUNTIME].current.scrub)  # the gateway's own log lines never carry a configured key
    import gc
    gc.collect()
    gc.freeze()  # everything built at startup is permanent: keep it out of every future collection
    # The grace period is waited out below (``_drain``); aiohttp's own shutdown then gives what still runs a moment
    # to end (a stream cut at the end of the grace period sends its in-band error event) before it cancels it.
    runner = GatewayRunner(app, handle_signals=False, shutdown_timeout=_AFTER_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_port=reuse_port or None,
                       backlog=1024)
    try:
        await site.start()
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", config.server.host, config.server.port, e.strerror)
        await runner.cleanup()
        raise SystemExit(1) from None
    log.info(
        "reliapi %s listening on http://%s:%d (config: %s; targets: %s; store: %s)", __version__,
        config.server.host, config.server.port, source, ", ".join(config.targets),
        app[RUNTIME].current.store.url_for_display,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.create_task(_reload(app, config, reload))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if reloading.hup_pending:  # a SIGHUP came while this worker was starting: it was kept for now
        reloading.hup_pending = False
        on_sighup()
    await stop.wait()
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # no reload while draining (and not SIGHUP's default: exit)
    grace_s = app[RUNTIME].current.config.server.shutdown_grace_s  # (a reload's, not the start's)
    log.info("shutting down: draining in-flight requests for up to %gs", grace_s)
    await _drain(runner, app[RUNTIME], grace_s)
    await runner.cleanup()
    offload.shutdown()
    log.info("stopped")
    sys.stdout.flush()


_AFTER_GRACE_S = 0.5  # after the grace period: for cut streams to send their last event, then aiohttp cancels


async def _drain(runner: GatewayRunner, slot: RuntimeSlot, grace_s: float) -> None:
    """Stop taking connections (idle keep-alive ones are closed, busy ones after their request), let the requests
    in flight finish for up to ``grace_s``, then end every stream still open with its in-band error event and answer
    every request still waiting 503 (retry elsewhere) — never a connection dropped without a word."""
    slot.stopping = True  # (answers from now on say Connection: close: a client does not reuse a closing connection)
    for site in list(runner.sites):
        await site.stop()
    await asyncio.sleep(0)  # (requests read just before have started)
    server = runner.server
    if server is not None:  # idle connections close; a request still arriving (its body too) is read and answered
        server.close_idle() if hasattr(server, "close_idle") else server.pre_shutdown()
    try:
        async with asyncio.timeout(grace_s):
            await slot.drain()
    except TimeoutError:
        slot.cut()


async def _reload(app: web.Application, started: Config, reload: Reloader) -> None:
    try:
        await reloading.reload_config(app)
    except Exception as e:  # a bug: said once, by its kind — its message may quote the new file, keys and all
        log.error("reload failed (%s), the running config stays", type(e).__name__)
