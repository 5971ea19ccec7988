"""One translator per (client dialect → upstream dialect): the seam every LLM attempt goes through.

``translator(ex, provider)`` picks it: the client's dialect is its endpoint's, the upstream's
the provider's (``Provider.speaks``). When they match (or nothing can be translated: a plain-HTTP
target, an endpoint with no dialect, a request that is not a POST) it is the identity, which only
asks an upstream that reports a stream's usage on request for it (the chunk is read, not relayed).
Otherwise it crosses: OpenAI Chat Completions ⇄ Anthropic Messages (``providers.translate``,
``providers.translate_stream``), and OpenAI Responses → either, for an upstream that does not serve the
Responses API (``providers.translate_responses``, ``providers.translate_responses_stream``; a provider
that speaks one dialect and serves others natively names them in ``Provider.also_speaks``). Each translator

- ``prepare``s the request: the body (made once per body: retries reuse it; a large one off the
  event loop), the path when it is not the client's, and the headers the upstream needs —
  ``ready`` first, which answers at once when there is nothing to make (most requests);
- ``reader`` reads the upstream's stream (``StreamReader``: events, end of answer, usage);
- ``answer`` turns a complete answer — success or error — into the client's dialect, in place;
- ``stream`` turns a stream into the client's dialect, event by event.

Prices are per model, whatever the dialect (``providers.pricing``). The gateway's ``Exchange`` and
``Target`` are read through the two protocols below, so that this package imports nothing of the flow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from gateway import jsonbody, offload
from gateway.errors import InvalidRequest, StreamBroken, UpstreamError
from gateway.streaming.sse import Aligner, UnreadableEvent, events
from providers import (
    translate,
    translate_responses,
    translate_responses_answer,
    translate_responses_stream,
    translate_stream,
)
from providers.anthropic import API_VERSION
from providers.dialects import CHAT, MESSAGES, RESPONSES, Dialect, dialect

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from providers.base import Provider, StreamReader
    from providers.endpoints import Endpoint


class Attempt(Protocol):
    """What a translator reads of a request (``gateway.flow.exchange.Exchange``)."""

    method: str
    body: bytes
    target: Upstream
    endpoint: Endpoint
    choices: int
    include_usage: bool
    ask_usage: bool  # the usage policy would like a stream's usage report
    prepared: tuple[bytes, Translator, bytes | None] | None  # (body, by whom, made from it): the memo


class Upstream(Protocol):
    """What a translator reads of a target (``gateway.upstream.targets.Target``)."""

    name: str
    kind: str
    provider: Provider
    max_tokens: int | None  # llm.max_tokens: the default a dialect that requires one gets


class Prepared:
    """A request as it goes upstream: its body (None: the client's, as it is), its path (None: the
    client's), and whether the upstream was asked for a usage report the client did not ask for (read,
    then dropped)."""

    __slots__ = ("body", "path", "asked_usage", "strip_usage")

    def __init__(self, body: bytes | None, path: str | None = None, asked_usage: bool = False,
                 strip_usage: bool = False) -> None:
        self.body = body
        self.path = path
        self.asked_usage = asked_usage
        self.strip_usage = strip_usage


AS_IS = Prepared(None)


class Translator:
    """The identity: the upstream speaks the client's dialect."""

    crosses = False

    def __init__(self, client: Dialect, upstream: Dialect) -> None:
        self.client = client
        self.upstream = upstream

    def ready(self, ex: Attempt, target: Upstream) -> Prepared | None:
        """The prepared request when nothing needs making (None: ``await prepare``)."""
        if ex.ask_usage and target.provider.reports_stream_usage:
            return None
        return AS_IS

    async def prepare(self, ex: Attempt, target: Upstream) -> Prepared:
        asked = await _asking_usage(ex, self)
        if asked is not None:
            return Prepared(asked, asked_usage=True, strip_usage=True)
        return AS_IS

    def headers(self, headers: CIMultiDict[str]) -> None:
        pass

    def reader(self, ex: Attempt, prepared: Prepared) -> StreamReader | None:
        """A reader for the upstream's stream (None: relayed unread)."""
        fmt = self.upstream.stream
        if fmt is None:
            return None
        return fmt(choices=ex.choices, include_usage=ex.include_usage or prepared.asked_usage)

    def answer(self, reply: Any, ex: Attempt) -> None:
        """A complete answer (``Reply``) to ``ex`` in the client's dialect, in place."""

    def upstream_id(self, client_id: str | None) -> str | None:
        """The upstream's own id of an answer, from the id its translation carries (the provider's records
        know only theirs)."""
        return client_id

    def stream(self, ex: Attempt, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return chunks


class Crossing(Translator):
    """A request in one dialect for an upstream of the other, and its answer back."""

    crosses = True

    def ready(self, ex: Attempt, target: Upstream) -> Prepared | None:
        return None

    async def prepare(self, ex: Attempt, target: Upstream) -> Prepared:
        made = ex.prepared
        if made is not None and made[0] is ex.body and made[1] is self:
            out = made[2]
        else:
            out, problem = await offload.run(*self.making(ex.body, target), inline_max=offload.WHOLE_MAX_BYTES)
            if out is None:
                param, message = problem
                raise InvalidRequest(message.format(target=target.name), param=param, target=target.name)
            ex.prepared = (ex.body, self, out)
        assert out is not None
        return Prepared(out, self.upstream.path, asked_usage=self.asks_usage(target))

    def making(self, body: bytes, target: Upstream) -> tuple[Any, ...]:
        """The plain function that makes the upstream's body, and its arguments (``gateway.offload.run``)."""
        return _translated, body, self.upstream.name, target.max_tokens, target.provider.reports_stream_usage

    def asks_usage(self, target: Upstream) -> bool:
        """The translated request asks for a stream's usage report (a Messages client's stream is read from
        OpenAI chunks, whose usage ``providers.translate`` asks for where the target can be asked)."""
        return self.upstream is CHAT and target.provider.reports_stream_usage

    def headers(self, headers: CIMultiDict[str]) -> None:
        if self.upstream is MESSAGES:
            headers.setdefault("anthropic-version", API_VERSION)
        else:
            for name in ("anthropic-version", "anthropic-beta"):
                headers.popall(name, None)

    def answer(self, reply: Any, ex: Attempt) -> None:
        if not reply.body and reply.status < 400:
            return
        try:
            doc = msgspec.json.decode(reply.body) if reply.body else None
        except msgspec.DecodeError:
            doc = None
        if not isinstance(doc, dict):
            if reply.status < 400:
                return  # not JSON: passed on as it is (the usage policy reports a broken success)
            doc = self._error_doc(reply)  # an HTML page from a proxy, a bare text: said in the client's error JSON
        elif reply.status < 400 and not isinstance(doc.get("content" if self.upstream is MESSAGES else "choices"), list):
            # JSON, but no answer in it: nothing to translate into one (a made-up empty answer would be a lie)
            label = "Anthropic message" if self.upstream is MESSAGES else "chat completion"
            error = UpstreamError(f"the upstream's answer is not a{'n' if label[0] == 'A' else ''} {label}",
                                  target=ex.target.name)
            error.answered = True  # (a 2xx the upstream may bill: charged like an answer whose cost cannot be read)
            raise error
        reply.body = msgspec.json.encode(self.translated(doc, reply.status, ex))
        reply.headers["Content-Type"] = "application/json"

    def _error_doc(self, reply: Any) -> dict[str, Any]:
        """An error answer that is not JSON as the upstream's dialect would have said it."""
        text = " ".join(bytes(reply.body or b"")[:600].decode("utf-8", "replace").split())[:300]
        kind = reply.headers.get("Content-Type", "").split(";")[0] or "no Content-Type"
        message = f"the upstream answered {reply.status} with a body that is not JSON ({kind})" + (f": {text}" if text else "")
        if self.upstream is MESSAGES:
            return {"type": "error", "error": {"type": "api_error", "message": message}}
        return {"error": {"message": message, "type": "server_error" if reply.status >= 500 else "invalid_request_error",
                          "code": None, "param": None}}

    def translated(self, doc: dict[str, Any], status: int, ex: Attempt) -> Any:
        """A complete answer (or error, ``status`` ≥ 400) to ``ex`` from the upstream's dialect into the
        client's."""
        to_messages = self.upstream is MESSAGES
        if status >= 400:
            return translate.openai_error_from_anthropic(doc, status) if to_messages \
                else translate.anthropic_error_from_openai(doc, status)
        if to_messages:
            return translate.anthropic_to_openai_response(doc)
        return translate.openai_to_anthropic_response(doc)

    def upstream_id(self, client_id: str | None) -> str | None:
        if client_id is None:
            return None
        if self.upstream is MESSAGES:  # msg_… ⇄ chatcmpl-… (providers.translate)
            return "msg_" + client_id.removeprefix("chatcmpl-")
        return "chatcmpl-" + client_id.removeprefix("msg_")

    def stream(self, ex: Attempt, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if self.upstream is MESSAGES:
            return _translated_stream(chunks, translate_stream.AnthropicToOpenAIStream(include_usage=ex.include_usage))
        return _translated_stream(chunks, translate_stream.OpenAIToAnthropicStream())


class ResponsesCrossing(Crossing):
    """A Responses request for an upstream that does not serve the Responses API (Anthropic, a chat-only
    one), and its answer back (``providers.translate_responses``, ``providers.translate_responses_answer``,
    ``providers.translate_responses_stream``)."""

    def making(self, body: bytes, target: Upstream) -> tuple[Any, ...]:
        return (translate_responses.request_body, body, self.upstream.name, target.max_tokens,
                target.provider.reports_stream_usage)

    def asks_usage(self, target: Upstream) -> bool:
        return self.upstream is CHAT and target.provider.reports_stream_usage

    def translated(self, doc: dict[str, Any], status: int, ex: Attempt) -> Any:
        from_messages = self.upstream is MESSAGES
        if status >= 400:
            return translate_responses_answer.openai_error(doc, status, from_anthropic=from_messages)
        echo = translate_responses_answer.echoed(ex.body)
        if from_messages:
            return translate_responses_answer.response_from_messages(doc, echo)
        return translate_responses_answer.response_from_chat(doc, echo)

    def upstream_id(self, client_id: str | None) -> str | None:
        if client_id is None:
            return None
        return ("msg_" if self.upstream is MESSAGES else "chatcmpl-") + client_id.removeprefix("resp_")

    def stream(self, ex: Attempt, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        echo = translate_responses_answer.echoed(ex.body)
        if self.upstream is MESSAGES:
            return _translated_stream(chunks, translate_responses_stream.MessagesToResponsesStream(echo))
        return _translated_stream(chunks, translate_responses_stream.ChatToResponsesStream(echo))


# The translators, made once: identities by dialect, crossings by (client, upstream).
_IDENTITY = {name: Translator(dialect(name), dialect(name)) for name in ("chat", "completions", "messages",
                                                                         "responses", None)}
_CROSSINGS = {("chat", "messages"): Crossing(CHAT, MESSAGES), ("messages", "chat"): Crossing(MESSAGES, CHAT),
              ("responses", "messages"): ResponsesCrossing(RESPONSES, MESSAGES),
              ("responses", "chat"): ResponsesCrossing(RESPONSES, CHAT)}


def translator(ex: Attempt, target: Upstream) -> Translator:
    """The translator for one attempt of ``ex`` against ``target``."""
    endpoint = ex.endpoint
    asked = endpoint.dialect
    if target.kind != "llm" or ex.method != "POST":  # only a POSTed request is a chat/messages call
        return _IDENTITY[asked]
    speaks = target.provider.speaks
    if asked == speaks or asked is None or asked in target.provider.also_speaks:
        if endpoint.path == "messages/count_tokens" and speaks != "messages":
            raise InvalidRequest(f"messages/count_tokens: target {target.name} speaks the OpenAI dialect, which "
                                 "has no token-counting endpoint", target=target.name)
        return _IDENTITY[asked]
    return _CROSSINGS.get((asked, speaks)) or _IDENTITY[asked]  # no translation known: passed on as it is


async def _translated_stream(chunks: AsyncIterator[bytes], translator: Any) -> AsyncIterator[bytes]:
    aligner = Aligner(strict=True)
    try:
        async for chunk in chunks:
            try:
                out = b"".join(translator.feed(name, data) for name, data in events(aligner.feed(chunk)))
            except UnreadableEvent as e:  # dropped, the stream would end looking complete with a part missing
                raise StreamBroken(f"the upstream's stream could not be translated: {e}") from None
            if out:
                yield out
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def _translated(body: bytes, to: str, default_max_tokens: int | None,
                openai_fields: bool = True) -> tuple[bytes | None, tuple[str | None, str]]:
    """``body`` translated to the ``to`` dialect: (the bytes, ("", "")), or (None, (param, message)) with
    ``{target}`` in the message — a plain function of bytes, so that it can run in another process."""
    try:
        doc: Any = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        doc = None
    label = "Anthropic" if to == "messages" else "OpenAI"
    if not isinstance(doc, dict):  # nothing to translate: never sent on untranslated to the other dialect
        return None, (None, f"the request body must be a JSON object to be sent to target {{target}} ({label})")
    try:
        if to == "messages":
            n = doc.get("n")
            if isinstance(n, int) and n > 1:  # one answer, not n: said, not silently dropped
                return None, ("n", "n: target {target} (Anthropic) answers one choice per request; "
                                   "send n=1 or leave it out")
            out = translate.openai_to_anthropic_request(doc, default_max_tokens=default_max_tokens)
        else:
            out = translate.anthropic_to_openai_request(doc, openai_fields=openai_fields)
        return msgspec.json.encode(out), ("", "")
    except translate.Untranslatable as e:
        return None, (e.param, e.why)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError):
        # JSON the client's own API would refuse (a number where text belongs, a tool call that is
        # not an object, …): the client's error, said as one — never a 500 from the translator
        return None, (None, f"the request cannot be translated for target {{target}} ({label}): a field has the "
                            "wrong type or shape")


# ---------------------------------------------------------------- asking a stream for its usage


async def _asking_usage(ex: Attempt, by: Translator) -> bytes | None:
    """``ex.body`` with ``stream_options.include_usage: true`` (None when it is not a JSON object);
    remembered for the body it was made from, so retries reuse it."""
    made = ex.prepared
    body = ex.body
    if made is not None and made[0] is body and made[1] is by:
        return made[2]
    end = body.rfind(b"}")
    # (``find``, not ``in``: see gateway.streaming.sse)
    if end > 0 and body.find(b'"stream_options"') < 0 and body.find(b'"stream"') >= 0 and not body[end + 1:].strip():
        # A streaming request is a JSON object with at least "stream" in it (the exchange was
        # read from it): the option is spliced in before its closing brace, not re-encoded.
        out: bytes | None = body[:end] + b',"stream_options":{"include_usage":true}}'
    else:
        out = await offload.run(with_usage_asked, body, inline_max=offload.WHOLE_MAX_BYTES)
    ex.prepared = (body, by, out)
    return out


class _Options(msgspec.Struct):
    stream_options: Any = None


_decode_options = msgspec.json.Decoder(_Options).decode


def with_usage_asked(body: bytes) -> bytes | None:
    """``body`` with its ``stream_options`` (kept) asking for the usage chunk; None when it is no JSON object."""
    try:
        options = _decode_options(body).stream_options
    except (msgspec.DecodeError, RecursionError):
        return None
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    try:
        return jsonbody.edit(body, {"stream_options": merged})
    except jsonbody.NotAnObject:
        return None
