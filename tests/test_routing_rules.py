"""Rule-based model routing (``routing:``, issue #16 point 6): a virtual model resolved per request.

Driven through the real openai and anthropic SDKs against loopback fake upstreams: the tests assert which
model and target the upstream received, the ``X-ReliAPI-Routed-Model`` header (answers, streams, errors),
the access line, the Prometheus counter, that the cache and idempotency key on the resolved model, and
that bad rules are config errors with their path.
"""

from __future__ import annotations

import anthropic
import openai
import pytest

from gateway.config import ConfigError, config_warnings
from gateway.config.model import Config
from gateway.upstream.routing import Facts, read_facts
from tests.support.config import NO_RETRY, GatewayConfig, llm_config
from tests.support.fakes import Fault

ENV = {"UP_KEY": "sk-upstream-openai-123456", "CLAUDE_KEY": "sk-ant-upstream-654321"}
HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

AUTO = {
    "default": "gpt-4o-mini",
    "rules": [
        {"name": "long", "when": {"min_prompt_tokens": 200}, "model": "gpt-4o"},
        {"name": "tools", "when": {"has_tools": True}, "model": "gpt-4o"},
        {"name": "vision", "when": {"has_images": True}, "model": "gpt-4o"},
        {"name": "json", "when": {"json_mode": True}, "model": "gpt-4o-2024-08-06"},
        {"name": "math", "when": {"last_user_matches": "(?i)prove|derive"}, "model": "claude-3-5-sonnet-latest",
         "target": "claude"},
        {"name": "quality", "when": {"header": {"name": "X-Quality", "equals": "high"}}, "model": "gpt-4o"},
    ],
}


def routing_config(url: str, **routing: dict) -> GatewayConfig:
    cfg = llm_config(url).each(retry_matrix=NO_RETRY)
    return cfg.section("routing", routing or {"auto": AUTO})


@pytest.fixture
async def sdk():
    made = []

    def make(kind, client, **kw):
        if kind == "openai":
            c = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), max_retries=0,
                                   **{"api_key": "sk-client-key", **kw})
        else:
            c = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), max_retries=0,
                                         **{"api_key": "sk-client-ant", **kw})
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


@pytest.fixture
async def gw(fake, gateway):
    return await gateway(routing_config(fake.url), env=ENV)


async def _chat(sdk_client, **kw):
    resp = await sdk_client.chat.completions.with_raw_response.create(**{"model": "auto", "messages": HI, **kw})
    return resp, resp.parse()


@pytest.mark.parametrize(("kw", "rule", "model"), [
    ({}, "default", "gpt-4o-mini"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "long", "gpt-4o"),
    ({"tools": [TOOL]}, "tools", "gpt-4o"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "vision", "gpt-4o"),
    ({"response_format": {"type": "json_object"}}, "json", "gpt-4o-2024-08-06"),
    ({"extra_headers": {"X-Quality": "high"}}, "quality", "gpt-4o"),
    ({"extra_headers": {"X-Quality": "low"}}, "default", "gpt-4o-mini"),
])
async def test_openai_sdk_auto_is_resolved_by_the_first_rule_that_applies(gw, fake, sdk, kw, rule, model):
    client, logs = gw
    resp, completion = await _chat(sdk("openai", client), **kw)
    assert completion.choices[0].message.content == "Hello from the fake."
    assert resp.headers["X-ReliAPI-Routed-Model"] == model
    assert resp.headers["X-ReliAPI-Target"] == "up"
    (seen,) = fake.requests
    assert seen.path_qs == "/v1/chat/completions"
    assert seen.json()["model"] == model  # the body sent upstream carries the concrete model
    line = logs[-1]
    assert (line["model"], line["virtual_model"], line["routing_rule"], line["routed_model"]) == (
        model, "auto", rule, model)


async def test_a_rule_target_sends_the_request_there_in_its_dialect(gw, fake, sdk):
    client, logs = gw
    resp, completion = await _chat(sdk("openai", client), messages=[{"role": "user", "content": "Prove that 2 > 1"}])
    assert resp.headers["X-ReliAPI-Routed-Model"] == "claude-3-5-sonnet-latest"
    assert resp.headers["X-ReliAPI-Target"] == "claude"
    (seen,) = fake.requests
    assert seen.path_qs == "/v1/messages"  # translated for the Anthropic target
    assert seen.json()["model"] == "claude-3-5-sonnet-latest"
    assert seen.headers["x-api-key"] == ENV["CLAUDE_KEY"]
    assert completion.choices[0].message.content
    assert logs[-1]["routing_rule"] == "math" and logs[-1]["target"] == "claude"


async def test_only_the_last_user_message_is_searched(gw, fake, sdk):
    client, _ = gw
    messages = [{"role": "user", "content": "prove it"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "thanks"}]
    resp, _ = await _chat(sdk("openai", client), messages=messages)
    assert resp.headers["X-ReliAPI-Routed-Model"] == "gpt-4o-mini"
    assert fake.requests[0].json()["model"] == "gpt-4o-mini"


async def test_a_real_model_is_not_touched(gw, fake):
    client, logs = gw
    body = b'{ "model" : "gpt-4o-mini",  "messages": [{"role": "user", "content": "prove it"}] }'
    resp = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert "X-ReliAPI-Routed-Model" not in resp.headers
    assert fake.requests[0].body == body  # sent as it came
    assert "virtual_model" not in logs[-1] and logs[-1]["model"] == "gpt-4o-mini"


async def test_a_routed_body_keeps_every_other_value_as_sent(gw, fake):
    client, _ = gw
    body = b'{"model":"auto","messages":[{"role":"user","content":"hi \\u00e9"}],"temperature":0.50,"x":{"a" : 1}}'
    resp = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert fake.requests[0].body == body.replace(b'"auto"', b'"gpt-4o-mini"')


async def test_anthropic_sdk_messages_with_a_virtual_model(fake, gateway, sdk):
    smart = {"default": "claude-3-5-haiku-latest",
             "rules": [{"name": "hard", "when": {"last_user_matches": "(?i)derive"}, "model": "claude-3-5-sonnet-latest"}]}
    client, logs = await gateway(routing_config(fake.url, smart=smart), env=ENV)
    ant = sdk("anthropic", client)
    resp = await ant.messages.with_raw_response.create(
        model="smart", max_tokens=64, messages=[{"role": "user", "content": "Derive the formula"}])
    message = await resp.parse()
    assert message.content[0].text
    assert resp.headers["X-ReliAPI-Routed-Model"] == "claude-3-5-sonnet-latest"
    assert resp.headers["X-ReliAPI-Target"] == "claude"  # the concrete model's glob (claude-*)
    resp = await ant.messages.with_raw_response.create(model="smart", max_tokens=64, messages=HI)
    assert resp.headers["X-ReliAPI-Routed-Model"] == "claude-3-5-haiku-latest"
    assert [s.json()["model"] for s in fake.requests] == ["claude-3-5-sonnet-latest", "claude-3-5-haiku-latest"]
    assert all(s.path_qs == "/v1/messages" for s in fake.requests)
    assert [line["routing_rule"] for line in logs] == ["hard", "default"]


async def test_openai_sdk_responses_api_with_a_virtual_model(gw, fake, sdk):
    client, logs = gw
    resp = await sdk("openai", client).responses.with_raw_response.create(
        model="auto", input="Please derive the quadratic formula")
    assert resp.headers["X-ReliAPI-Routed-Model"] == "claude-3-5-sonnet-latest"
    (seen,) = fake.requests
    assert seen.json()["model"] == "claude-3-5-sonnet-latest"
    resp = await sdk("openai", client).responses.with_raw_response.create(model="auto", input="hi", tools=[
        {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}])
    assert resp.headers["X-ReliAPI-Routed-Model"] == "gpt-4o"
    assert fake.requests[-1].path_qs == "/v1/responses" and fake.requests[-1].json()["model"] == "gpt-4o"


async def test_a_stream_says_which_model_it_was_routed_to(gw, fake, sdk):
    client, logs = gw
    async with sdk("openai", client).chat.completions.with_streaming_response.create(
            model="auto", messages=HI, stream=True, extra_headers={"X-Quality": "high"}) as resp:
        assert resp.headers["X-ReliAPI-Routed-Model"] == "gpt-4o"
        text = "".join([c.choices[0].delta.content or "" async for c in await resp.parse() if c.choices])
    assert text == "tok0 tok1 tok2 "
    assert fake.requests[0].json()["model"] == "gpt-4o" and fake.requests[0].json()["stream"] is True
    assert logs[-1]["stream"] is True and logs[-1]["routed_model"] == "gpt-4o"


async def test_a_refusal_after_routing_names_the_model(fake, gateway, sdk):
    """The tenant may use gpt-4o-mini only: routed to gpt-4o, the request is refused — and the answer says why."""
    cfg = routing_config(fake.url).tenant("acme", api_key="acme-key-123456", allowed_models=["gpt-4o-mini"])
    client, logs = await gateway(cfg, env=ENV)
    oa = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="acme-key-123456", max_retries=0)
    try:
        with pytest.raises(openai.PermissionDeniedError) as info:
            await oa.chat.completions.create(model="auto", messages=HI, extra_headers={"X-Quality": "high"})
        assert info.value.response.headers["X-ReliAPI-Routed-Model"] == "gpt-4o"
        assert "gpt-4o" in info.value.message
        ok = await oa.chat.completions.with_raw_response.create(model="auto", messages=HI)
        assert ok.headers["X-ReliAPI-Routed-Model"] == "gpt-4o-mini"
    finally:
        await oa.close()
    assert len(fake.requests) == 1
    assert logs[0]["status"] == 403 and logs[0]["routed_model"] == "gpt-4o"


async def test_decisions_are_counted_in_metrics(gw, fake, sdk):
    client, _ = gw
    oa = sdk("openai", client)
    await _chat(oa, tools=[TOOL])
    await _chat(oa, tools=[TOOL])
    await _chat(oa)
    text = await (await client.get("/metrics")).text()
    assert 'reliapi_routing_decisions_total{model="gpt-4o",route="auto",rule="tools"} 2' in text
    assert 'reliapi_routing_decisions_total{model="gpt-4o-mini",route="auto",rule="default"} 1' in text


async def test_the_cache_keys_on_the_resolved_model(fake, gateway, sdk):
    cfg = routing_config(fake.url).up(cache={"ttl_s": 60})
    client, _ = await gateway(cfg, env=ENV)
    oa = sdk("openai", client)
    first, _ = await _chat(oa)
    strong, _ = await _chat(oa, extra_headers={"X-Quality": "high"})  # same body, another model: not a hit
    again, _ = await _chat(oa)
    assert [r.headers["X-Cache"] for r in (first, strong, again)] == ["MISS", "MISS", "HIT"]
    assert [s.json()["model"] for s in fake.requests] == ["gpt-4o-mini", "gpt-4o"]
    assert again.headers["X-ReliAPI-Routed-Model"] == "gpt-4o-mini"


async def test_an_idempotency_key_is_bound_to_the_resolved_model(gw, fake, sdk):
    client, _ = gw
    oa = sdk("openai", client)
    key = {"Idempotency-Key": "k-routing-1"}
    first, _ = await _chat(oa, extra_headers=key)
    replay, _ = await _chat(oa, extra_headers=key)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    with pytest.raises(openai.UnprocessableEntityError):  # same key, but it would be another model's answer
        await _chat(oa, extra_headers={**key, "X-Quality": "high"})
    assert len(fake.requests) == 1


async def test_a_rule_target_on_another_upstream_and_its_fallback_chain(upstreams, gateway, sdk):
    cheap, strong = await upstreams(), await upstreams()
    cfg = GatewayConfig(cheap.url, default_target="up").up(retry_matrix=NO_RETRY)
    cfg.up("strong", base_url=f"{strong.url}/v1", models=[], retry_matrix=NO_RETRY,
           fallback_targets=[{"target": "up"}], fallback_on=["server_error"])
    cfg.section("routing", {"auto": {"default": "gpt-4o-mini", "rules": [
        {"name": "big", "when": {"min_prompt_tokens": 100}, "model": "gpt-4o", "target": "strong"}]}})
    client, logs = await gateway(cfg)
    oa = sdk("openai", client)
    long = [{"role": "user", "content": "x" * 1000}]
    resp, _ = await _chat(oa, messages=long)
    assert resp.headers["X-ReliAPI-Target"] == "strong"
    assert [s.json()["model"] for s in strong.requests] == ["gpt-4o"] and not cheap.requests
    strong.plan(Fault(status=500))
    resp, _ = await _chat(oa, messages=long)  # the resolved target fails: its own fallback chain answers
    assert resp.headers["X-ReliAPI-Fallback"] == "up"
    assert resp.headers["X-ReliAPI-Routed-Model"] == "gpt-4o"
    assert [s.json()["model"] for s in cheap.requests] == ["gpt-4o"]
    assert logs[-1]["fallback_target"] == "up" and logs[-1]["routing_rule"] == "big"


async def test_proxy_llm_and_generate_resolve_a_virtual_model(gw, fake):
    client, logs = gw
    resp = await client.post("/proxy/llm", json={"target": "up", "model": "auto", "messages": [
        {"role": "user", "content": "derive e"}]})
    body = await resp.json()
    assert resp.status == 200, body
    assert resp.headers["X-ReliAPI-Routed-Model"] == "claude-3-5-sonnet-latest"
    assert body["meta"]["target"] == "claude" and body["meta"]["model"] == "claude-3-5-sonnet-latest"
    assert fake.requests[-1].path_qs == "/v1/messages"
    resp = await client.post("/v1/generate", json={"prompt": "hi", "model": "auto"},
                             headers={"X-Quality": "high"})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["model"] == "gpt-4o" and resp.headers["X-ReliAPI-Routed-Model"] == "gpt-4o"
    assert fake.requests[-1].json()["model"] == "gpt-4o"
    assert [(line["route"], line["routing_rule"]) for line in logs] == [("proxy_llm", "math"), ("generate", "quality")]


async def test_header_rules_present_and_regex(fake, gateway, sdk):
    rules = {"default": "gpt-4o-mini", "rules": [
        {"when": {"header": {"name": "X-Team", "matches": "^research-"}}, "model": "gpt-4o"},
        {"when": {"header": {"name": "X-Beta"}}, "model": "gpt-4.1"},
    ]}
    client, logs = await gateway(routing_config(fake.url, auto=rules), env=ENV)
    oa = sdk("openai", client)
    for headers, model, rule in [({"X-Team": "research-nlp"}, "gpt-4o", "rules[0]"),
                                 ({"X-Team": "sales"}, "gpt-4o-mini", "default"),
                                 ({"X-Beta": ""}, "gpt-4.1", "rules[1]")]:
        resp, _ = await _chat(oa, extra_headers=headers)
        assert resp.headers["X-ReliAPI-Routed-Model"] == model
        assert logs[-1]["routing_rule"] == rule


def test_facts_read_from_each_dialect():
    chat = b'{"model":"auto","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}'
    facts = read_facts(chat, "chat/completions", True)
    assert (facts.last_user, facts.has_tools, facts.has_images, facts.json_mode) == ("a\nb", False, False, False)
    assert facts.prompt_tokens > 0
    msgs = (b'{"model":"auto","messages":[{"role":"user","content":[{"type":"tool_result","content":[{"type":"image",'
            b'"source":{}}]}]}],"output_format":{"type":"json_schema"}}')
    facts = read_facts(msgs, "messages", False)
    assert facts.has_images and facts.json_mode and facts.prompt_tokens == 0
    responses = b'{"model":"auto","input":"prove it","text":{"format":{"type":"json_schema"}},"tools":[{"type":"web_search"}]}'
    facts = read_facts(responses, "responses", False)
    assert (facts.last_user, facts.json_mode, facts.has_tools) == ("prove it", True, True)
    assert read_facts(b"[1, 2]", "chat/completions", True).last_user == ""
    assert isinstance(read_facts(b"not json", "chat/completions", True), Facts)


def _errors(cfg: GatewayConfig) -> list[str]:
    with pytest.raises(ConfigError) as info:
        cfg.load()
    return info.value.errors


def test_bad_rules_are_config_errors_with_their_path():
    cfg = llm_config("http://127.0.0.1:9").section("routing", {
        "auto": {"default": "gpt-4o-mini", "rules": [
            {"when": {"last_user_matches": "(unclosed"}, "model": "gpt-4o"},
            {"when": {"header": {"name": "X-Q", "equals": "a", "matches": "b"}}, "model": "gpt-4o"},
            {"model": "claude-3-5-sonnet-latest", "target": "nowhere"},
            {"model": "smart"},
            {"when": {"min_prompt_tokens": 10, "max_prompt_tokens": 5}, "model": "gpt-4o", "name": "twice"},
            {"model": "gpt-4o", "name": "twice"},
            {"model": "whatever", "target": "rest"},
        ]},
        "smart": {"default": "gpt-4o", "scorer": "no.such.module:fn"},
    })
    errors = _errors(cfg)
    expected = [
        "routing.auto.rules[0].when.last_user_matches: not a regular expression",
        "routing.auto.rules[1].when.header: give equals or matches, not both",
        "routing.auto.rules[2].target: no target named 'nowhere'",
        "routing.auto.rules[3].model: 'smart' is a virtual model itself",
        "routing.auto.rules[4].when.min_prompt_tokens: is over max_prompt_tokens",
        "routing.auto.rules[5].name: duplicate rule name 'twice'",
        "routing.auto.rules[6].target: target 'rest' is plain HTTP",
        "routing.smart.scorer: cannot import 'no.such.module'",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errors), (want, errors)


def test_missing_default_and_unknown_fields_are_type_errors():
    errors = _errors(llm_config("http://127.0.0.1:9").section("routing", {"auto": {"rules": []}}))
    assert any(e.startswith("routing.auto") and "default" in e for e in errors), errors
    errors = _errors(llm_config("http://127.0.0.1:9").section("routing", {
        "auto": {"default": "gpt-4o", "rules": [{"model": "gpt-4o", "when": {"has_tool": True}}]}}))
    assert any("routing.auto.rules[0].when" in e and "has_tool" in e for e in errors), errors


def test_a_model_nothing_serves_is_an_error():
    cfg = llm_config("http://127.0.0.1:9", default_target=None).section("routing", {"auto": {"default": "llama-3"}})
    assert any(e.startswith("routing.auto.default: no target serves model 'llama-3'") for e in _errors(cfg))


def test_a_virtual_name_a_glob_also_matches_is_a_warning():
    cfg = llm_config("http://127.0.0.1:9").section("routing", {"gpt-auto": {"default": "gpt-4o-mini"},
                                                               "auto": {"default": "gpt-4o-mini"}})
    warnings = [w for w in config_warnings(cfg.load(env=ENV), env=ENV) if w.startswith("routing.")]
    assert warnings == ["routing.gpt-auto: targets.up.models 'gpt-*' matches it too; requests naming 'gpt-auto' are "
                        "resolved by its rules (a rule may still name 'gpt-auto' itself)"]


HAS_TIERS = "tiers" in Config.__struct_fields__  # tiers (#16 point 4) land separately


@pytest.mark.skipif(not HAS_TIERS, reason="tiers: is not in the config model yet")
async def test_a_tier_rule_routes_by_the_callers_tier(fake, gateway, sdk):
    cfg = routing_config(fake.url, auto={"default": "gpt-4o-mini", "rules": [
        {"name": "paying", "when": {"tier": ["pro", "team"]}, "model": "gpt-4o"}]})
    cfg.section("tiers", {"free": {}, "pro": {}, "team": {}})
    cfg.tenant("hobby", api_key="hobby-key-123456", tier="free").tenant("corp", api_key="corp-key-123456", tier="pro")
    cfg.tenant("plain", api_key="plain-key-123456")
    cfg.section("marketplaces", {"rapidapi": {"proxy_secret_env": "RAPID_SECRET", "tier_map": {"PRO": "pro"}}})
    env = {**ENV, "RAPID_SECRET": "rapid-secret-123456"}
    client, logs = await gateway(cfg, env=env)
    got = {}
    for key in ("hobby-key-123456", "corp-key-123456", "plain-key-123456"):
        oa = sdk("openai", client, api_key=key)
        resp, _ = await _chat(oa)
        got[key.split("-")[0]] = resp.headers["X-ReliAPI-Routed-Model"]
    assert got == {"hobby": "gpt-4o-mini", "corp": "gpt-4o", "plain": "gpt-4o-mini"}
    rapid = {"X-RapidAPI-Proxy-Secret": "rapid-secret-123456", "X-RapidAPI-User": "alice",
             "X-RapidAPI-Subscription": "PRO"}
    resp = await client.post("/v1/chat/completions", json={"model": "auto", "messages": HI}, headers=rapid)
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-ReliAPI-Routed-Model"] == "gpt-4o"  # a marketplace user on a mapped tier
    assert [s.json()["model"] for s in fake.requests] == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"]
    assert [line["routing_rule"] for line in logs] == ["default", "paying", "default", "paying"]


@pytest.mark.skipif(not HAS_TIERS, reason="tiers: is not in the config model yet")
def test_a_tier_no_tiers_entry_defines_is_an_error():
    cfg = llm_config("http://127.0.0.1:9").section("tiers", {"free": {}}).section("routing", {
        "auto": {"default": "gpt-4o-mini", "rules": [{"when": {"tier": ["free", "gold"]}, "model": "gpt-4o"}]}})
    assert "routing.auto.rules[0].when.tier: no tier named 'gold'" in _errors(cfg)


def pick_strong(facts, headers, tier):
    """A scorer for the tests: a 'learned' router that wants the strong model for questions."""
    return "strong" if facts.last_user.endswith("?") else None


async def test_a_scorer_picks_a_rule_by_name(fake, gateway, sdk):
    auto = {"default": "gpt-4o-mini", "scorer": "tests.test_routing_rules:pick_strong",
            "rules": [{"name": "strong", "when": {"header": {"name": "X-Never"}}, "model": "gpt-4o"}]}
    client, logs = await gateway(routing_config(fake.url, auto=auto), env=ENV)
    oa = sdk("openai", client)
    resp, _ = await _chat(oa, messages=[{"role": "user", "content": "why?"}])
    assert resp.headers["X-ReliAPI-Routed-Model"] == "gpt-4o" and logs[-1]["routing_rule"] == "strong"
    resp, _ = await _chat(oa)
    assert resp.headers["X-ReliAPI-Routed-Model"] == "gpt-4o-mini" and logs[-1]["routing_rule"] == "default"


async def test_a_virtual_model_is_not_resolved_on_embeddings_or_legacy_completions(gw, fake):
    """Found by a black-box review: the rules read chat, messages and responses requests; "auto" on another
    endpoint is no model at all (it used to become whatever the rules said, e.g. a chat model for embeddings)."""
    client, _ = gw
    for path, body in (("/v1/embeddings", {"model": "auto", "input": "prove it"}),
                       ("/v1/completions", {"model": "auto", "prompt": "prove it"})):
        resp = await client.post(path, json=body)
        assert "X-ReliAPI-Routed-Model" not in resp.headers, path
    assert [r.json()["model"] for r in fake.requests] == ["auto", "auto"]  # sent as named, not rewritten
