"""The API shapes an LLM request and its answer come in — what the gateway must know to read them.

A ``Dialect`` is one shape: the path it is served at (under ``/v1``), how a complete answer
says what it cost (``read_usage``), and the ``StreamReader`` of its SSE events (None: a stream
relayed unread). A request's dialect is its endpoint's (``providers.endpoints``: the path the
upstream sees, however it is spelled); a provider names the dialect it speaks natively
(``Provider.speaks``). When the two differ, ``providers.translators`` crosses between them.

Adding a dialect (OpenAI's Responses API, say) is one ``Dialect`` here, its reader and usage
reader in the provider's module, and its translators in ``providers.translators``.
"""

from __future__ import annotations

from collections.abc import Callable

from providers import anthropic, openai, responses
from providers.base import StreamReader, Usage


class Dialect:
    __slots__ = ("name", "path", "read_usage", "stream")

    def __init__(self, name: str, path: str | None, read_usage: Callable[[bytes], Usage | None],
                 stream: type[StreamReader] | None) -> None:
        self.name = name
        self.path = path  # where the dialect is served, relative to /v1 (None: no one path)
        # the tokens a complete answer was billed for; None: no usage in it. Raises
        # msgspec.DecodeError for a body that is not JSON.
        self.read_usage = read_usage
        self.stream = stream

    def __repr__(self) -> str:
        return f"Dialect({self.name!r})"


CHAT = Dialect("chat", "chat/completions", openai.read_usage, openai.ChatStream)
COMPLETIONS = Dialect("completions", "completions", openai.read_usage, openai.ChatStream)  # choices, as chat's
MESSAGES = Dialect("messages", "messages", anthropic.read_usage, anthropic.MessagesStream)
RESPONSES = Dialect("responses", "responses", responses.read_usage, responses.ResponsesStream)
# Every other endpoint (embeddings, legacy complete, files, …): usage read the OpenAI way, streams unread.
OTHER = Dialect("other", None, openai.read_usage, None)

DIALECTS: dict[str | None, Dialect] = {d.name: d for d in (CHAT, COMPLETIONS, MESSAGES, RESPONSES)}
DIALECTS[None] = OTHER


def dialect(name: str | None) -> Dialect:
    """The dialect named by an endpoint (``Endpoint.dialect``) or a provider (``Provider.speaks``)."""
    return DIALECTS.get(name, OTHER)
