"""One adapter per upstream dialect (SPEC §6).

An adapter (``providers.base.Provider``) knows how a provider wants its credentials, how
to classify its errors, which dialect it speaks and what its models cost. Dialects
(``providers.dialects``) say how answers and streams are read; translators
(``providers.translators``) carry a request from the client's dialect to the upstream's
and its answer back. Upstream auth is resolved separately (``providers.auth``) so
translation never sees keys.
"""

from __future__ import annotations

from providers.anthropic import AnthropicProvider
from providers.base import Provider, StreamReader
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


def kind_of(name: str | None) -> str:
    """``llm`` or ``http``: the kind of target a provider name makes."""
    return _PROVIDERS[name or "http"].kind


__all__ = ["Provider", "StreamReader", "get_provider", "kind_of"]
