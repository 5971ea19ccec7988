"""W3C trace context (issue #18 point 1 and its bad input), without OpenTelemetry: the gateway continues a
caller's ``traceparent`` / ``tracestate`` or starts a trace, sends each upstream attempt its own child
``traceparent``, names the trace in every access and log line and in the answer's headers, and ignores
malformed or oversized headers (a new trace, never an error)."""

from __future__ import annotations

import re

import pytest

from gateway.keys import RUNTIME
from gateway.observe.trace import MAX_STATE, clean_tracestate, parse_traceparent
from tests.support.config import NO_RETRY, GatewayConfig
from tests.support.fakes import Fault

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = f"00-{TRACE}-{CALLER_SPAN}-01"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]")
V1 = "/v1/chat/completions"


def chat(**extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}


def config(url: str, **tracing) -> GatewayConfig:
    cfg = GatewayConfig(url, default_target="up")
    cfg.up(retry_matrix={"5xx": {"attempts": 2, "base_s": 0}, "429": {"attempts": 0}, "net": {"attempts": 0},
                         "timeout": {"attempts": 0}}, fallback_targets=["backup"])
    cfg.up("backup", models=None, retry_matrix=NO_RETRY)
    cfg.section("tracing", {"response_header": "both", **tracing})
    return cfg


def upstream_parents(fake) -> list[tuple[str, str, str]]:
    """(trace id, span id, flags) of each request the upstream saw."""
    out = []
    for seen in fake.requests:
        value = seen.headers["traceparent"]
        assert TRACEPARENT.fullmatch(value), value
        _, trace_id, span_id, flags = value.split("-")
        out.append((trace_id, span_id, flags))
    return out


@pytest.mark.parametrize("value", [
    CALLER,
    f"cc-{TRACE}-{CALLER_SPAN}-01-what-the-future-adds",  # a later version: its first four fields are read
])
def test_a_valid_traceparent_parses(value):
    assert parse_traceparent(value) == (TRACE, CALLER_SPAN, 1)


@pytest.mark.parametrize("value", [
    "", "garbage", CALLER.upper(), CALLER + "-extra",  # version 00 has exactly four fields
    f"ff-{TRACE}-{CALLER_SPAN}-01", f"00-{'0' * 32}-{CALLER_SPAN}-01", f"00-{TRACE}-{'0' * 16}-01",
    f"00-{TRACE[:-1]}-{CALLER_SPAN}-01", f"00-{TRACE}-{CALLER_SPAN}-1", f"00_{TRACE}_{CALLER_SPAN}_01",
    f"00-{TRACE}-{CALLER_SPAN}-0g", f"00-{TRACE}-{CALLER_SPAN}-01\n", f" 00-{TRACE}-{CALLER_SPAN}-01",
])
def test_a_malformed_traceparent_is_refused(value):
    assert parse_traceparent(value) is None


def test_tracestate_rules():
    assert clean_tracestate(["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"]) == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert clean_tracestate(["a=1 , , tenant@sys=x"]) == "a=1,tenant@sys=x"  # empty members and blanks go
    for bad in ["Upper=1", "a=1,a=2", "a", "a=", "a=b,c", "a=x=y", "=1", "a=tab\there", "a=" + "v" * 257, "k" * 257 + "=1"]:
        assert clean_tracestate([bad]) == "", bad
    assert clean_tracestate([",".join(f"k{i}=v" for i in range(33))]) == ""  # more than 32 members: all dropped
    assert clean_tracestate(["a=1" * 5000]) == ""  # far too long to be valid: not even read
    big = [f"k{i}={'v' * 100}" for i in range(6)]  # 6 × 104 characters: over 512, the rightmost go
    kept = clean_tracestate(big)
    assert kept == ",".join(big[:4]) and len(kept) <= MAX_STATE
    mixed = [f"big={'v' * 200}", *(f"k{i}={'v' * 60}" for i in range(7))]
    assert clean_tracestate(mixed) == ",".join(mixed[1:])  # members over 128 characters go first


async def test_the_callers_trace_is_continued_and_each_attempt_is_a_child_with_its_own_id(fake, gateway, gateway_log):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(status=500), Fault(status=500), Fault(status=500), Fault())  # 3 tries of up, then backup
    resp = await client.post(V1, json=chat(), headers={"traceparent": CALLER, "tracestate": "rojo=1,congo=2"})
    assert resp.status == 200
    await resp.read()
    seen = upstream_parents(fake)
    assert len(seen) == 4
    assert {t for t, _, _ in seen} == {TRACE}  # one trace: the caller's
    assert {f for _, _, f in seen} == {"01"}  # its sampled flag kept
    spans = [s for _, s, _ in seen]
    assert len(set(spans)) == 4 and CALLER_SPAN not in spans  # each attempt its own span, none the caller's
    assert [r.headers["tracestate"] for r in fake.requests] == ["rojo=1,congo=2"] * 4
    line = logs[-1]
    assert line["trace_id"] == TRACE and re.fullmatch(r"[0-9a-f]{16}", line["span_id"])
    assert line["span_id"] not in spans and line["span_id"] != CALLER_SPAN
    # the client can quote it: traceresponse names the gateway's span of the request
    assert resp.headers["X-ReliAPI-Trace-Id"] == TRACE
    assert resp.headers["traceresponse"] == f"00-{TRACE}-{line['span_id']}-01"
    # every event line made while the request ran names its trace (the fallback; the retries are counted)
    events = [ev for ev in gateway_log.lines if ev.get("event") == "fallback_used"]
    assert events and all(ev["trace_id"] == TRACE and ev["span_id"] == line["span_id"] for ev in events)


async def test_without_a_traceparent_the_gateway_starts_a_trace(fake, gateway):
    client, logs = await gateway(config(fake.url))
    ids = set()
    for _ in range(3):
        resp = await client.post(V1, json=chat(), headers={"tracestate": "rojo=1"})  # alone: ignored
        assert resp.status == 200
        await resp.read()
        trace_id = resp.headers["X-ReliAPI-Trace-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != "0" * 32
        assert logs[-1]["trace_id"] == trace_id
        assert fake.requests[-1].headers["traceparent"].split("-")[1] == trace_id
        assert "tracestate" not in fake.requests[-1].headers
        ids.add(trace_id)
    assert len(ids) == 3


@pytest.mark.parametrize("bad", [
    f"00-{TRACE}-{CALLER_SPAN}-01-extra", f"00-{'0' * 32}-{CALLER_SPAN}-01", "x" * 5000, CALLER.upper(),
    f"ff-{TRACE}-{CALLER_SPAN}-01",
])
async def test_a_malformed_traceparent_is_ignored_never_an_error(fake, gateway, bad):
    client, logs = await gateway(config(fake.url))
    resp = await client.post(V1, json=chat(), headers={"traceparent": bad, "tracestate": "rojo=1"})
    assert resp.status == 200
    await resp.read()
    trace_id = resp.headers["X-ReliAPI-Trace-Id"]
    assert trace_id != TRACE and logs[-1]["trace_id"] == trace_id
    sent = fake.requests[-1].headers
    assert sent["traceparent"].split("-")[1] == trace_id and bad not in sent.getall("traceparent")
    assert "tracestate" not in sent  # a tracestate is only read beside a valid traceparent


async def test_two_traceparents_are_no_trace_to_continue(fake, gateway):
    client, _ = await gateway(config(fake.url))
    resp = await client.post(V1, json=chat(), headers=[("traceparent", CALLER), ("traceparent", CALLER)])
    assert resp.status == 200
    assert resp.headers["X-ReliAPI-Trace-Id"] != TRACE
    assert len(fake.requests[-1].headers.getall("traceparent")) == 1


async def test_a_malformed_tracestate_is_dropped_and_the_trace_still_continued(fake, gateway):
    client, _ = await gateway(config(fake.url))
    for state in ("Bad Key=1", "a=1,a=2", ",".join(f"k{i}=v" for i in range(40))):
        resp = await client.post(V1, json=chat(), headers={"traceparent": CALLER, "tracestate": state})
        assert resp.status == 200
        assert resp.headers["X-ReliAPI-Trace-Id"] == TRACE
        assert "tracestate" not in fake.requests[-1].headers
    resp = await client.post(V1, json=chat(), headers=[("traceparent", CALLER), ("tracestate", "a=1"),
                                                       ("tracestate", "b=2")])
    assert fake.requests[-1].headers["tracestate"] == "a=1,b=2"  # repeated headers are one list


async def test_errors_and_streams_name_their_trace(fake, gateway):
    client, logs = await gateway(config(fake.url))
    resp = await client.post("/t/nowhere/x", json={}, headers={"traceparent": CALLER})  # refused by the gateway
    assert resp.status == 404
    assert resp.headers["X-ReliAPI-Trace-Id"] == TRACE and logs[-1]["trace_id"] == TRACE
    assert resp.headers["traceresponse"] == f"00-{TRACE}-{logs[-1]['span_id']}-01"
    resp = await client.post(V1, data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and resp.headers["X-ReliAPI-Trace-Id"] == logs[-1]["trace_id"]
    resp = await client.post(V1, json=chat(stream=True), headers={"traceparent": CALLER})
    assert resp.status == 200 and resp.headers["X-ReliAPI-Trace-Id"] == TRACE
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert logs[-1]["trace_id"] == TRACE and logs[-1]["stream"] is True


async def test_sampling_the_traces_the_gateway_starts(fake, gateway):
    client, _ = await gateway(config(fake.url, sample_ratio=0))
    await (await client.post(V1, json=chat())).read()
    assert fake.requests[-1].headers["traceparent"].endswith("-00")  # not sampled: said so downstream
    assert (await client.post(V1, json=chat())).headers["traceresponse"].endswith("-00")
    await (await client.post(V1, json=chat(), headers={"traceparent": CALLER})).read()
    assert fake.requests[-1].headers["traceparent"].endswith("-01")  # the caller's decision wins
    unsampled = f"00-{TRACE}-{CALLER_SPAN}-00"
    client, _ = await gateway(config(fake.url, sample_ratio=1))
    await (await client.post(V1, json=chat(), headers={"traceparent": unsampled})).read()
    assert fake.requests[-1].headers["traceparent"].endswith("-00")
    assert client.app[RUNTIME].current.spans is None  # nothing exports: no span is recorded at all


@pytest.mark.parametrize(("setting", "named"), [
    (None, {"X-ReliAPI-Trace-Id"}), ("traceresponse", {"traceresponse"}), ("none", set()),
])
async def test_which_response_headers_name_the_trace(fake, gateway, setting, named):
    cfg = GatewayConfig(fake.url, default_target="up").up()
    if setting is not None:
        cfg.section("tracing", {"response_header": setting})
    client, logs = await gateway(cfg)
    for path in (V1, "/t/nowhere/x"):  # an answer, an error
        resp = await client.post(path, json=chat(), headers={"traceparent": CALLER})
        assert {"X-ReliAPI-Trace-Id", "traceresponse"} & set(resp.headers) == named
        assert logs[-1]["trace_id"] == TRACE  # always in the log
