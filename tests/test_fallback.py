"""The fallback chain: order, models, ``fallback_on``, tenant lists, which answer the client gets."""

from __future__ import annotations

import pytest

from gateway.keys import RUNTIME
from gateway.observe.events import FallbackUsed
from tests.support.clock import FakeClock
from tests.support.config import GatewayConfig
from tests.support.fakes import Fault

CHAT = {"model": "gpt-big", "messages": [{"role": "user", "content": "hi"}]}
DOWN = Fault(status=503)


@pytest.fixture
async def three(upstreams):
    return await upstreams(), await upstreams(), await upstreams()


def chain_config(a: str, b: str, c: str, **up_fields: object) -> GatewayConfig:
    """``up`` (at ``a``) falls back to ``fb1`` (at ``b``, default model gpt-one), then ``fb2`` (at ``c``) with
    model gpt-two; an Anthropic ``claude`` at ``c``. ``up_fields``: more for ``up``."""
    cfg = GatewayConfig(a, default_target="up")
    cfg.up(models=None, fallback_targets=["fb1", {"target": "fb2", "model": "gpt-two"}], **up_fields)
    cfg.target("fb1", f"{b}/v1", provider="openai", llm={"default_model": "gpt-one"})
    return cfg.target("fb2", f"{c}/v1", provider="openai").target("claude", c, provider="anthropic")


async def test_chain_is_tried_in_order_each_with_its_model(three, gateway):
    up, fb1, fb2 = three
    client, logs = await gateway(chain_config(up.url, fb1.url, fb2.url), clock=FakeClock())
    up.script = fb1.script = lambda n, seen: DOWN
    events = []
    client.app[RUNTIME].current.events.subscribe(lambda e: events.append(e) if isinstance(e, FallbackUsed) else None)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert resp.headers["X-ReliAPI-Target"] == "fb2" and resp.headers["X-ReliAPI-Fallback"] == "fb2"
    assert (await resp.json())["model"] == "gpt-two"
    assert [len(up.requests), len(fb1.requests), len(fb2.requests)] == [3, 3, 1]  # each with its own retries
    assert fb1.requests[0].json()["model"] == "gpt-one"  # the target's llm.default_model
    assert fb2.requests[0].json()["model"] == "gpt-two"  # the entry's model
    assert fb2.requests[0].json()["messages"] == CHAT["messages"]  # nothing else changed
    assert [(e.target, e.to_target, e.reason) for e in events] == [
        ("up", "fb1", "server_error"), ("fb1", "fb2", "server_error")]
    assert logs[-1]["fallback_target"] == "fb2" and logs[-1]["target"] == "fb2" and logs[-1]["primary_target"] == "up" and logs[-1]["model"] == "gpt-two"
    assert resp.headers["X-ReliAPI-Attempts"] == "7"


async def test_same_target_with_another_model(fake, gateway):
    client, _ = await gateway(f"""
targets:
  up:
    base_url: {fake.url}/v1
    provider: openai
    retry_matrix: {{"5xx": {{attempts: 0}}}}
    fallback_targets: [{{target: up, model: gpt-small}}]
""")
    fake.script = lambda n, seen: DOWN if seen.json()["model"] == "gpt-big" else None
    resp = await client.post("/t/up/chat/completions", json=CHAT)
    assert resp.status == 200 and (await resp.json())["model"] == "gpt-small"
    assert resp.headers["X-ReliAPI-Target"] == "up" and resp.headers["X-ReliAPI-Fallback"] == "up"
    assert [r.json()["model"] for r in fake.requests] == ["gpt-big", "gpt-small"]


async def test_fallback_on_decides_which_failures_move_on(three, gateway):
    up, fb1, fb2 = three
    cfg = chain_config(up.url, fb1.url, fb2.url, fallback_on=["server_error"],
                       retry_matrix={"429": {"attempts": 0}, "5xx": {"attempts": 0}})
    client, _ = await gateway(cfg, clock=FakeClock())
    up.plan(Fault(status=429, error_message="slow down"))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 429 and (await resp.json())["error"]["message"] == "slow down"  # as the upstream sent it
    assert "X-ReliAPI-Fallback" not in resp.headers and fb1.requests == []
    up.plan(Fault(status=500))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "fb1"


async def test_when_everything_fails_the_last_answer_is_returned(three, gateway):
    up, fb1, fb2 = three
    client, logs = await gateway(chain_config(up.url, fb1.url, fb2.url), clock=FakeClock())
    up.script = fb1.script = lambda n, seen: DOWN
    fb2.script = lambda n, seen: Fault(status=500, error_message="fb2 broke")
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 500 and (await resp.json())["error"]["message"] == "fb2 broke"
    assert resp.headers["X-ReliAPI-Target"] == "fb2" and resp.headers["X-ReliAPI-Fallback"] == "fb2"
    line = logs[-1]  # the line names the target asked for too
    assert (line["target"], line["primary_target"], line["fallback_target"]) == ("fb2", "up", "fb2")


async def test_an_upstream_answer_beats_a_later_open_circuit(three, gateway):
    up, fb1, fb2 = three
    cfg = chain_config(up.url, fb1.url, fb2.url).target("fb1", circuit={"error_threshold": 1})
    cfg.target("up", fallback_targets=["fb1"])
    client, _ = await gateway(cfg, clock=FakeClock())
    fb1.plan(Fault(status=500), DOWN)  # opens fb1's circuit (threshold 1)
    up.script = lambda n, seen: Fault(status=503, error_message="primary down")
    first = await client.post("/v1/chat/completions", json=CHAT)
    assert first.status == 500 and first.headers["X-ReliAPI-Target"] == "fb1"
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503 and (await resp.json())["error"]["message"] == "primary down"
    assert resp.headers["X-ReliAPI-Target"] == "up" and "X-ReliAPI-Fallback" not in resp.headers
    assert len(fb1.requests) == 1  # its open circuit refused without calling it


async def test_every_circuit_open_gives_circuit_open_with_retry_after(three, gateway):
    up, fb1, fb2 = three
    cfg = f"""
targets:
  up:
    base_url: {up.url}/v1
    provider: openai
    circuit: {{error_threshold: 1, cooldown_s: 30}}
    retry_matrix: {{"5xx": {{attempts: 0}}}}
    fallback_targets: [fb1]
  fb1:
    base_url: {fb1.url}/v1
    provider: openai
    circuit: {{error_threshold: 1, cooldown_s: 30}}
    retry_matrix: {{"5xx": {{attempts: 0}}}}
"""
    client, _ = await gateway(cfg, clock=FakeClock())
    up.plan(DOWN)
    fb1.plan(DOWN)
    await client.post("/t/up/chat/completions", json=CHAT)  # opens both circuits
    resp = await client.post("/t/up/chat/completions", json=CHAT)
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "circuit_open" and body["error"]["target"] == "up"
    assert 25 <= int(resp.headers["Retry-After"]) <= 30 and resp.headers["X-ReliAPI-Attempts"] == "0"
    assert len(up.requests) == len(fb1.requests) == 1


async def test_plain_http_targets_fall_back_with_path_and_body_unchanged(three, gateway):
    up, fb1, _ = three
    client, _ = await gateway(f"""
targets:
  api: {{base_url: "{up.url}/api", fallback_targets: [mirror], retry_matrix: {{"5xx": {{attempts: 0}}}}}}
  mirror: {{base_url: "{fb1.url}/mirror"}}
""")
    up.plan(DOWN)
    resp = await client.put("/t/api/users/42?x=1", data=b"\x00raw bytes", headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "mirror"
    assert fb1.requests[0].path_qs == "/mirror/users/42?x=1" and fb1.requests[0].body == b"\x00raw bytes"


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_an_unkeyed_post_that_reached_a_plain_http_target_is_not_sent_to_its_fallback(three, gateway, method):
    """The primary may have acted on it (charged the card): as with retries, a POST/PATCH without an idempotency
    key goes on to another target only if it never left — not after a 503, a reset or a timeout."""
    up, fb1, _ = three
    client, _ = await gateway(f"""
targets:
  api: {{base_url: "{up.url}/api", fallback_targets: [mirror], retry_matrix: {{"5xx": {{attempts: 0}}}}}}
  mirror: {{base_url: "{fb1.url}/mirror"}}
""")
    up.plan(DOWN, Fault(reset=True))
    for _ in range(2):
        resp = await client.request(method, "/t/api/charge", data=b"amount=100")
        assert resp.status in (502, 503) and "X-ReliAPI-Fallback" not in resp.headers
    assert len(up.requests) == 2 and fb1.requests == []
    up.plan(DOWN)  # with a key it may: the mirror is told it is the same operation
    resp = await client.request(method, "/t/api/charge", data=b"amount=100", headers={"Idempotency-Key": "charge-1"})
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "mirror"
    assert fb1.requests[0].headers["Idempotency-Key"] == "charge-1"


async def test_an_unkeyed_post_whose_connection_never_came_up_falls_back(three, gateway):
    _, fb1, _ = three
    client, _ = await gateway(f"""
targets:
  api: {{base_url: "http://127.0.0.1:9/api", fallback_targets: [mirror], retry_matrix: {{net: {{attempts: 0}}}}}}
  mirror: {{base_url: "{fb1.url}/mirror"}}
""")
    resp = await client.post("/t/api/charge", data=b"amount=100")
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "mirror"
    assert len(fb1.requests) == 1


async def test_a_tenant_list_overrides_the_targets(three, gateway):
    up, fb1, fb2 = three
    cfg = chain_config(up.url, fb1.url, fb2.url).tenant("acme", api_key="acme-key-123456", fallback_targets=["fb2"])
    cfg.tenant("other", api_key="other-key-123456")
    client, _ = await gateway(cfg, clock=FakeClock())
    up.script = lambda n, seen: DOWN
    acme = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer acme-key-123456"})
    assert acme.headers["X-ReliAPI-Fallback"] == "fb2" and fb1.requests == []  # the tenant's own list
    other = await client.post("/v1/chat/completions", json=CHAT, headers={"X-API-Key": "other-key-123456"})
    assert other.headers["X-ReliAPI-Fallback"] == "fb1" and len(fb1.requests) == 1  # no own list: the target's


async def test_a_fallback_to_the_other_dialect_is_translated(three, gateway):
    up, _, fb2 = three
    cfg = f"""
targets:
  up: {{base_url: "{up.url}/v1", provider: openai, fallback_targets: [{{target: claude, model: claude-3-5-haiku-latest}}],
        retry_matrix: {{"5xx": {{attempts: 0}}}}}}
  claude: {{base_url: "{fb2.url}", provider: anthropic}}
"""
    from gateway.config import config_warnings, parse_config

    assert config_warnings(parse_config(cfg)) == []
    client, _ = await gateway(cfg)
    up.plan(DOWN)
    resp = await client.post("/t/up/chat/completions", json=CHAT)
    body = await resp.json()
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "claude"
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "Hello from the fake."
    sent = fb2.requests[0]
    assert sent.path_qs == "/v1/messages" and sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.json() == {"model": "claude-3-5-haiku-latest", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "max_tokens": 4096}



async def test_a_fallback_that_cannot_take_the_request_never_masks_the_failure_before_it(three, gateway):
    """A Responses request that continues a response stored by OpenAI cannot go to Anthropic: the client gets the
    primary's own 500 (which its SDK retries), not the 400 the fallback's translation would have said."""
    up, fb1, fb2 = three
    cfg = f"""
server: {{default_target: up}}
targets:
  up: {{base_url: "{up.url}/v1", provider: openai, retry_matrix: {{"5xx": {{attempts: 0}}}},
        fallback_targets: [{{target: claude, model: claude-3-5-haiku-latest}}, then]}}
  claude: {{base_url: "{fb2.url}", provider: anthropic}}
  then: {{base_url: "{fb1.url}/v1", provider: openai, retry_matrix: {{"5xx": {{attempts: 0}}}}}}
"""
    client, logs = await gateway(cfg)
    body = {"model": "gpt-big", "input": "hi", "previous_response_id": "resp_abc"}
    up.script = fb1.script = lambda n, seen: Fault(status=500)
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 500 and fb2.requests == []
    assert resp.headers["X-ReliAPI-Target"] == "then"  # the last target that answered
    assert logs[-1]["upstream_status"] == 500
    fb1.script = None  # the next one in the chain can take it: it answers
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "then" and fb2.requests == []
    up.script = None
    fb1.script = lambda n, seen: Fault(status=500)
    only = f"""
server: {{default_target: up}}
targets:
  up: {{base_url: "{up.url}/v1", provider: openai, retry_matrix: {{"5xx": {{attempts: 0}}}},
        fallback_targets: [{{target: claude, model: claude-3-5-haiku-latest}}]}}
  claude: {{base_url: "{fb2.url}", provider: anthropic}}
"""
    client, _ = await gateway(only)
    up.script = lambda n, seen: Fault(status=503)
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 503 and "X-ReliAPI-Fallback" not in resp.headers and fb2.requests == []
    assert (await resp.json())["error"]["type"] == "server_error"

def test_check_warns_about_a_fallback_between_an_llm_and_a_plain_http_target(cli, tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text("""
targets:
  openai: {base_url: "https://api.openai.com/v1", fallback_targets: [anthropic, files]}
  anthropic: {base_url: "https://api.anthropic.com"}
  files: {base_url: "https://files.example.com", provider: http}
""")
    result = cli.run("--check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "warning: targets.openai.fallback_targets[1]: target 'files' speaks the http dialect" in result.stderr
    assert "fallback_targets[0]" not in result.stderr  # OpenAI ⇄ Anthropic is translated
    assert "config OK" in result.stdout


async def test_client_errors_do_not_fall_back(three, gateway):
    up, fb1, fb2 = three
    client, _ = await gateway(chain_config(up.url, fb1.url, fb2.url))
    up.plan(Fault(status=404, error_message="no such model"))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 404 and fb1.requests == [] and len(up.requests) == 1


async def test_a_tenant_is_never_answered_by_a_fallback_it_may_not_use(three, gateway):
    """``allowed_models`` / ``allowed_targets`` bind the fallback chain too: a tenant limited to gpt-big on ``up``
    is not answered by ``fb2`` with gpt-two (or by ``fb1``, a target it may not use) when ``up`` fails."""
    up, fb1, fb2 = three
    cfg = chain_config(up.url, fb1.url, fb2.url, retry_matrix={"5xx": {"attempts": 0}})
    cfg.tenant("narrow", api_key="narrow-key-123456", allowed_models=["gpt-big"])
    cfg.tenant("targets", api_key="targets-key-123456", allowed_targets=["up", "fb2"])
    client, logs = await gateway(cfg)
    up.script = lambda n, seen: DOWN
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer narrow-key-123456"})
    assert resp.status == 503 and "X-ReliAPI-Fallback" not in resp.headers  # up's own failure, nothing else tried
    assert (len(fb1.requests), len(fb2.requests)) == (0, 0)
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer targets-key-123456"})
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "fb2"  # fb1 skipped: not an allowed target
    assert (len(fb1.requests), len(fb2.requests)) == (0, 1)
