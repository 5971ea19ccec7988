"""Config reload (SPEC §1 SIGHUP, §2 ``POST /admin/reload``).

A valid new config is swapped in without a restart; an invalid one is rejected with its
errors (logged on SIGHUP, in the answer on POST) and the running one keeps serving. State
survives a reload: an open circuit stays open, a tenant's spend still counts against its
budget, the Prometheus counters keep counting. First in-process (an app built with a
reloader reading a file, as the CLI builds it), then the real ``python -m gateway``, one
process and ``--workers 2`` (a reload asked of one worker reaches every worker, once each).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import create_app
from gateway.config import parse_config
from gateway.keys import RUNTIME
from gateway.store.memory import MemoryStore
from policies.usage import day_of, usage_key
from tests.support.circuits import COOLDOWN, assert_circuit_open_openai, chat, open_circuit
from tests.support.circuits import config as circuit_config
from tests.support.cli_harness import CLI, INVALID_ERRORS, INVALID_YAML, Gateway, assert_no_traceback, free_port
from tests.support.config import GatewayConfig
from tests.support.fakes import FakeUpstream
from tests.support.gateway import GatewayTestServer
from tests.support.stores import drop, new_prefix, redis_store


@pytest.fixture
def reloadable(aiohttp_client: Any, tmp_path: Path):
    """``await reloadable(yaml)`` → (client, path): a gateway whose reload reads ``path`` again."""

    async def make(config: GatewayConfig | str, *, env: dict[str, str] | None = None, **kwargs: Any) -> tuple[Any, Path]:
        env = env or {}
        text = str(config)
        path = tmp_path / "gateway.yaml"
        path.write_text(text)

        def reload() -> tuple[Any, str]:
            return parse_config(path.read_text(), source=str(path), env=env), str(path)

        app = create_app(parse_config(text, env=env), env=env, reload=reload, **kwargs)
        return await aiohttp_client(GatewayTestServer(app)), path

    return make


def assert_every_error(errors: list[str]) -> None:
    for line in INVALID_ERRORS:
        assert any(line in e for e in errors), errors


async def post_reload(client: Any) -> tuple[int, dict]:
    async with client.post("/admin/reload") as resp:
        return resp.status, await resp.json()


async def status_of(client: Any, path: str) -> int:
    async with client.get(path) as resp:
        await resp.read()
        return resp.status


# =============================================================== POST /admin/reload


async def test_post_reload_swaps_in_a_valid_config_and_rejects_an_invalid_one(fake, reloadable, make_config):
    cfg = make_config(fake.url, shutdown_grace_s=0).rest()
    client, path = await reloadable(cfg)
    assert await status_of(client, "/t/two/x") == 404

    cfg.target("two", f"{fake.url}/two").write(path)
    status, body = await post_reload(client)
    assert status == 200 and body["success"] is True
    assert body["data"]["reloaded"] is True and body["data"]["errors"] == []
    assert body["data"]["targets"] == ["rest", "two"] and body["data"]["source"] == str(path)
    assert body["data"]["all_workers"] is False  # a single process: nobody else to tell
    assert await status_of(client, "/t/two/x") == 200 and fake.requests[-1].path_qs == "/two/x"

    path.write_text(INVALID_YAML)
    status, body = await post_reload(client)
    assert status == 422 and body["success"] is False
    assert body["error"]["code"] == "invalid_config" and body["error"]["type"] == "client_error"
    assert_every_error(body["error"]["errors"])
    for line in INVALID_ERRORS:
        assert line in body["error"]["message"]
    assert await status_of(client, "/t/two/x") == 200  # the running config stays
    async with client.get("/readyz") as resp:
        assert (await resp.json())["targets"] == ["rest", "two"]

    password = "userinfo-SECRET-7777"  # an error quoting a URL must not show its password
    path.write_text(f"targets: {{t: {{base_url: 'http://svc:{password}@127.0.0.1:9/api', bogus: 1}}}}")
    status, body = await post_reload(client)
    assert status == 422 and any("targets.t.bogus" in e for e in body["error"]["errors"])
    assert password not in str(body)

    path.write_text("targets: [")  # not even YAML
    status, body = await post_reload(client)
    assert status == 422 and body["error"]["errors"] and await status_of(client, "/t/rest/x") == 200


async def test_the_new_config_is_read_off_the_event_loop(fake, aiohttp_client, make_config):
    """Reading and checking a large config takes a while (≈ 0.25 s for 300 tenants): not on the loop every request
    and stream waits on."""
    import threading

    text = str(make_config(fake.url).rest())
    readers: list[int] = []

    def reload() -> tuple[Any, str]:
        readers.append(threading.get_ident())
        return parse_config(text), "test"

    client = await aiohttp_client(GatewayTestServer(create_app(parse_config(text), reload=reload)))
    status, body = await post_reload(client)
    assert status == 200 and body["data"]["reloaded"] is True
    assert readers and readers[0] != threading.get_ident()


async def test_a_reload_onto_a_store_that_does_not_answer_says_so(fake, reloadable, make_config):
    """As --check warns of it: the reload takes (the store may come up), and the answer and the log say it is down."""
    cfg = make_config(fake.url, shutdown_grace_s=0).rest()
    client, path = await reloadable(cfg)
    cfg.store(url=f"redis://127.0.0.1:{free_port()}/0").write(path)
    status, body = await post_reload(client)
    assert status == 200 and body["data"]["reloaded"] is True
    assert any("not reachable now" in w for w in body["data"]["warnings"]), body


# =============================================================== state survives


async def open_transitions(client: Any) -> float:
    text = await (await client.get("/metrics")).text()
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("reliapi_circuit_breaker_transitions_total{") and 'to="open"' in line]
    return sum(found)


async def test_an_open_circuit_stays_open_across_a_reload(fake, reloadable, clock):
    cfg = circuit_config(fake.url)
    client, path = await reloadable(cfg, clock=clock, store=MemoryStore(clock=clock.time))
    await open_circuit(client, fake)
    old = client.app[RUNTIME].current

    cfg.target("two", f"{fake.url}/two").write(path)
    assert (await post_reload(client))[0] == 200
    assert client.app[RUNTIME].current is not old  # a new runtime, new breakers

    assert await open_transitions(client) == 1  # adopting the shared state on reload is not a transition
    calls = len(fake.requests)
    assert_circuit_open_openai(*await chat(client))  # the same cooldown, not a fresh one
    assert len(fake.requests) == calls
    clock.advance(COOLDOWN + 1)
    assert (await chat(client))[0] == 200 and len(fake.requests) == calls + 1  # the probe closes it


async def test_an_open_circuit_stays_open_across_a_reload_on_redis(fake, reloadable):
    store = await redis_store(new_prefix())
    try:
        cfg = circuit_config(fake.url)
        client, path = await reloadable(cfg, store=store)
        await open_circuit(client, fake)
        cfg.target("two", f"{fake.url}/two").write(path)
        for _ in range(3):  # at once after each reload, not once the new runtime caught up
            assert (await post_reload(client))[0] == 200
            status, headers, data = await chat(client)
            assert_circuit_open_openai(status, headers, data, retry_after=(COOLDOWN - 5, COOLDOWN))
        assert len(fake.requests) == 2
        assert await open_transitions(client) == 1  # adopting the shared state on reload is not a transition
    finally:
        await drop(store)


PROMPT = "x" * 4000
BODY = {"model": "gpt-4o-mini", "max_tokens": 1000, "messages": [{"role": "user", "content": PROMPT}]}
# what a request reserves: the most it can cost (a token per body byte + framing, all of max_tokens)
ESTIMATE = ((len(json.dumps(BODY).encode()) + 4 + 3) * 0.15 + 1000 * 0.60) / 1e6
ACTUAL = (5 * 0.15 + 4 * 0.60) / 1e6  # what it costs once the fake's usage (5 + 4 tokens) is read
ACME = {"Authorization": "Bearer acme-key-123456"}


async def test_a_tenants_spend_still_counts_against_its_budget_after_a_reload(fake, reloadable, make_config):
    store = MemoryStore()
    # room for two requests: each reserves ESTIMATE and settles to ACTUAL; a third does not fit
    cfg = make_config(fake.url, default_target="up", shutdown_grace_s=0).up()
    cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": ESTIMATE + 1.5 * ACTUAL})
    client, path = await reloadable(cfg, store=store)
    body = BODY
    key = f"spend:{{tenant:acme}}:d:{time.strftime('%Y%m%d', time.gmtime())}"
    for _ in range(2):
        async with client.post("/v1/chat/completions", json=body, headers=ACME) as resp:
            assert resp.status == 200
    for _ in range(300):  # settled in the background
        if float(await store.get(key) or 0) == pytest.approx(2 * ACTUAL, abs=1e-12):
            break
        await asyncio.sleep(0.01)
    assert float(await store.get(key) or 0) == pytest.approx(2 * ACTUAL, abs=1e-12)

    cfg.target("two", f"{fake.url}/two").write(path)
    assert (await post_reload(client))[0] == 200

    async with client.post("/v1/chat/completions", json=body, headers=ACME) as resp:
        assert resp.status == 402 and (await resp.json())["error"]["code"] == "budget_exhausted"
    assert len(fake.requests) == 2


async def test_usage_counted_before_a_reload_is_written_when_the_gateway_stops_soon_after(fake, reloadable,
                                                                                          make_config):
    """The runtime a reload retires still holds the last second's usage counts: a shutdown
    inside its grace period closes it (writing them) rather than dropping it."""
    store = MemoryStore()
    cfg = make_config(fake.url, default_target="up", shutdown_grace_s=30).tenant("acme", api_key="acme-key-123456").up()
    client, path = await reloadable(cfg, store=store)
    for _ in range(2):
        async with client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []},
                               headers={**ACME, "X-ReliAPI-User": "dana"}) as resp:
            assert resp.status == 200
    cfg.target("two", f"{fake.url}/two").write(path)
    assert (await post_reload(client))[0] == 200
    await client.close()
    row = await store.hgetall(usage_key(day_of(time.time()), "acme", "dana", "up", "gpt-4o-mini"))
    assert row.get("requests") == 2


def requests_total(metrics: str, target: str) -> float:
    found = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith("reliapi_requests_total{") and f'target="{target}"' in line]
    return sum(found)


async def test_metrics_counters_keep_counting_across_a_reload(fake, reloadable, make_config):
    cfg = make_config(fake.url, shutdown_grace_s=0).rest()
    client, path = await reloadable(cfg)
    for _ in range(3):
        assert await status_of(client, "/t/rest/x") == 200
    async with client.get("/metrics") as resp:
        assert requests_total(await resp.text(), "rest") == 3

    cfg.target("two", f"{fake.url}/two").write(path)
    assert (await post_reload(client))[0] == 200
    assert await status_of(client, "/t/rest/x") == 200
    async with client.get("/metrics") as resp:
        assert requests_total(await resp.text(), "rest") == 4  # not reset to 1


# =============================================================== the real process


def process_config(port: int, url: str, *targets: str) -> GatewayConfig:
    """On ``port``; a plain-HTTP target ``name`` at ``{url}/{name}`` for each name."""
    cfg = GatewayConfig(url, port=port, shutdown_grace_s=0)
    for name in targets:
        cfg.target(name, f"{url}/{name}")
    return cfg


async def wait_until(check, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def fresh_get(port: int, path: str) -> int:
    """One request on a new connection (under --workers, any worker may take it)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            await resp.read()
            return resp.status


async def post(port: int, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, await resp.json()


async def start(cli: CLI, config: GatewayConfig, *args: str) -> tuple[Gateway, int]:
    port = config.data["server"]["port"]
    cli.write("gateway.yaml", config)
    gw = cli.start("--config", "gateway.yaml", *args, port=port)
    await asyncio.to_thread(gw.wait_healthy)
    return gw, port


async def test_sighup_and_post_reload_in_a_running_gateway(cli: CLI, fake: FakeUpstream):
    port = free_port()
    gw, _ = await start(cli, process_config(port, fake.url, "one"))
    assert await fresh_get(port, "/t/two/x") == 404

    # SIGHUP: a new target answers without a restart
    cli.write("gateway.yaml", process_config(port, fake.url, "one", "two"))
    gw.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: _answers(port, "/t/two/x"), what=f"target two after SIGHUP\n{gw.output}")
    assert fake.requests[-1].path_qs == "/two/x"

    # SIGHUP with a broken file: the log has every error, the running config keeps serving
    cli.write("gateway.yaml", INVALID_YAML)
    gw.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: _logged(gw, "reload rejected"), what="the rejection in the log")
    rejected = next(m for m in gw.messages() if "reload rejected" in m)
    for line in INVALID_ERRORS:
        assert line in rejected, gw.output
    assert await fresh_get(port, "/t/two/x") == 200 and gw.proc.poll() is None

    # POST /admin/reload: the errors come back in the answer …
    status, body = await post(port, "/admin/reload")
    assert status == 422
    assert_every_error(body["error"]["errors"])
    assert await fresh_get(port, "/t/two/x") == 200
    # … and a fixed file is in service when the answer arrives
    cli.write("gateway.yaml", process_config(port, fake.url, "one", "three"))
    status, body = await post(port, "/admin/reload")
    assert status == 200 and body["data"]["targets"] == ["one", "three"], body
    assert await fresh_get(port, "/t/three/x") == 200 and await fresh_get(port, "/t/two/x") == 404

    assert await asyncio.to_thread(gw.terminate) == 0, gw.output
    assert_no_traceback(gw.stderr)


async def test_a_reload_reads_the_config_yaml_it_started_from_and_refuses_when_it_is_gone(cli: CLI, fake: FakeUpstream):
    """Started from ./config.yaml (the image's way): a SIGHUP while it is moved aside keeps the running config —
    falling back to the built-in default would have dropped every tenant's key check."""
    port = free_port()
    cfg = process_config(port, fake.url, "one").tenant("paying", api_key="paying-key-0001")
    cli.write("config.yaml", cfg)
    gw = cli.start(port=port)
    await asyncio.to_thread(gw.wait_healthy)
    assert await fresh_get(port, "/t/one/x") == 401
    (cli.cwd / "config.yaml").rename(cli.cwd / "config.yaml.tmp")
    gw.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: _logged(gw, "reload rejected"), what=f"the rejection in the log\n{gw.output}")
    assert await fresh_get(port, "/t/one/x") == 401  # the tenants still hold
    assert not await _logged(gw, "built-in default")
    assert await asyncio.to_thread(gw.terminate) == 0, gw.output


async def _answers(port: int, path: str) -> bool:
    return await fresh_get(port, path) == 200


async def _logged(gw: Gateway, text: str) -> bool:
    return any(text in m for m in gw.messages())


def reloads_by_worker(gw: Gateway, message: str = "config reloaded") -> Counter[int]:
    return Counter(r["pid"] for r in gw.log_records() if str(r.get("message", "")).startswith(message))


async def test_post_reload_to_one_worker_reloads_every_worker_once(cli: CLI, fake: FakeUpstream):
    port = free_port()
    gw, _ = await start(cli, process_config(port, fake.url, "one"), "--workers", "2")
    started = next(m for m in gw.messages() if m.startswith("started 2 workers"))
    workers = [int(pid) for pid in re.findall(r"\d+", started.partition("pids")[2])]
    assert len(workers) == 2, started
    # /healthz answered by one worker is not both: a SIGHUP before a worker's handler is in kills it
    await wait_until(lambda: _listening(gw, 2), what=f"both workers listening\n{gw.output}")

    cli.write("gateway.yaml", process_config(port, fake.url, "one", "two"))
    status, body = await post(port, "/admin/reload")
    assert status == 200 and body["data"]["all_workers"] is True, body

    async def every_worker_has_it() -> bool:
        # 24 new connections spread over both workers by SO_REUSEPORT: all must know "two"
        statuses = await asyncio.gather(*(fresh_get(port, "/t/two/x") for _ in range(24)))
        return all(s == 200 for s in statuses)

    await wait_until(every_worker_has_it, what=f"both workers serving target two\n{gw.output}")
    await asyncio.sleep(0.5)  # time for a second reload of any worker to show in the log
    assert reloads_by_worker(gw) == {pid: 1 for pid in workers}, gw.output  # the asked one too: once

    gw.proc.send_signal(signal.SIGHUP)  # SIGHUP to the parent: every worker, once more
    await wait_until(lambda: _reloaded(gw, 4), what=f"two more reloads\n{gw.output}")
    await asyncio.sleep(0.5)
    assert reloads_by_worker(gw) == {pid: 2 for pid in workers}, gw.output

    cli.write("gateway.yaml", INVALID_YAML)  # a bad file: rejected, and nobody else is told
    status, body = await post(port, "/admin/reload")
    assert status == 422
    assert_every_error(body["error"]["errors"])
    await asyncio.sleep(0.5)
    assert sum(reloads_by_worker(gw, "reload rejected").values()) == 1, gw.output
    assert all(s == 200 for s in await asyncio.gather(*(fresh_get(port, "/t/two/x") for _ in range(8))))
    assert await asyncio.to_thread(gw.terminate) == 0, gw.output
    assert_no_traceback(gw.stderr)


async def _listening(gw: Gateway, workers: int) -> bool:
    return sum(" listening on " in m for m in gw.messages()) >= workers


async def _reloaded(gw: Gateway, times: int) -> bool:
    return sum(reloads_by_worker(gw).values()) >= times


# =============================================================== server.max_body_mb


async def body_statuses(client: Any) -> dict[str, int]:
    """A 1.5 MB body on each route that reads one: the status of each."""
    pad = "x" * (3 << 19)  # 1.5 MiB
    requests = {
        "/v1": ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": pad}]}),
        "/t": ("/t/rest/upload", {"pad": pad}),
        "/proxy/http": ("/proxy/http", {"target": "rest", "method": "POST", "path": "/upload", "body": {"pad": pad}}),
    }
    statuses = {}
    for route, (path, body) in requests.items():
        async with client.post(path, json=body) as resp:
            await resp.read()
            statuses[route] = resp.status
    return statuses


async def test_a_reloaded_max_body_mb_governs_every_route(fake, reloadable, make_config):
    cfg = make_config(fake.url, max_body_mb=1, shutdown_grace_s=0).up("llm").rest()
    client, path = await reloadable(cfg)
    assert await body_statuses(client) == {"/v1": 413, "/t": 413, "/proxy/http": 413}

    cfg.server(max_body_mb=2).write(path)
    assert (await post_reload(client))[0] == 200
    assert await body_statuses(client) == {"/v1": 200, "/t": 200, "/proxy/http": 200}
    assert len(fake.requests) == 3

    cfg.server(max_body_mb=1).write(path)
    assert (await post_reload(client))[0] == 200
    assert await body_statuses(client) == {"/v1": 413, "/t": 413, "/proxy/http": 413}
    assert len(fake.requests) == 3


# =============================================================== streams across a reload


async def test_a_stream_running_when_the_config_is_reloaded_finishes_on_the_old_config(fake, reloadable, make_config):
    """The old runtime stays until its last request ends, however far past ``shutdown_grace_s``: a reload never
    cuts a stream (it used to close the old pools after the grace period, and the stream hung with no end)."""
    cfg = make_config(fake.url, default_target="up", shutdown_grace_s=0.1).up()
    client, path = await reloadable(cfg)
    old = client.app[RUNTIME].current
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with client.post("/v1/chat/completions", json=body,
                           headers={"X-Fake-Chunks": "8", "X-Fake-Interval-Ms": "100"}) as resp:
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        status, _ = await post_reload(client)
        assert status == 200 and client.app[RUNTIME].current is not old
        rest = await asyncio.wait_for(resp.content.read(), 10)  # 0.8 s of stream: well past the grace period
    assert rest.rstrip().endswith(b"data: [DONE]") and (first + rest).count(b'"content":"tok') == 8  # all of it
    await asyncio.sleep(0.05)
    assert old.active == 0 and all(t.transport._session is None for t in old.targets.values())  # then closed


async def test_an_upstream_stream_cut_by_closing_its_transport_ends_in_band_not_never(fake, gateway, make_config):
    """A transport closed under a running stream (the gateway's shutdown past its grace period) ends the relay
    with the stream's error event at once; aiohttp closing its session alone leaves the reader waiting for ever."""
    client, _ = await gateway(make_config(fake.url, default_target="up").up())
    rt = client.app[RUNTIME].current
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with client.post("/v1/chat/completions", json=body,
                           headers={"X-Fake-Chunks": "50", "X-Fake-Interval-Ms": "200"}) as resp:
        assert (await resp.content.readline()).startswith(b"data: ")
        await rt.targets["up"].transport.close()
        rest = await asyncio.wait_for(resp.content.read(), 5)
    assert b'"error"' in rest and rest.count(b'"content":"tok') < 10


async def test_a_coalesced_leader_of_the_old_config_finishes_for_its_follower_on_the_new_one(fake, reloadable, make_config):
    """A follows nobody and leads an idempotency key's stream; after a reload B, on the new config, follows it;
    A's client leaves. The old runtime now has no request of its own, but its leader still streams for B: it is
    kept until that ends (it used to be closed then, cutting B's stream with "the gateway is shutting down")."""
    cfg = make_config(fake.url, default_target="up", shutdown_grace_s=0.1).up()
    client, path = await reloadable(cfg)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"X-Fake-Chunks": "12", "X-Fake-Interval-Ms": "100", "Idempotency-Key": "k-reload-1"}
    first = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status == 200 and (await first.content.readline()).startswith(b"data: ")
    assert (await post_reload(client))[0] == 200
    second = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert second.status == 200
    first.close()  # the leading client goes away; B still follows its leader
    rest = await asyncio.wait_for(second.content.read(), 10)
    assert rest.rstrip().endswith(b"data: [DONE]") and rest.count(b'"content":"tok') == 12, rest[-300:]
    assert b"shutting down" not in rest and len(fake.requests) == 1
