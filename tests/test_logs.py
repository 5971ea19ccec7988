"""JSON logs (SPEC §7): one access line per request with every field, errors logged once.

The access log is captured through ``create_app(access_log_write=...)`` (the ``gateway``
fixture's ``logs``); the gateway's own ``reliapi`` log through a handler with the production
formatter, ``gateway.observe.logs.JsonFormatter``, so what is asserted is the JSON a user would read.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from gateway.flow import build
from tests.support.config import NO_RETRY, GatewayConfig
from tests.support.fakes import Fault

# SPEC §7, in its order
FIELDS = (
    "ts", "level", "request_id", "tenant", "target", "kind", "route", "method", "stream", "model", "outcome",
    "error_code", "upstream_status", "attempts", "latency_ms", "ttft_ms", "cost_usd", "prompt_tokens",
    "completion_tokens", "cache_hit", "idempotent_hit", "fallback_target",
)
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def config(url: str, down: str = "http://127.0.0.1:9") -> GatewayConfig:
    """``up`` (retries a 5xx once, idempotency), ``cached``, ``flaky`` → ``backup``, plain-HTTP ``rest``,
    ``gone`` (nothing listens: connection refused)."""
    cfg = GatewayConfig(url, default_target="up")
    cfg.up(retry_matrix={"5xx": {"attempts": 1}, "429": {"attempts": 0}, "net": {"attempts": 0},
                         "timeout": {"attempts": 0}})
    cfg.up("cached", models=None, cache={"ttl_s": 60})
    cfg.up("flaky", models=None, retry_matrix=NO_RETRY, fallback_targets=["backup"])
    cfg.up("backup", models=None).rest()
    return cfg.target("gone", f"{down}/v1", provider="openai", retry_matrix=NO_RETRY)


def chat(text: str = "hi", **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def call(client, method: str, path: str, **kwargs) -> tuple[int, str]:
    """One request; returns (status, X-Request-Id) after reading the whole answer."""
    resp = await client.request(method, path, **kwargs)
    await resp.read()
    return resp.status, resp.headers["X-Request-Id"]


async def test_every_request_writes_one_line_with_every_field(fake, gateway, clock):
    client, logs = await gateway(config(fake.url), clock=clock)
    sent: list[tuple[int, str]] = []
    v1 = "/v1/chat/completions"

    fake.plan(Fault(status=503), Fault())
    sent.append(await call(client, "POST", v1, json=chat("retried")))
    sent.append(await call(client, "POST", v1, json=chat("streamed", stream=True)))
    sent.append(await call(client, "POST", v1, json=chat("cache me"), headers={"X-ReliAPI-Target": "cached"}))
    sent.append(await call(client, "POST", v1, json=chat("cache me"), headers={"X-ReliAPI-Target": "cached"}))
    for _ in range(2):
        sent.append(await call(client, "POST", v1, json=chat("once"), headers={"Idempotency-Key": "log-k1"}))
    fake.plan(Fault(status=500))
    sent.append(await call(client, "POST", v1, json=chat("fall back"), headers={"X-ReliAPI-Target": "flaky"}))
    fake.plan(Fault(status=400, error_message="no such thing"))
    sent.append(await call(client, "POST", v1, json=chat("refused upstream")))
    sent.append(await call(client, "GET", "/t/rest/things?x=1", headers={"X-Request-Id": "client-chosen-id-1"}))
    sent.append(await call(client, "POST", "/proxy/http", json={"target": "rest", "method": "GET", "path": "/env"}))
    sent.append(await call(client, "POST", v1, data=b"{not json", headers={"Content-Type": "application/json"}))
    sent.append(await call(client, "GET", "/t/nowhere/x"))
    sent.append(await call(client, "POST", v1, json=chat(), headers={"X-ReliAPI-Target": "gone"}))

    assert [line["request_id"] for line in logs] == [rid for _, rid in sent]  # one line each, in order
    assert [line["status"] for line in logs] == [status for status, _ in sent]
    for line in logs:
        missing = [f for f in FIELDS if f not in line]
        assert not missing, (missing, line)
        assert TS.fullmatch(line["ts"]) and line["level"] == "info"
        assert isinstance(line["latency_ms"], float | int) and line["latency_ms"] >= 0
    (retried, streamed, miss, hit, first, replay, fell_back, refused, rest, envelope, bad_json, unknown,
     unavailable) = logs

    assert (retried["outcome"], retried["attempts"], retried["upstream_status"]) == ("ok", 2, 200)
    assert (retried["target"], retried["kind"], retried["route"], retried["method"]) == ("up", "llm", "v1", "POST")
    assert (retried["model"], retried["prompt_tokens"], retried["completion_tokens"]) == ("gpt-4o-mini", 5, 4)
    assert retried["cost_usd"] == pytest.approx((5 * 0.15 + 4 * 0.60) / 1e6)
    assert retried["stream"] is False and retried["ttft_ms"] is None and retried["error_code"] is None

    assert streamed["stream"] is True and streamed["ttft_ms"] >= 0 and streamed["completion_tokens"] == 3
    assert (miss["cache_hit"], hit["cache_hit"]) == (False, True)
    assert hit["prompt_tokens"] is None and hit["cost_usd"] is None  # a hit is not usage
    assert (first["idempotent_hit"], replay["idempotent_hit"]) == (False, True)
    assert fell_back["fallback_target"] == "backup" and fell_back["target"] == "backup"
    assert all(line["fallback_target"] is None for line in logs if line is not fell_back)
    assert (refused["outcome"], refused["upstream_status"], refused["error_code"]) == ("upstream_error", 400, None)
    assert (rest["request_id"], rest["kind"], rest["route"], rest["method"], rest["model"]) == (
        "client-chosen-id-1", "http", "t", "GET", None)
    assert (envelope["route"], envelope["target"], envelope["outcome"]) == ("proxy", "rest", "ok")
    assert (bad_json["error_code"], bad_json["outcome"], bad_json["attempts"]) == ("invalid_request", "error", 0)
    assert (unknown["error_code"], unknown["target"], unknown["kind"]) == ("unknown_target", None, None)
    assert (unavailable["error_code"], unavailable["status"], unavailable["target"]) == ("upstream_unavailable", 502, "gone")



async def test_a_streams_ttft_is_the_clients_wait_for_its_first_byte_retries_included(fake, gateway):
    """A stream whose first attempt failed slowly: ttft_ms (and the ttft metric) is what the client waited, not
    the last attempt's own few milliseconds."""
    cfg = GatewayConfig(fake.url, default_target="up").up(retry_matrix={"5xx": {"attempts": 1, "base_s": 0}})
    client, logs = await gateway(cfg)
    fake.plan(Fault(status=500, delay_ms=300))
    async with client.post("/v1/chat/completions", json=chat(stream=True)) as resp:
        assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
    line = logs[-1]
    assert line["attempts"] == 2 and line["ttft_ms"] >= 300 and line["ttft_ms"] <= line["latency_ms"]
    metrics = await (await client.get("/metrics")).text()
    assert 'reliapi_ttft_seconds_bucket{le="0.25",target="up"} 0' in metrics

async def test_a_gateway_error_is_one_access_line_and_no_stack(fake, gateway, clock, gateway_log):
    client, logs = await gateway(config(fake.url), clock=clock)
    errors = [
        await call(client, "POST", "/v1/chat/completions", json=chat(), headers={"X-ReliAPI-Target": "gone"}),
        await call(client, "POST", "/v1/chat/completions", data=b"[", headers={"Content-Type": "application/json"}),
        await call(client, "GET", "/t/nowhere/x"),
        await call(client, "GET", "/t/rest/user@elsewhere"),
    ]
    assert [status for status, _ in errors] == [502, 400, 404, 400]
    assert [line["error_code"] for line in logs] == [
        "upstream_unavailable", "invalid_request", "unknown_target", "invalid_request"]
    for (_, rid), line in zip(errors, logs, strict=True):
        assert line["request_id"] == rid and line["outcome"] == "error"
    own = gateway_log.lines
    assert not [line for line in own if "stack" in line or line["level"] == "error"], own
    for _, rid in errors:  # the access line is the one place it is logged
        assert not [t for t in gateway_log.text if rid in t]


async def test_an_internal_error_is_logged_once_with_its_stack_and_request_id(fake, gateway, gateway_log,
                                                                                monkeypatch):
    async def buggy(ex, call_next):
        raise ZeroDivisionError("a bug in a policy")

    real = build.request_policies
    monkeypatch.setattr(build, "request_policies", lambda ctx, owned: [buggy, *real(ctx, owned)])
    client, logs = await gateway(config(fake.url))
    resp = await client.post("/v1/chat/completions", json=chat(), headers={"X-Request-Id": "bug-report-7"})
    assert resp.status == 500
    body = await resp.text()
    assert "ZeroDivisionError" not in body and "Traceback" not in body and "a bug in a policy" not in body
    assert (await resp.json())["error"]["code"] == "internal_error"

    (line,) = logs
    assert (line["request_id"], line["error_code"], line["status"], line["outcome"]) == (
        "bug-report-7", "internal_error", 500, "error")
    assert "stack" not in line
    stacked = [rec for rec in gateway_log.lines if "stack" in rec]
    assert len(stacked) == 1
    (rec,) = stacked
    assert rec["level"] == "error" and rec["request_id"] == "bug-report-7"
    assert "ZeroDivisionError: a bug in a policy" in rec["stack"] and "Traceback" in rec["stack"]
    assert len([t for t in gateway_log.text if "bug-report-7" in t]) == 1
    assert not fake.requests


async def test_a_bug_after_the_first_byte_is_logged_once_and_ends_the_stream_in_band(fake, gateway, gateway_log,
                                                                                     monkeypatch):
    async def buggy(ex, call_next):
        reply = await call_next(ex)
        if reply.chunks is not None:
            upstream = reply.chunks

            async def chunks():
                async for chunk in upstream:
                    yield chunk
                    raise ValueError("a bug mid-stream")

            reply.chunks = chunks()
        return reply

    real = build.request_policies
    monkeypatch.setattr(build, "request_policies", lambda ctx, owned: [buggy, *real(ctx, owned)])
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(interval_ms=20))
    resp = await client.post("/v1/chat/completions", json=chat(stream=True), headers={"X-Request-Id": "bug-8"})
    text = (await resp.read()).decode()
    assert '"error"' in text and "[DONE]" not in text and "a bug mid-stream" not in text
    (line,) = logs
    assert (line["request_id"], line["error_code"]) == ("bug-8", "internal_error")
    (rec,) = [rec for rec in gateway_log.lines if "stack" in rec]
    assert rec["request_id"] == "bug-8"


def _policy_on_the_reply(monkeypatch, change) -> None:
    """A request policy that changes every reply (as a buggy one might)."""
    async def buggy(ex, call_next):
        reply = await call_next(ex)
        change(reply)
        return reply

    real = build.request_policies
    monkeypatch.setattr(build, "request_policies", lambda ctx, owned: [buggy, *real(ctx, owned)])


async def test_a_failure_to_start_writing_is_our_500_with_the_request_id_and_logged_as_such(
        fake, gateway, gateway_log, monkeypatch):
    """Writing the reply is inside the edge's error handling: a reply aiohttp refuses to start (a header
    it cannot send) is the dialect's 500 with X-Request-Id, logged as an error — not aiohttp's bare 500
    logged as 'cancelled'."""
    _policy_on_the_reply(monkeypatch, lambda reply: reply.headers.__setitem__("X-Bad", "a\r\nInjected: 1"))
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(chunks=3))
    resp = await client.post("/v1/chat/completions", json=chat(stream=True), headers={"X-Request-Id": "w-1"})
    assert resp.status == 500 and resp.headers["X-Request-Id"] == "w-1" and "Injected" not in resp.headers
    assert (await resp.json())["error"]["code"] == "internal_error"
    (line,) = logs
    assert (line["request_id"], line["outcome"], line["error_code"]) == ("w-1", "error", "internal_error")
    assert len([rec for rec in gateway_log.lines if "stack" in rec]) == 1


async def test_a_runtime_error_while_relaying_is_a_bug_told_in_band_not_a_client_that_left(
        fake, gateway, gateway_log, monkeypatch):
    def breaking(reply):
        if reply.chunks is not None:
            upstream = reply.chunks

            async def chunks():
                async for chunk in upstream:
                    yield chunk
                    raise RuntimeError("a bug mid-stream")

            reply.chunks = chunks()

    _policy_on_the_reply(monkeypatch, breaking)
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(chunks=5, interval_ms=10))
    resp = await client.post("/v1/chat/completions", json=chat(stream=True), headers={"X-Request-Id": "r-1"})
    text = (await resp.read()).decode()
    assert '"internal_error"' in text and "[DONE]" not in text
    (line,) = logs
    assert (line["outcome"], line["error_code"]) == ("stream_error", "internal_error")


async def test_a_request_for_no_route_is_logged_too(fake, gateway):
    client, logs = await gateway(config(fake.url))
    status, rid = await call(client, "GET", "/no/such/thing")
    assert status == 404
    assert [(line["request_id"], line["error_code"]) for line in logs] == [(rid, "unknown_target")]


async def test_a_client_that_leaves_mid_stream_is_logged_as_such(fake, gateway, clock):
    client, logs = await gateway(config(fake.url), clock=clock)
    fake.plan(Fault(chunks=5, stall_after=2))
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    await resp.content.readuntil(b"\n\n")
    resp.close()
    for _ in range(200):  # bounded: the handler notices the disconnect and writes its line
        if logs:
            break
        await asyncio.sleep(0.01)
    (line,) = logs
    assert (line["outcome"], line["status"], line["stream"], line["error_code"]) == ("client_closed", 200, True, None)
    assert line["ttft_ms"] is not None


async def test_a_bug_under_a_shared_answer_is_logged_once_with_the_leaders_request_id(fake, gateway, gateway_log,
                                                                                     monkeypatch):
    """An idempotent (or cached) request runs in a task of its own that followers share: its bug is still
    logged once, with the request id of the request that ran it."""
    def buggy_sender(ctx, scrub):
        async def send(ex):
            raise ZeroDivisionError("a bug under a lead")
        return send

    monkeypatch.setattr(build, "upstream_sender", buggy_sender)
    client, logs = await gateway(config(fake.url))
    resp = await client.post("/v1/chat/completions", json=chat(),
                             headers={"X-Request-Id": "lead-bug-3", "Idempotency-Key": "k-lead-bug-3"})
    assert resp.status == 500 and (await resp.json())["error"]["code"] == "internal_error"
    (line,) = logs
    assert (line["request_id"], line["error_code"]) == ("lead-bug-3", "internal_error")
    stacked = [rec for rec in gateway_log.lines if "stack" in rec]
    assert len(stacked) == 1 and stacked[0]["request_id"] == "lead-bug-3"
    assert "ZeroDivisionError: a bug under a lead" in stacked[0]["stack"]


async def test_a_known_callers_refused_request_is_logged_with_its_tenant(fake, gateway):
    cfg = f"""
server: {{default_target: up}}
tenants:
  - {{name: acme, api_key: acme-log-key-123456}}
targets:
  up: {{base_url: "{fake.url}/v1", provider: openai}}
"""
    client, logs = await gateway(cfg)
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": "not a list"},
                             headers={"Authorization": "Bearer acme-log-key-123456"})
    assert resp.status == 400 and fake.requests == []
    assert (logs[-1]["tenant"], logs[-1]["error_code"], logs[-1]["target"]) == ("acme", "invalid_request", None)


def test_on_a_pipe_access_lines_go_out_in_writes_a_pipe_keeps_whole(monkeypatch):
    """Several --workers on one pipe: a write of at most PIPE_BUF bytes is never interleaved with another
    process's, so each is whole lines; a longer one could be split anywhere by another worker's line."""
    import os
    import select
    import threading

    from gateway.observe import logs

    read_end, write_end = os.pipe()
    writes: list[bytes] = []
    real_write = os.write
    monkeypatch.setattr(logs.os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))

    class Out:
        def fileno(self) -> int:
            return write_end

    monkeypatch.setattr(logs.sys, "stdout", Out())
    access_logger = logs.logging.getLogger("reliapi.access")
    level = access_logger.level
    access_logger.setLevel("INFO")  # (the access log follows the level set at start)
    try:
        access = logs.AccessLog()
    finally:
        access_logger.setLevel(level)
    assert access.enabled
    got = bytearray()

    def drain() -> None:  # (a pipe holds 64 KiB: its reader must keep up)
        while chunk := os.read(read_end, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        for i in range(60):
            access({"request_id": f"req_{i}", "path": "x" * (100 + 37 * i)})
        access.flush()
    finally:
        access.close()
        os.close(write_end)
        reader.join(10)
        os.close(read_end)
    assert len(writes) > 1 and all(w.endswith(b"\n") for w in writes)
    assert all(len(w) <= select.PIPE_BUF or w.count(b"\n") == 1 for w in writes)
    assert got == b"".join(writes) and got.count(b"\n") == 60
