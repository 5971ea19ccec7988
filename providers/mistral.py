"""Mistral: OpenAI-compatible wire format (requests, errors, usage, streams) with its own prices."""

from __future__ import annotations

from providers.openai import OpenAIProvider

# List prices, USD per 1M tokens (input, output), standard tier, text, late 2025; the key is a model
# name or the prefix of a family (``providers.pricing`` matches dated snapshots to it).
PRICES: dict[str, tuple[float, float]] = {
    "mistral-large": (2.0, 6.0), "mistral-medium": (0.40, 2.0), "mistral-small": (0.10, 0.30),
    "magistral-medium": (2.0, 5.0), "magistral-small": (0.50, 1.50), "codestral": (0.30, 0.90),
    "devstral-small": (0.10, 0.30), "devstral-medium": (0.40, 2.0), "ministral-8b": (0.10, 0.10),
    "ministral-3b": (0.04, 0.04), "open-mistral-nemo": (0.15, 0.15), "pixtral-large": (2.0, 6.0),
    "pixtral-12b": (0.15, 0.15), "mistral-embed": (0.10, 0.0), "codestral-embed": (0.15, 0.0),
}
# Context windows (see ``providers.openai.CONTEXT``).
CONTEXT: dict[str, int] = {
    "mistral": 128_000, "magistral": 128_000, "codestral": 256_000, "devstral": 128_000, "ministral": 128_000,
    "open-mistral-nemo": 128_000, "pixtral": 128_000, "mistral-embed": 8_192, "codestral-embed": 8_192,
}


class MistralProvider(OpenAIProvider):
    name = "mistral"
    otel_name = "mistral_ai"
    prices = PRICES
    reports_stream_usage = False  # stream_options is OpenAI's; Mistral reports a stream's usage unasked
    strict_fields = True  # a field its schema lacks (user, stream_options, …) is a 422
    also_speaks: frozenset[str] = frozenset()  # chat only: a Responses request is translated to chat
