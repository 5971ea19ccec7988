"""A request in one LLM dialect sent to a target of the other (``providers.translate``).

``crossing(ex, target)`` says whether this attempt crosses: the client's format is the
path it called (``chat/completions`` → OpenAI, ``messages`` → Anthropic), the target's is
its provider's. When it does, ``Crossing`` gives the target's path, the translated body
(made once per body, so retries reuse it) and the headers the target needs, and turns
the answer back — a complete body, an error body, or the stream event by event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
from multidict import CIMultiDict

from gateway import offload
from gateway.errors import InvalidRequest
from gateway.streaming.sse import Aligner, events
from providers import translate
from providers.anthropic import API_VERSION

if TYPE_CHECKING:
    from gateway.flow.exchange import Exchange, Reply
    from gateway.upstream.targets import Target

ANTHROPIC_VERSION = API_VERSION
_FORMATS = {"chat/completions": "openai", "messages": "anthropic"}


class Crossing:
    __slots__ = ("to", "rel")

    def __init__(self, to: str) -> None:
        self.to = to  # the target's dialect
        self.rel = "messages" if to == "anthropic" else "chat/completions"

    async def body(self, ex: Exchange, target: Target) -> bytes:
        """The request translated for the target (made once per body: retries reuse it); a large one is
        translated off the event loop (``gateway.offload``)."""
        made = ex.crossed
        if made is not None and made[0] is ex.body and made[1] == self.to:
            return made[2]  # type: ignore[return-value]
        llm = target.config.llm
        out, problem = await offload.run(translated, ex.body, self.to, llm.max_tokens if llm is not None else None,
                                         inline_max=offload.WHOLE_MAX_BYTES)
        if out is None:
            param, message = problem
            raise InvalidRequest(message.format(target=target.name), param=param, target=target.name)
        ex.crossed = (ex.body, self.to, out)
        return out

    def headers(self, headers: CIMultiDict[str]) -> None:
        if self.to == "anthropic":
            headers.setdefault("anthropic-version", ANTHROPIC_VERSION)
        else:
            for name in ("anthropic-version", "anthropic-beta"):
                headers.popall(name, None)

    def answer(self, reply: Reply) -> None:
        """Turn a complete answer (success or error) into the client's dialect, in place."""
        if not reply.body:
            return
        try:
            doc = msgspec.json.decode(reply.body)
        except msgspec.DecodeError:
            return  # not JSON: passed on as it is (the usage policy reports a broken success)
        if not isinstance(doc, dict):
            return
        if reply.status >= 400:
            out = translate.openai_error_from_anthropic(doc, reply.status) if self.to == "anthropic" \
                else translate.anthropic_error_from_openai(doc, reply.status)
        elif self.to == "anthropic":
            out = translate.anthropic_to_openai_response(doc)
        else:
            out = translate.openai_to_anthropic_response(doc)
        reply.body = msgspec.json.encode(out)
        reply.headers["Content-Type"] = "application/json"

    def stream(self, ex: Exchange, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if self.to == "anthropic":
            return _translated(chunks, translate.AnthropicToOpenAIStream(include_usage=ex.include_usage))
        return _translated(chunks, translate.OpenAIToAnthropicStream())


async def _translated(chunks: AsyncIterator[bytes], translator: Any) -> AsyncIterator[bytes]:
    aligner = Aligner()
    try:
        async for chunk in chunks:
            out = b"".join(translator.feed(name, data) for name, data in events(aligner.feed(chunk)))
            if out:
                yield out
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def translated(body: bytes, to: str, default_max_tokens: int | None) -> tuple[bytes | None, tuple[str | None, str]]:
    """``body`` translated to the ``to`` dialect: (the bytes, ("", "")), or (None, (param, message)) with
    ``{target}`` in the message — a plain function of bytes, so that it can run in another process."""
    try:
        doc: Any = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict):  # nothing to translate: never sent on untranslated to the other dialect
        return None, (None, f"the request body must be a JSON object to be sent to target {{target}} ({to})")
    try:
        if to == "anthropic":
            n = doc.get("n")
            if isinstance(n, int) and n > 1:  # one answer, not n: said, not silently dropped
                return None, ("n", "n: target {target} (Anthropic) answers one choice per request; "
                                   "send n=1 or leave it out")
            out = translate.openai_to_anthropic_request(doc, default_max_tokens=default_max_tokens)
        else:
            out = translate.anthropic_to_openai_request(doc)
        return msgspec.json.encode(out), ("", "")
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as e:
        # JSON the client's own API would refuse (a number where text belongs, a tool call that is
        # not an object, …): the client's error, said as one — never a 500 from the translator
        detail = f"{type(e).__name__}: {e}".replace("{", "{{").replace("}", "}}")
        return None, (None, f"the request cannot be translated for target {{target}} ({to}): a field has the "
                            f"wrong type or shape ({detail})")


def crossing(ex: Exchange, target: Target) -> Crossing | None:
    if target.kind != "llm" or ex.method != "POST":  # only a POSTed request is a chat/messages call
        return None
    asked = _FORMATS.get(ex.endpoint.billed)  # type: ignore[arg-type]
    if asked is None:
        if ex.endpoint.path == "messages/count_tokens" and target.provider.name != "anthropic":
            raise InvalidRequest(f"messages/count_tokens: target {target.name} speaks the OpenAI dialect, which "
                                 "has no token-counting endpoint", target=target.name)
        return None
    speaks = "anthropic" if target.provider.name == "anthropic" else "openai"
    return Crossing(speaks) if asked != speaks else None
