"""The table of proxied surfaces: which parser, error dialect and finisher a path gets.

    surface     method and path          checks              parser (→ Exchange)   errors in   finisher
    generate    POST /v1/generate        proxiable, tenant   generate.exchange     openai      generate.finish
    proxy       POST /proxy/http         proxiable, tenant   envelope.exchange     envelope    envelope.finish
    proxy_llm   POST /proxy/llm          proxiable, tenant   envelope_llm.exchange envelope    envelope_llm.finish
    v1          any  /v1/{path}          proxiable, tenant   requests.v1           by path     —
    t           any  /t/{target}/{path}  proxiable, tenant   requests.t            envelope    —
    none        anything else            404 unknown_target  —                     envelope    —

A request is looked up by its exact method and path first, then by prefix. A surface's
steps run in ``gateway.edge.serve`` (outermost: the request id, errors, the reply, the
access record): its checks, its parser, the request flow, its finisher. ``/v1`` errors are in Anthropic's dialect for the Messages endpoints
(``messages``, ``messages/count_tokens``, however the path is spelled) and OpenAI's for the
rest — one rule, for the request's own errors and for those before it was read. Fixed
gateway endpoints (health, metrics, admin, the status page, ``GET /v1/models``) are plain
aiohttp routes (``gateway.app``), not surfaces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.edge import envelope, envelope_llm, generate, requests
from gateway.edge.call import Call, Check, Finisher, Parser
from gateway.edge.steps import authenticate, no_route, proxiable
from gateway.flow.exchange import ENVELOPE, OPENAI
from providers.endpoints import endpoint

if TYPE_CHECKING:
    from gateway.flow.exchange import Exchange

class Surface:
    """One row of the table: the edge's steps for requests to it (``gateway.edge.serve`` runs them)."""

    __slots__ = ("name", "dialect", "checks", "parser", "finish")

    def __init__(self, name: str, dialect: str | Callable[[str], str], parser: Parser | None,
                 finish: Finisher | None = None) -> None:
        self.name = name  # the access log's "route"
        self.dialect = dialect  # errors are rendered in it: a dialect, or a function of the raw path
        self.checks: tuple[Check, ...] = (proxiable, authenticate) if parser is not None else (no_route,)
        self.parser: Parser = parser or _never
        self.finish = finish  # None: the flow's reply is the answer

    def dialect_of(self, raw_path: str) -> str:
        dialect = self.dialect
        return dialect if isinstance(dialect, str) else dialect(raw_path)


async def _never(call: Call) -> Exchange:
    raise AssertionError("no parser")


def v1_dialect(raw_path: str) -> str:
    """Errors before a request was read: the dialect of its endpoint (``requests.v1_dialect``)."""
    return requests.v1_dialect(endpoint(raw_path[4:].partition("?")[0]))  # (after "/v1/"; memoized per path)


GENERATE = Surface("generate", OPENAI, generate.exchange, generate.finish)
PROXY = Surface("proxy", ENVELOPE, envelope.exchange, envelope.finish)
PROXY_LLM = Surface("proxy_llm", ENVELOPE, envelope_llm.exchange, envelope_llm.finish)
V1 = Surface("v1", v1_dialect, requests.v1)
T = Surface("t", ENVELOPE, requests.t)
NONE = Surface("none", ENVELOPE, None)

_EXACT = {("POST", "/v1/generate"): GENERATE, ("POST", "/proxy/http"): PROXY, ("POST", "/proxy/llm"): PROXY_LLM}
_PREFIXES = (("/v1/", V1), ("/t/", T))


def surface_for(method: str, raw_path: str) -> Surface:
    path = raw_path.partition("?")[0]
    found = _EXACT.get((method, path))
    if found is not None:
        return found
    for prefix, surface in _PREFIXES:
        if path.startswith(prefix):
            return surface
    return NONE
