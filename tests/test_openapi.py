"""``GET /openapi.json`` and ``GET /docs`` (gateway.edge.openapi, gateway.edge.docs).

The document is valid OpenAPI 3.1, names every route the app serves itself (read from
``app.router``, so a new route cannot be left out), and the gateway keeps to it: schemathesis
sends generated requests — valid ones, and ones that break the schema — to a real gateway in
front of a fake upstream, and every answer must be documented, match its schema, carry
``X-Request-Id``, never be a 5xx, and be a 4xx for bad input. ``/docs`` loads only files the
gateway serves, and renders the document in a real browser.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgspec
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app
from gateway.edge import docs, surfaces
from gateway.edge.openapi import document
from gateway.edge.serve import serve
from tests.support.browser import Browser, need_browser
from tests.support.config import NO_RETRY

# Routes that are not operations of their own, with why.
CATCH_ALLS = {
    "/{tail}": "the proxied surfaces (gateway.edge.surfaces): checked against its table below",
    "/admin{tail}": "an unknown admin path: 404 in the envelope dialect",
}
VALID_BODIES = {  # a valid request per body type, to break one field of
    "HttpEnvelope": {"target": "rest", "method": "GET"},
    "LLMEnvelope": {"target": "up", "messages": [{"role": "user", "content": "hi"}]},
    "GenerateRequest": {"prompt": "hi"},
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]


def config(make_config: Any, url: str) -> Any:
    cfg = make_config(url, default_target="up").up(llm={"default_model": "gpt-4o-mini"}).claude().rest()
    return cfg.each(retry_matrix=NO_RETRY)


def undocumented(app: web.Application, doc: dict[str, Any]) -> list[str]:
    """Every (method, path) the app answers itself that the document does not name, and every documented
    operation nothing answers."""
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served: set[tuple[str, str]] = {(method, path) for method, path in surfaces._EXACT}
    wildcard: set[str] = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path in CATCH_ALLS or route.handler is serve:  # (serve: the proxy's hot paths, routed by name)
            continue
        if route.method == "*":  # the 405 for other methods of a documented path (operator, admin)
            wildcard.add(path)
        elif route.method != "HEAD":  # aiohttp's own companion of every GET
            served.add((route.method, path))
    problems = [f"{m} {p} is served but not documented" for m, p in sorted(served - documented)]
    problems += [f"{m} {p} is documented but not served" for m, p in sorted(documented - served)]
    problems += [f"* {p} answers with no documented method" for p in sorted(wildcard - {p for _, p in served})]
    return problems


# ---------------------------------------------------------------- the document


async def test_the_document_is_valid_openapi_3_1_and_served_with_a_request_id(fake, gateway, make_config):
    client, _ = await gateway(config(make_config, fake.url))
    resp = await client.get("/openapi.json", headers={"X-Request-Id": "doc-1"})
    assert resp.status == 200 and resp.content_type == "application/json"
    assert resp.headers["X-Request-Id"] == "doc-1"
    doc = await resp.json()
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["openapi"] == "3.1.0"
    # the bodies are the handlers' own msgspec types
    envelope = doc["components"]["schemas"]["HttpEnvelope"]
    assert envelope["required"] == ["target", "method"] and envelope["additionalProperties"] is False
    llm = doc["paths"]["/proxy/llm"]["post"]
    assert set(llm["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert doc["paths"]["/admin/reload"]["post"]["security"] == [{"adminKey": []}, {}]
    assert doc["paths"]["/healthz"]["get"].get("security") is None


async def test_the_document_is_built_once_not_per_request(fake, gateway, make_config):
    client, _ = await gateway(config(make_config, fake.url))
    first = await (await client.get("/openapi.json")).read()
    second = await (await client.get("/openapi.json")).read()
    assert first == second == msgspec.json.encode(document())


def test_every_route_the_app_serves_itself_is_documented(make_config):
    app = create_app(config(make_config, "http://127.0.0.1:9").load())
    doc = document()
    assert undocumented(app, doc) == []
    # and the check can fail: a new route, a documented operation nothing serves
    async def new_thing(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/new-thing", new_thing)
    doc["paths"]["/admin/ghost"] = {"get": {"responses": {"200": {"description": "OK"}}}}
    assert undocumented(app, doc) == ["GET /v1/new-thing is served but not documented",
                                      "GET /admin/ghost is documented but not served"]


# ---------------------------------------------------------------- the gateway keeps to it


def fuzz(base_url: str, doc: dict[str, Any], *, examples: int, targets: dict[str, str]) -> list[str]:
    """Generated requests (valid and invalid) to every operation; the checks' failures, one line each.
    ``targets``: the envelope target a valid request names per path (else the generated name, a 404)."""
    schema = schemathesis.openapi.from_dict(doc)
    session = requests.Session()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _fuzz_one(operation, mode, base_url, session, examples, targets.get(operation.path), failures)
    return failures


def _fuzz_one(operation: Any, mode: Any, base_url: str, session: requests.Session, examples: int,
              target: str | None, failures: list[str]) -> None:
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if mode.is_positive and target and isinstance(case.body, dict) and "target" in case.body:
            case.body["target"] = target
        try:
            case.call_and_validate(base_url=base_url, session=session, checks=CHECKS, timeout=10)
        except (Exception, FailureGroup) as e:  # a check's failure: collected, so that one run reports every operation's
            line = f"{operation.method.upper()} {operation.path} ({mode.value}): {e}"
            if not any(f.split("\n", 1)[0] == line.split("\n", 1)[0] for f in failures):
                failures.append(line[:3000])

    try:
        run()
    except Unsatisfiable:
        assert not mode.is_positive  # an operation with nothing to send has no invalid request


async def test_schemathesis_finds_every_answer_documented_and_no_5xx(fake, gateway, make_config):
    client, _ = await gateway(config(make_config, fake.url))
    doc = await (await client.get("/openapi.json")).json()
    base_url = str(client.make_url("")).rstrip("/")
    failures = await asyncio.to_thread(fuzz, base_url, doc, examples=25,
                                       targets={"/proxy/http": "rest", "/proxy/llm": "up"})
    assert not failures, "\n\n".join(failures)
    assert len(fake.requests) > 0  # valid envelopes reached the upstream, not only refusals


async def test_with_tenants_and_an_admin_key_every_refusal_is_documented_too(fake, gateway, make_config):
    cfg = config(make_config, fake.url).tenant("acme", api_key="acme-key-123456").server(admin_key_env="ADMIN_KEY")
    client, _ = await gateway(cfg, env={"ADMIN_KEY": "admin-key-123456"})
    doc = await (await client.get("/openapi.json")).json()
    base_url = str(client.make_url("")).rstrip("/")
    failures = await asyncio.to_thread(fuzz, base_url, doc, examples=5, targets={})
    assert not failures, "\n\n".join(failures)
    assert (await client.get("/admin/summary")).status == 401  # the fuzzer did meet the refusals


async def test_bad_input_to_every_documented_body_and_query_is_a_4xx_naming_the_field(fake, gateway, make_config):
    """For each operation's body: each required field left out, each field given a value of no allowed type;
    for each query parameter with a pattern, a value that breaks it. The document says what to break."""
    client, _ = await gateway(config(make_config, fake.url))
    doc = await (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    tried = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            url = path.replace("{user_id}", "u1").replace("{target}", "up")
            bad: list[tuple[str, dict[str, Any]]] = []
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                kind = body["$ref"].rsplit("/", 1)[1]
                schema, fine = schemas[kind], VALID_BODIES[kind]
                bad += [(name, {"json": {k: v for k, v in fine.items() if k != name}}) for name in schema["required"]]
                bad += [(name, {"json": {**fine, name: [[{}]]}}) for name, prop in schema["properties"].items() if prop]
            bad += [(p["name"], {"params": {p["name"]: "not-a-day"}}) for p in op.get("parameters", ())
                    if p["in"] == "query" and "pattern" in p["schema"]]
            for name, request in bad:
                resp = await client.request(method, url, **request)
                text = await resp.text()
                assert 400 <= resp.status < 500 and name in text, (method, path, request, resp.status, text)
                tried += 1
    assert tried > 30


# ---------------------------------------------------------------- /docs


async def test_the_docs_page_loads_only_files_the_gateway_serves(fake, gateway, make_config):
    client, _ = await gateway(config(make_config, fake.url))
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html" and "X-Request-Id" in resp.headers
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    html = await resp.text()
    urls = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert urls and not [u for u in urls if "//" in u or not u.startswith("docs/assets/")]
    script = await client.get("/docs/assets/reliapi-docs.js")
    text = await script.text()
    assert script.status == 200 and 'url: "openapi.json"' in text and "validatorUrl: null" in text
    for url in urls:
        asset = await client.get("/" + url)
        assert asset.status == 200 and asset.content_type == docs.ASSETS[url.rsplit("/", 1)[1]], url
        assert len(await asset.read()) > 100
    missing = await client.get("/docs/assets/index.html")  # the package's demo page (a petstore online)
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "unknown_target"


async def test_a_real_browser_renders_every_operation_from_the_gateway_alone(fake, gateway, make_config):
    executable = need_browser()
    client, _ = await gateway(config(make_config, fake.url))
    doc = await (await client.get("/openapi.json")).json()
    operations = sum(len(ops) for ops in doc["paths"].values())
    async with Browser.launch(executable) as browser:
        await browser.navigate(str(client.make_url("/docs")))
        shown = await browser.wait_for(
            f"document.querySelectorAll('.opblock').length >= {operations} && "
            "document.querySelectorAll('.opblock').length", timeout_s=20)
        assert shown == operations
        assert await browser.evaluate("document.querySelector('.info .title').textContent.startsWith('ReliAPI')")
        loaded = await browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        origin = str(client.make_url("/")).rstrip("/")
        assert loaded and all(u.startswith(origin + "/") for u in loaded), loaded
        assert browser.console_errors == []  # a refused load (the CSP) would be one
