"""``--workers N``: a worker that dies is restarted with the config the other workers serve — the one
the last reload read — not the one the gateway started with."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket

from tests.support.cli_harness import CLI, assert_no_traceback, free_port
from tests.support.fakes import FakeUpstream
from tests.test_reload import _listening, fresh_get, process_config, start, wait_until


async def test_a_restarted_worker_serves_the_reloaded_config(cli: CLI, fake: FakeUpstream):
    port = free_port()
    gw, _ = await start(cli, process_config(port, fake.url, "one"), "--workers", "2")
    started = next(m for m in gw.messages() if m.startswith("started 2 workers"))
    workers = [int(pid) for pid in re.findall(r"\d+", started.partition("pids")[2])]
    await wait_until(lambda: _listening(gw, 2), what=f"both workers listening\n{gw.output}")

    cli.write("gateway.yaml", process_config(port, fake.url, "one", "two"))
    gw.proc.send_signal(signal.SIGHUP)

    async def every_worker_has_it() -> bool:  # new connections spread over the workers by SO_REUSEPORT
        return all(s == 200 for s in await asyncio.gather(*(fresh_get(port, "/t/two/x") for _ in range(24))))

    await wait_until(every_worker_has_it, what=f"both workers serving target two\n{gw.output}")
    os.kill(workers[0], signal.SIGKILL)
    await wait_until(lambda: _listening(gw, 3), what=f"the worker restarted\n{gw.output}")
    for _ in range(3):  # 72 new connections: the restarted worker takes its share of them
        assert await every_worker_has_it(), gw.output
    assert await asyncio.to_thread(gw.terminate) == 0, gw.output
    assert_no_traceback(gw.stderr)


def test_workers_on_a_port_something_holds_exit_at_once_with_the_reason(cli: CLI):
    """A port another program holds would fail every worker at its start, and the parent restarted them forever
    (one crash line with a traceback a second); a second gateway's workers would bind beside the first's
    (SO_REUSEPORT) and take half its connections. Both: one error, exit 1, no worker started."""
    port = free_port()
    cli.write("gateway.yaml", f"server: {{host: 127.0.0.1, port: {port}}}\ntargets: {{up: {{base_url: 'http://127.0.0.1:9'}}}}\n")
    for reuse in (False, True):
        holder = socket.socket()
        if reuse:  # as another gateway's workers hold it
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        try:
            result = cli.run("--config", "gateway.yaml", "--workers", "2", timeout=20)
        finally:
            holder.close()
        said = result.stdout + result.stderr
        assert result.returncode == 1, said
        assert f"already listens on 127.0.0.1:{port}" in said and "started 2 workers" not in said, said
        assert_no_traceback(said)
