"""One adapter per upstream dialect (SPEC §6).

An adapter knows how a provider wants its credentials, how to classify its errors
and how to read its streams; as the LLM layer grows, how to translate requests to
and from the OpenAI shape and price its tokens. Upstream auth is resolved
separately (``providers.auth``) so translation never sees keys.
"""

from __future__ import annotations

from providers.anthropic import AnthropicProvider, MessagesStream
from providers.base import Provider, StreamReader
from providers.http import HttpProvider
from providers.mistral import MistralProvider
from providers.openai import ChatStream, OpenAIProvider

_PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "mistral": MistralProvider,
    "http": HttpProvider,
}


def get_provider(name: str) -> Provider:
    return _PROVIDERS[name]()


def stream_format(rel_path: str) -> type[StreamReader] | None:
    """The SSE format an upstream path answers in, by the path (not the provider: Anthropic
    also serves OpenAI's chat completions). None: a stream the gateway relays unread."""
    path = rel_path.rstrip("/")
    if path.endswith("chat/completions") or path == "completions" or path.endswith("/completions"):
        return ChatStream
    if path == "messages" or path.endswith("/messages"):
        return MessagesStream
    return None


__all__ = ["Provider", "StreamReader", "get_provider", "stream_format"]
