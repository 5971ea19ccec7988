"""``--workers N``: the parent process of N servers sharing one port (SO_REUSEPORT) — it checks the port once,
forwards signals, hands reloads on, and restarts a worker that dies (``gateway.cli`` runs it)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from gateway import reload as reloading
from gateway.config import ConfigError
from gateway.config.model import Config
from gateway.keys import Reloader

log = logging.getLogger("reliapi")

Serve = Callable[..., int]  # ``gateway.cli.serve``: one server process, run in each worker


def _port_taken(host: str, port: int) -> str | None:
    """Why N workers cannot listen on ``host:port``, or None. The workers share the port (SO_REUSEPORT), so a
    second gateway started on it would bind beside the first and get half of its connections (two configs, an
    auth policy for some requests only), and a port held by another program would fail each worker at its start,
    again and again: found here, once, before any is started."""
    probe = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((probe, port), timeout=0.5):
            return f"something already listens on {host}:{port} (another gateway?): stop it, or choose another port"
    except OSError:
        pass
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                   flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind(address)
    except OSError as e:
        return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


_GIVE_UP_AFTER = 5  # workers in a row that die within a second of their start: the parent stops, exit 1


def run_workers(config: Config, source: str, workers: int, reload: Reloader, serve: Serve) -> int:
    """The parent of N workers: forwards signals, and restarts a worker that dies with the config the
    others serve (read again at each reload, as they do; a file they rejected is not taken either)."""
    taken = _port_taken(config.server.host, config.server.port)
    if taken is not None:
        log.error("%s", taken)
        return 1
    children: dict[int, int] = {}
    started: dict[int, float] = {}  # pid → when it was started (monotonic)
    latest = [config, source]
    stopping = False
    parent = os.getpid()
    asks_r, asks_w = os.pipe()  # workers that reloaded themselves name themselves here (reload_all_workers)
    os.set_blocking(asks_r, False)

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child: a plain single-process server on the shared port
            reloading.supervisor = (parent, asks_w)
            os.close(asks_r)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, reloading.defer_hup)  # until the event loop takes it: not fatal
            code = 1
            try:
                code = serve(latest[0], latest[1], reuse_port=True, reload=reload)
            except SystemExit as e:  # it said why itself ("cannot listen on …"): no traceback of the exit
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                log.exception("worker %d crashed", os.getpid())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = slot
        started[pid] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def hup(skip: int | None = None) -> None:
        for pid in list(children):
            if pid != skip:
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def read_again() -> None:
        try:
            latest[:] = reload()
        except ConfigError:
            pass  # the workers reject it too, and say why; a restarted worker gets the config they keep

    def forward_hup(signum: int, _frame: object) -> None:
        if stopping:  # the workers are draining: no reload now
            return
        hup()
        read_again()

    def forward_ask(signum: int, _frame: object) -> None:  # a worker reloaded itself: the others' turn
        for asker in reloading.askers(asks_r):
            hup(skip=asker)
        read_again()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward_hup)
    signal.signal(signal.SIGUSR1, forward_ask)
    for slot in range(workers):
        spawn(slot)
    log.info("started %d workers (pids %s)", workers, ", ".join(map(str, children)))
    last_restart = 0.0
    early = 0  # workers in a row that died within a second of their start
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, None)
        born = started.pop(pid, 0.0)
        if slot is None or stopping:
            continue
        early = early + 1 if time.monotonic() - born < 1.0 else 0
        if early >= _GIVE_UP_AFTER:  # it cannot start (the port, the store, …): a restart loop helps nobody
            log.error("%d workers in a row exited right after they started; stopping (see their errors above)",
                      early)
            forward(signal.SIGTERM, None)
            for other in list(children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(other, 0)
            return 1
        log.error("worker %d exited (status %d); restarting it", pid, os.waitstatus_to_exitcode(status))
        if time.monotonic() - last_restart < 1:
            time.sleep(1)  # a worker that dies at once must not turn into a fork loop
        last_restart = time.monotonic()
        spawn(slot)
    return 0
