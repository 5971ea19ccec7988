"""Anthropic Messages API: keys travel in ``x-api-key``, not ``Authorization``."""

from __future__ import annotations

from providers.base import Provider


class AnthropicProvider(Provider):
    name = "anthropic"
    key_header = "x-api-key"
    key_prefix = ""
