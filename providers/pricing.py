"""Prices (USD per 1M tokens) and the prompt-token estimate (SPEC §5 Budget, §4 ``pricing``).

The built-in table holds the providers' published list prices for text input and output
(standard tier, no batch discounts) as of late 2025; ``pricing:`` in the config
extends or overrides it. Prompt tokens read from or written to a provider's prompt cache
(``providers.base.Usage``) are priced at the model's own cache rates — kept as multiples of
its input price, so an overridden price keeps its family's discount: OpenAI's cached input
(``providers.openai.CACHED_INPUT``), Anthropic's cache reads and writes (``providers.anthropic``).
A model is priced by its exact name, else by the longest table entry it starts with, so
dated snapshots (``gpt-4o-mini-2024-07-18``, ``claude-3-5-haiku-20241022``) and ``-latest``
aliases find their family. A model the
table does not know is served and counted as unpriced (no estimate, no cap applies).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from providers import anthropic, mistral, openai
from providers.base import Usage

# model prefix: (input, output) USD per 1M tokens — each adapter knows its own provider's prices
BUILT_IN: dict[str, tuple[float, float]] = {**openai.PRICES, **anthropic.PRICES, **mistral.PRICES}
CONTEXT: dict[str, int] = {**openai.CONTEXT, **anthropic.CONTEXT, **mistral.CONTEXT}
DEFAULT_CONTEXT = 1_048_576  # a priced model whose context window the table does not know
IMAGE_TOKENS = 6_000  # the most one image costs in prompt tokens, unless the model's entry says more
IMAGE_TOKENS_BY_MODEL: dict[str, int] = {**openai.IMAGE_TOKENS}
# model prefix: (cache read, cache write, long cache write) as multiples of its input price; unlisted: (1, 1, 1)
CACHE_RATES: dict[str, tuple[float, float, float]] = {
    **{name: (cached / openai.PRICES[name][0], 1.0, 1.0) for name, cached in openai.CACHED_INPUT.items()},
    **{name: (anthropic.CACHE_READ, anthropic.CACHE_WRITE, anthropic.CACHE_WRITE_1H) for name in anthropic.PRICES},
    **{name: (1.0, 1.0, 1.0) for name in openai.PRICES if name not in openai.CACHED_INPUT},  # no discount: not a family's
}
NO_CACHE_RATES = (1.0, 1.0, 1.0)

MESSAGE_OVERHEAD = 4  # tokens per message for role and framing (OpenAI's rule of thumb)
REPLY_PRIMER = 3  # every reply is primed with a few tokens


class Price:
    """A model's prices (USD per token) and what bounds a prompt's size: its context window and
    the most an image may cost."""

    __slots__ = ("input", "output", "context", "image_tokens", "cached", "written", "written_long")

    def __init__(self, input_per_m: float, output_per_m: float, context: int = DEFAULT_CONTEXT,
                 image_tokens: int = IMAGE_TOKENS, cache_rates: tuple[float, float, float] = NO_CACHE_RATES) -> None:
        self.input = input_per_m / 1e6  # USD per token
        self.output = output_per_m / 1e6
        self.context = context
        self.image_tokens = image_tokens
        # USD per prompt token read from the prompt cache, written to it, written with a long retention
        self.cached, self.written, self.written_long = (self.input * rate for rate in cache_rates)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input + completion_tokens * self.output

    def charge(self, usage: Usage) -> float:
        """What an answer's reported usage costs: the prompt's cached and cache-written tokens at their own
        rates, the rest of it at the input price, every output token (reasoning included) at the output price."""
        prompt, completion, cached, written, written_long = usage
        if not (cached or written or written_long):  # the common answer: no prompt cache involved
            return max(0, prompt) * self.input + max(0, completion) * self.output
        prompt, completion, cached, written, written_long = (max(0, n) for n in usage)
        cached = min(cached, prompt)  # an upstream reporting more cached tokens than prompt tokens
        written = min(written, prompt - cached)
        written_long = min(written_long, prompt - cached - written)
        plain = prompt - cached - written - written_long
        return (plain * self.input + cached * self.cached + written * self.written + written_long * self.written_long
                + completion * self.output)


def family(table: Mapping[str, Any], by_length: list[str], model: str) -> Any:
    """``table``'s entry for ``model``: its exact name, else the longest family prefix it starts with
    (``gpt-4o-mini-2024-07-18`` → ``gpt-4o-mini``); ``provider/model`` names are read as ``model``."""
    found = table.get(model)
    if found is None:
        name = model.split("/")[-1]  # "openai/gpt-4o" on OpenAI-compatible routers
        found = table.get(name)
        if found is None:
            found = next((table[p] for p in by_length if name.startswith(p + "-") or name == p), None)
    return found


class PriceTable:
    """The built-in prices plus the config's ``pricing:`` (which wins), looked up by model."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        table = {name: (i, o) for name, (i, o) in BUILT_IN.items()}
        for name, price in (overrides or {}).items():
            table[name] = (price.input, price.output)
        self._table = table
        self.per_million = dict(table)
        self._by_length = sorted(table, key=len, reverse=True)
        self._context_by_length = sorted(CONTEXT, key=len, reverse=True)
        self._images_by_length = sorted(IMAGE_TOKENS_BY_MODEL, key=len, reverse=True)
        self._cache_by_length = sorted(CACHE_RATES, key=len, reverse=True)
        self._memo: dict[str, Price | None] = {}

    def price(self, model: str | None) -> Price | None:
        if not model:
            return None
        try:
            return self._memo[model]
        except KeyError:
            pass
        found = family(self._table, self._by_length, model)
        price = None
        if found is not None:
            context = family(CONTEXT, self._context_by_length, model) or DEFAULT_CONTEXT
            images = family(IMAGE_TOKENS_BY_MODEL, self._images_by_length, model) or IMAGE_TOKENS
            rates = family(CACHE_RATES, self._cache_by_length, model) or NO_CACHE_RATES
            price = Price(found[0], found[1], context, max(images, IMAGE_TOKENS), rates)
        if len(self._memo) < 4096:
            self._memo[model] = price
        return price


def _text_chars(content: Any) -> int:
    """Characters of text in a message's content: a string, or content blocks (text parts count;
    an image counts as a fixed ~1,000 characters, about what a small image costs in tokens)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for block in content:
            if isinstance(block, dict):
                kind = block.get("type")
                if kind in ("image", "image_url", "input_image"):
                    total += 1000
                else:
                    for key in ("text", "content", "input", "arguments"):
                        value = block.get(key)
                        if value is not None:
                            total += _text_chars(value) if not isinstance(value, dict) else len(str(value))
            elif isinstance(block, str):
                total += len(block)
        return total
    if content is None:
        return 0
    return len(str(content))


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """About chars/4 plus per-message overhead, for OpenAI chat, Anthropic messages and
    completions bodies (tools and the system prompt count as text)."""
    chars, messages = 0, 0
    listed = body.get("messages")
    for message in listed if isinstance(listed, list) else ():  # wrong shapes are the upstream's to refuse
        if isinstance(message, dict):
            messages += 1
            chars += _text_chars(message.get("content"))
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                chars += sum(len(str(call)) for call in calls)
    chars += _text_chars(body.get("system"))
    prompt = body.get("prompt")
    if prompt is not None:
        chars += _text_chars(prompt if not isinstance(prompt, list) else " ".join(map(str, prompt)))
    if body.get("tools"):
        chars += len(str(body["tools"]))
    return -(-chars // 4) + messages * MESSAGE_OVERHEAD + REPLY_PRIMER
