"""The table of proxied surfaces: which parser, error dialect and finisher a path gets.

    surface     method and path          parser (→ Exchange)        errors in   finisher
    generate    POST /v1/generate        gateway.edge.generate           openai      generate.reply
    proxy       POST /proxy/http         gateway.edge.envelope           envelope    envelope.finish
    proxy_llm   POST /proxy/llm          gateway.edge.envelope_llm       envelope    envelope_llm.reply
    v1          any  /v1/{path}          edge.requests.v1           by path     —
    t           any  /t/{target}/{path}  edge.requests.t            envelope    —
    none        anything else            (404 unknown_target)       envelope    —

A request is looked up by its exact method and path first, then by prefix. A surface's
steps run in ``gateway.edge.serve`` (outermost: the request id, errors, the reply, the
access record); ``/v1`` errors are in Anthropic's dialect for the Messages endpoints
(``messages``, ``messages/count_tokens``, however the path is spelled) and OpenAI's for the
rest — one rule, for the request's own errors and for those before it was read. Fixed
gateway endpoints (health, metrics, admin, the status page, ``GET /v1/models``) are plain
aiohttp routes (``gateway.app``), not surfaces.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gateway.edge import envelope, envelope_llm, generate, requests
from gateway.edge.call import Call, EdgeHandler, EdgeStep, compose
from gateway.edge.steps import authenticate, finishing, from_http1, no_route, parse_and_run
from gateway.flow.exchange import ANTHROPIC, ENVELOPE, OPENAI
from providers.endpoints import MESSAGES, endpoint

if TYPE_CHECKING:
    from gateway.flow.exchange import Exchange, Reply

Parser = Callable[[Call], Awaitable["Exchange"]]
Finisher = Callable[[Call, "Reply"], Awaitable["Reply"]]


class Surface:
    __slots__ = ("name", "dialect", "handler")

    def __init__(self, name: str, dialect: str | Callable[[str], str], parser: Parser | None,
                 finish: Finisher | None = None) -> None:
        self.name = name  # the access log's "route"
        self.dialect = dialect  # errors are rendered in it: a dialect, or a function of the raw path
        steps: list[EdgeStep] = [from_http1, authenticate] if parser is not None else [no_route]
        if finish is not None:
            steps.append(finishing(finish))
        self.handler: EdgeHandler = compose(steps, parse_and_run(parser or _never))

    def dialect_of(self, raw_path: str) -> str:
        dialect = self.dialect
        return dialect if isinstance(dialect, str) else dialect(raw_path)


async def _never(call: Call) -> Exchange:
    raise AssertionError("no parser")


def v1_dialect(raw_path: str) -> str:
    """Anthropic's for the Messages endpoints (``messages``, ``messages/…``), else OpenAI's."""
    path = endpoint(raw_path[4:].partition("?")[0]).path  # (after "/v1/"; memoized per path)
    return ANTHROPIC if path == MESSAGES or path.startswith("messages/") else OPENAI


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
