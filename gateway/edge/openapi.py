"""``GET /openapi.json``: the OpenAPI 3.1 document of the paths the gateway answers itself.

``OPERATIONS`` is the table it is made from: each path and method with the msgspec types its
handler decodes and encodes — the envelopes (``gateway.edge.envelope``, ``envelope_llm``,
``generate``), the answers (``gateway.edge.answers``) and the error dialects
(``gateway.edge.writer``). ``msgspec.json.schema_components`` turns those very classes into
``components.schemas``, so there is no copy of a shape to keep in step: change a Struct and the
handler and the document change together. Query and path parameters are listed here.

The proxied passthroughs (``/v1/{path}``, ``/t/{target}/{path}``) are not operations: their
bodies are the upstream API's own, described by its documentation. The document does not
depend on the config (a reload does not change it): it is built once, when the first app is.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from aiohttp import web

from gateway import __version__
from gateway.edge import answers as a
from gateway.edge import docs
from gateway.edge.envelope import HttpAnswer, HttpEnvelope
from gateway.edge.envelope_llm import LLMAnswer, LLMEnvelope, LLMMeta, StreamChunk, StreamDone
from gateway.edge.generate import GenerateAnswer, GenerateRequest
from gateway.edge.ids import named
from gateway.edge.writer import AnthropicError, EnvelopeError, OpenAIError

REF = "#/components/schemas/{name}"
Day = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}$", description="a UTC day, YYYY-MM-DD")]


class Media(NamedTuple):
    """A response that is not a JSON Struct: its media type, and a schema when one says anything."""

    type: str
    schema: Mapping[str, Any] = {"type": "string"}


class Either(NamedTuple):
    """A JSON answer that is one of several Structs (msgspec describes only a tagged union itself)."""

    types: tuple[type, ...]


class Events(NamedTuple):
    """A ``text/event-stream`` answer: each event's name and the Struct its ``data`` holds (as JSON). The
    schema describes one event (``event``, ``data``), as OpenAPI 3.2's ``itemSchema`` does."""

    data: Mapping[str, type]


class Param(NamedTuple):
    name: str
    where: str  # path, query or header
    description: str
    type: Any = str


class Op(NamedTuple):
    method: str
    path: str
    tag: str
    summary: str
    answers: Mapping[str, Any]  # status ("200", "4XX") → a Struct (JSON), an Either, Events, a Media, or a tuple
    body: Any = None  # the request body's type
    params: tuple[Param, ...] = ()
    security: str | None = None  # "admin", "tenant"


# Who may call: the admin key when one is configured, else (the empty alternative) direct loopback callers.
# A tenant key when tenants are configured, else nothing.
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "admin": [{"adminKey": []}, {}],
    "tenant": [{"tenantKey": []}, {"tenantApiKey": []}, {}],
}
SECURITY_SCHEMES = {
    "adminKey": {"type": "http", "scheme": "bearer", "description":
                 "The key in the variable `server.admin_key_env` names. Without one, the admin API answers "
                 "direct loopback callers only (no proxy in between), with no credential."},
    "tenantKey": {"type": "http", "scheme": "bearer", "description":
                  "A tenant's `api_key`, when tenants are configured (else no credential is needed)."},
    "tenantApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description":
                     "The same tenant key, in X-API-Key instead of Authorization."},
}

ENVELOPE_ERRORS = {"4XX": EnvelopeError, "5XX": EnvelopeError}
OPENAI_ERRORS = {"4XX": OpenAIError, "5XX": OpenAIError}
JSON_OBJECT = Media("application/json", {"type": "object"})
HTML = Media("text/html")
LLM_EVENTS = Events({"meta": LLMMeta, "chunk": StreamChunk, "done": StreamDone, "error": EnvelopeError})
TARGET_QUERY = Param("target", "query", "Only this target's stored answers (leave out: every target's).")
IDEMPOTENCY = Param("Idempotency-Key", "header", "The same key again within the TTL replays the first answer.")


def _admin(method: str, path: str, summary: str, data: type, params: tuple[Param, ...] = ()) -> Op:
    return Op(method, path, "admin", summary, {"200": a.AdminAnswer[data], **ENVELOPE_ERRORS},
              params=params, security="admin")


OPERATIONS: tuple[Op, ...] = (
    # the seeds' envelopes (gateway.edge.surfaces)
    Op("POST", "/proxy/http", "proxy", "Call any configured HTTP API through the gateway's policies",
       {"200": HttpAnswer, "4XX": Either((HttpAnswer, EnvelopeError)), "5XX": Either((HttpAnswer, EnvelopeError))},
       body=HttpEnvelope, params=(IDEMPOTENCY,), security="tenant"),
    Op("POST", "/proxy/llm", "proxy", "A chat completion from an LLM target, complete or streamed (SSE)",
       {"200": (LLMAnswer, LLM_EVENTS), **ENVELOPE_ERRORS}, body=LLMEnvelope, params=(IDEMPOTENCY,), security="tenant"),
    Op("POST", "/v1/generate", "proxy", "A completion for one prompt, with its token counts and cost",
       {"200": GenerateAnswer, **OPENAI_ERRORS}, body=GenerateRequest,
       params=(Param("X-ReliAPI-Target", "header", "The target to use, instead of routing by model."),),
       security="tenant"),
    # reports and operator surfaces under /v1 (gateway.edge.reports, gateway.edge.operator)
    Op("GET", "/v1/models", "reports", "The model catalog (OpenAI's list format, with pricing)",
       {"200": a.ModelList, **OPENAI_ERRORS}, security="tenant"),
    Op("GET", "/v1/usage/{user_id}", "reports", "A user's usage by day and in total",
       {"200": a.UserUsage, **OPENAI_ERRORS},
       params=(Param("user_id", "path", "The user (the request's `user`)."),
               Param("since", "query", "From this day on.", Day)), security="tenant"),
    Op("GET", "/v1/rate-limit/{user_id}", "reports", "The rate limits a user's requests count against, as they stand",
       {"200": a.RateLimitInfo, **OPENAI_ERRORS},
       params=(Param("user_id", "path", "The user."),), security="tenant"),
    Op("GET", "/v1/health", "health", "The gateway, its store and each target's circuit",
       {"200": a.Health, "503": a.Health}),
    _admin("GET", "/v1/admin/summary", "The same as GET /admin/summary", a.Summary),
    _admin("GET", "/v1/cache/stats", "The same as GET /admin/cache/stats", a.CacheStats),
    _admin("DELETE", "/v1/cache/clear", "The same as DELETE /admin/cache", a.CacheCleared, (TARGET_QUERY,)),
    # the admin API (gateway.edge.admin)
    _admin("GET", "/admin/summary", "Version, uptime, store, counts per target and tenant", a.Summary),
    _admin("GET", "/admin/usage", "Usage summed by day and in total", a.UsageReport,
           (Param("tenant", "query", "Only this tenant's."), Param("user", "query", "Only this user's."),
            Param("since", "query", "From this day on.", Day))),
    _admin("GET", "/admin/cache/stats", "Cache hits, misses and entries per target", a.CacheStats),
    _admin("DELETE", "/admin/cache", "Drop stored answers", a.CacheCleared, (TARGET_QUERY,)),
    _admin("GET", "/admin/circuits", "Every target's circuit", a.Circuits),
    _admin("POST", "/admin/circuits/{target}/reset", "Close a target's circuit, on every instance", a.CircuitReset,
           (Param("target", "path", "The target."),)),
    _admin("POST", "/admin/reload", "Read the config again (as SIGHUP does)", a.Reloaded),
    _admin("GET", "/admin/bans", "The bans in force (abuse.ban_after violations within abuse.window_s)", a.Bans),
    _admin("DELETE", "/admin/bans/{id}", "Lift a ban now, on every instance", a.BanLifted,
           (Param("id", "path", "The banned subject, as GET /admin/bans lists it (ip:…, key:…, fp:…)."),)),
    # probes, metrics, the status page (gateway.edge.probes, gateway.observe)
    *(Op("GET", path, "health", "Liveness: the process serves", {"200": a.Liveness})
      for path in ("/healthz", "/livez", "/health")),
    Op("GET", "/readyz", "health", "Readiness: 200 when this instance should get traffic, else 503 with the reason",
       {"200": a.Readiness, "503": a.Readiness}),
    Op("GET", "/metrics", "status", "Prometheus text exposition", {"200": Media("text/plain")}),
    Op("GET", "/", "status", "The status page", {"200": HTML}),
    Op("GET", "/status.json", "status", "The status page's data", {"200": JSON_OBJECT}),
    # this document, and the page that renders it (gateway.edge.docs)
    Op("GET", "/openapi.json", "docs", "This document", {"200": JSON_OBJECT}),
    Op("GET", "/docs", "docs", "This document, rendered (Swagger UI, served by the gateway itself)", {"200": HTML}),
    Op("GET", "/docs/assets/{name}", "docs", "The files /docs uses",
       {"200": tuple(Media(media, {"type": "string", "contentMediaType": media}) for media in sorted(set(docs.ASSETS.values()))),
        "4XX": EnvelopeError},
       params=(Param("name", "path", "The file.", Literal[tuple(docs.ASSETS)]),)),
)

_TAGS = (
    ("proxy", "The gateway's own request formats; every policy applies (tenants, limits, budget, cache, retries, "
              "fallback). The transparent passthroughs `/v1/{path}` and `/t/{target}/{path}` take and answer the "
              "upstream API's own bodies, so they are not described here; the gateway's own errors there are "
              "OpenAIError, AnthropicError (`/v1/messages…`) or EnvelopeError (`/t/…`)."),
    ("reports", "What the gateway knows about models, usage and limits."),
    ("health", "Probes for orchestrators and load balancers."),
    ("admin", "Look at the gateway and act on it."),
    ("status", "Metrics and the status page."),
    ("docs", "This document."),
)
_STATUS = {"200": "OK", "503": "Not healthy or not ready: the answer says why",
           "4XX": "Refused: the error names what is wrong (the field, for a bad request)",
           "5XX": "The gateway or the upstream failed"}


def document(ops: tuple[Op, ...] = OPERATIONS) -> dict[str, Any]:
    """The whole document (every schema from the types the operations name)."""
    types: list[Any] = [AnthropicError]  # named in the proxy tag's description
    for op in ops:
        for answer in op.answers.values():
            for t in _alternatives(answer):
                if isinstance(t, Either | Events):
                    types += t.types if isinstance(t, Either) else t.data.values()
                elif not isinstance(t, Media):
                    types.append(t)
        types += [op.body] if op.body is not None else []
        types += [p.type for p in op.params]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = dict(zip(map(_key, types), schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schema_of)
    return {
        "openapi": "3.1.0",
        "info": {"title": "ReliAPI", "version": __version__, "description":
                 "A reliability gateway for HTTP and LLM APIs: the paths it answers itself. Every answer carries "
                 "`X-Request-Id` (the client's, when sane, else a new one)."},
        "tags": [{"name": name, "description": text} for name, text in _TAGS],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": SECURITY_SCHEMES,
            "headers": {"X-Request-Id": {"description": "The request's id, as in the access log.", "required": True,
                                         "schema": {"type": "string"}}},
        },
    }


def _alternatives(answer: Any) -> tuple[Any, ...]:
    return answer if type(answer) is tuple else (answer,)  # (a Media, Either or Events is a NamedTuple: one answer)


def _key(t: Any) -> str:
    return repr(t)  # a union or a parametrized generic is not always hashable the same way: its repr is


def _operation(op: Op, schema_of: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.method.lower() + "_" + ("_".join(
            p.strip("{}").replace("-", "_").replace(".", "_") for p in op.path.split("/") if p) or "root"),
        "tags": [op.tag],
        "summary": op.summary,
        "responses": {status: _response(status, answer, schema_of) for status, answer in op.answers.items()},
    }
    if op.params:
        out["parameters"] = [
            {"name": p.name, "in": p.where, "required": p.where == "path", "description": p.description,
             "schema": schema_of[_key(p.type)]}
            for p in op.params
        ]
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema_of[_key(op.body)]}}}
    if op.security is not None:
        out["security"] = SECURITY[op.security]
    return out


def _response(status: str, answer: Any, schema_of: dict[str, Any]) -> dict[str, Any]:
    content = {}
    for alternative in _alternatives(answer):
        if isinstance(alternative, Media):
            content[alternative.type] = {"schema": dict(alternative.schema)}
        elif isinstance(alternative, Events):
            content["text/event-stream"] = {"schema": {"type": "object", "required": ["event", "data"], "oneOf": [
                {"properties": {"event": {"const": name}, "data": {
                    "type": "string", "contentMediaType": "application/json", "contentSchema": schema_of[_key(t)]}}}
                for name, t in alternative.data.items()
            ]}}
        elif isinstance(alternative, Either):
            content["application/json"] = {"schema": {"anyOf": [schema_of[_key(t)] for t in alternative.types]}}
        else:
            content["application/json"] = {"schema": schema_of[_key(alternative)]}
    return {"description": _STATUS[status], "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
            "content": content}


@functools.cache
def encoded() -> bytes:
    """The document's bytes, made once per process (~6 ms): they depend on the code only."""
    return msgspec.json.encode(document())


def add_routes(app: web.Application) -> None:
    """``GET /openapi.json``: the same bytes for every request."""
    body = encoded()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/openapi.json", named(openapi))
