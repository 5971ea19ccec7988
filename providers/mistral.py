"""Mistral: OpenAI-compatible wire format with its own prices and quirks."""

from __future__ import annotations

from providers.openai import OpenAIProvider


class MistralProvider(OpenAIProvider):
    name = "mistral"
