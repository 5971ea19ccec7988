"""One adapter per upstream dialect (SPEC §6).

An adapter knows how a provider wants its credentials and, as the LLM layer
grows, how to read usage from its responses and streams, translate requests to
and from the OpenAI shape, classify its errors and price its tokens. Upstream
auth is resolved separately (``providers.auth``) so translation never sees keys.
"""

from __future__ import annotations

from providers.anthropic import AnthropicProvider
from providers.base import Provider
from providers.http import HttpProvider
from providers.mistral import MistralProvider
from providers.openai import OpenAIProvider

_PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "mistral": MistralProvider,
    "http": HttpProvider,
}


def get_provider(name: str) -> Provider:
    return _PROVIDERS[name]()


__all__ = ["Provider", "get_provider"]
