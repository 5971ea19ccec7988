"""The fixed shape every provider adapter has.

- credentials: ``key_header`` / ``key_prefix`` (how a configured key is attached);
- ``classify``: an upstream error answer → a ``Failure`` the policies decide on (rate
  limit, overloaded, spent quota, context length, content policy, auth);
- ``kind``: ``llm`` (the gateway reads its answers: usage, streams, translation) or ``http``;
- ``speaks``: the dialect its API is in (``providers.dialects``: ``chat``, ``messages``; None for
  plain HTTP); a request in another dialect is translated (``providers.translators``) unless the API also
  serves it (``also_speaks``);
- ``reports_stream_usage``: a stream's usage report can be asked for (OpenAI's
  ``stream_options.include_usage``), so a streamed answer's cost is exact;
- ``requires_max_tokens``: a request without ``max_tokens`` is refused (Anthropic);
- ``prices``: its models' list prices, USD per 1M tokens (``providers.pricing``).

Usage in an answer and the events of a stream are read by dialect, not by provider
(``providers.dialects``: Anthropic also serves an OpenAI-compatible endpoint); the readers
(``StreamReader``) live with the provider whose dialect they read.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.failures import Failure, for_status
from gateway.headers import retry_after_s, should_retry

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


class Usage(NamedTuple):
    """The tokens an answer was billed for, as its provider reported them (``providers.pricing`` prices them).

    ``prompt`` and ``completion`` keep their usual meaning — every input token, cached or not (OpenAI's
    ``prompt_tokens`` / ``input_tokens``, Anthropic's input plus cache reads and writes), and every output
    token, reasoning included; the rest say how many of the prompt's were billed at another rate."""

    prompt: int
    completion: int
    cached: int = 0  # of the prompt: read from the provider's prompt cache (the cached-input rate)
    written: int = 0  # of the prompt: written to the cache (Anthropic: 1.25× input)
    written_long: int = 0  # of the prompt: written with a long retention (Anthropic's 1-hour cache: 2× input)


# ``new_usage((prompt, completion, cached, written, written_long))``: a Usage built in C — calling the class
# runs NamedTuple's Python ``__new__``, ≈ 3 k instructions on every answer read
new_usage = partial(tuple.__new__, Usage)


class Provider:
    name: str = "http"
    kind: str = "http"
    speaks: str | None = None
    also_speaks: frozenset[str] = frozenset()  # further dialects its API serves natively (OpenAI: responses)
    reports_stream_usage: bool = False
    strict_fields: bool = False  # refuses a body field its API lacks (Mistral: 422 extra_forbidden)
    requires_max_tokens: bool = False
    # How a configured key is attached when the auth block does not name a header.
    key_header: str = "Authorization"
    key_prefix: str = "Bearer "
    prices: Mapping[str, tuple[float, float]] = {}  # model (or family prefix): (input, output) USD per 1M tokens
    otel_name: str | None = None  # its gen_ai.provider.name (OpenTelemetry GenAI conventions; gateway.observe.spans)

    def classify(self, status: int, headers: Headers, body: bytes, now: float) -> Failure | None:
        """What an answer with this status means for retry, circuit and fallback (None: success)."""
        if status < 400:
            return None
        return for_status(status, retry_after_s=retry_after_s(headers, now), should_retry=should_retry(headers))


class LLMProvider(Provider):
    """LLM APIs: beyond the status, the error body says whether a 429 is a spent quota (not
    retried: it will not recover in seconds), or a 400 a prompt over the context window or a
    content-policy refusal (their own reasons, so ``fallback_on`` can tell them apart). The
    wordings of OpenAI, Anthropic and the OpenAI-compatible servers are all looked for."""

    kind = "llm"
    speaks: str | None = "chat"

    def classify(self, status: int, headers: Headers, body: bytes, now: float) -> Failure | None:
        if status < 400:
            return None
        ra, sr = retry_after_s(headers, now), should_retry(headers)
        if status == 529 or (status >= 500 and b"overloaded_error" in body):
            return Failure("upstream_overloaded", "5xx", trips_breaker=True, retry_after_s=ra, should_retry=sr)
        if status == 429 and any(s in body for s in _QUOTA):
            return Failure("quota_exhausted", None, retry_after_s=ra, should_retry=False if sr is None else sr)
        if status in (400, 413, 422):
            if any(s in body for s in _CONTEXT):
                return Failure("context_length_exceeded", should_retry=sr)
            if any(s in body for s in _CONTENT_POLICY):
                return Failure("content_policy_violation", should_retry=sr)
        return for_status(status, retry_after_s=ra, should_retry=sr)


# Substrings of an error body → reason.
_QUOTA = (b"insufficient_quota", b"billing_hard_limit_reached", b"enforced_spend_limit_reached",
          b"exceeded your current quota")
_CONTEXT = (b"context_length_exceeded", b"maximum context length", b"string_above_max_length",
            b"prompt is too long", b"context window")
_CONTENT_POLICY = (b"content_policy_violation", b"content_filter", b"content_management_policy",
                   b"responsible_ai_policy")


class StreamReader:
    """Watches one relayed SSE stream, event by event (see ``gateway.streaming.streams``).

    State a reader keeps up to date in ``feed``:

    - ``done``: the format's end marker arrived (``[DONE]``, ``message_stop``);
    - ``finished``: the answer itself is complete (every choice has its finish reason),
      so a stream that then ends without the marker can be finalised with ``terminator``;
    - ``settled``: finished and nothing else is expected (the usage chunk, if asked for);
    - ``error``: the upstream's own in-band error event (message), relayed as it came;
    - ``prompt_tokens`` / ``completion_tokens``: usage as reported (``usage_seen``: the final report came),
      ``cached_tokens`` / ``written_tokens`` / ``written_long_tokens`` the prompt's share of it read from
      and written to the prompt cache (``Usage``);
    - ``parts`` / ``recoverable``: the text the client has received, and whether the
      stream is plain text a continuation could extend (no tools, one choice);
    - ``preamble``: only the format's lifecycle events so far (a Responses stream's ``response.created``,
      ``response.in_progress``): nothing is answered yet, so the stream's head goes on until something is,
      and an error there is still one that can be retried or fall back. ``preamble_timed``: the first-byte
      timeout runs until the preamble ends (a Responses stream's: ``response.created`` comes at once, whatever the
      model does); else only until its first event, and then the stream's idle timeout (Anthropic pings a
      stream that waits on a slow model).
    """

    terminator = b""
    preamble = False
    preamble_timed = True
    marks_usage_only = False  # ``usage_only`` is kept up to date (a format with a usage-only event)

    def __init__(self, *, choices: int = 1, include_usage: bool = False) -> None:
        self.choices = choices
        self.include_usage = include_usage
        self.done = False
        self.finished = False
        self.usage_seen = False
        self.usage_only = False  # the event last fed was only a usage report (OpenAI's answer to include_usage)
        self.error: str | None = None
        self.error_failure: Failure | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens = 0
        self.written_tokens = 0
        self.written_long_tokens = 0
        self.parts: list[str] = []
        self.recoverable = choices == 1
        self.malformed = 0  # events whose data could not be read (relayed anyway)
        # bytes of generated content relayed (text, tool arguments, refusals, thinking): a token is at least
        # one of them, so a stream cut before its usage report is charged this many output tokens at most
        self.generated = 0
        self.model: str | None = None  # the model that answered, when the stream says
        self.finish_reasons: list[str] = []  # as the stream reported them (for traces)

    @property
    def settled(self) -> bool:
        return self.finished and (self.usage_seen or not self.include_usage)

    def usage(self) -> Usage | None:
        """The usage reported so far (None: none)."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return Usage(self.prompt_tokens or 0, self.completion_tokens or 0, self.cached_tokens, self.written_tokens,
                     self.written_long_tokens)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, name: bytes, data: bytes) -> None:
        raise NotImplementedError

    # -- continuation (stream_recovery: continue) --------------------------------

    @staticmethod
    def continuation_body(body: bytes, partial: str, provider: str, model: str | None) -> bytes | None:
        """The original request asking the model to continue ``partial`` (None: not possible)."""
        return None

    def splicer(self) -> Splicer:
        """Rewrites a continuation's events so they extend this stream as one answer."""
        raise NotImplementedError


class Splicer:
    def __init__(self, original: StreamReader) -> None:
        self.original = original

    def event(self, name: bytes, data: bytes, raw: bytes) -> bytes:
        """The bytes to send the client for one continuation event (b"" to drop it)."""
        raise NotImplementedError
