"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, Groq, OpenRouter, …)."""

from __future__ import annotations

from providers.base import Provider


class OpenAIProvider(Provider):
    name = "openai"
