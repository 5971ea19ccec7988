"""What an LLM request may cost, read from its body before it is sent (``policies.budget``).

Two numbers come out of a request:

- the **estimate** (SPEC §5): prompt characters / 4 plus a few tokens per message, and the
  answer's ``max_tokens`` — what the per-request soft and hard caps compare against;
- the **bound**: the most the upstream can bill for it — what a tenant's spend budget
  reserves, so that recorded spend can never pass the budget. A prompt costs at most one
  token per byte of the body (every text, tool and inline file is in it, and a token is at
  least one byte) plus ``Price.image_tokens`` per image (an inline image's own bytes are not
  text: they are counted as that image, not once more as bytes), and never more than the model's
  context window — which is also the bound when the prompt is not in the body at all
  (``previous_response_id``, ``conversation``, a stored ``prompt``, files by id or URL,
  item references). The answer costs at most its output limit (``max_tokens``,
  ``max_completion_tokens``, ``max_output_tokens``, ``max_tokens_to_sample``) times the
  choices asked for (``n``, ``best_of``, a batch of ``prompt``\\ s).

The body is read with typed decoders that skip what they do not need (a 10 MB body with
half a million keys is read in milliseconds); a shape they do not expect is read generically.
"""

from __future__ import annotations

from typing import Any

import msgspec

from providers import endpoints
from providers.pricing import MESSAGE_OVERHEAD, REPLY_PRIMER, Price, estimate_prompt_tokens

IMAGE_PARTS = frozenset(("image_url", "image", "input_image", "computer_screenshot"))
# Parts whose tokens the body does not bound: a file (by id, URL or inline: a compressed PDF holds
# more text than its bytes), a reference to stored items.
UNBOUNDED_PARTS = frozenset(("file", "input_file", "document", "container_upload", "item_reference", "search_result"))
# The output limit each endpoint reads, in the order a request may give them.
OUTPUT_FIELDS = {
    endpoints.CHAT: ("max_completion_tokens", "max_tokens"), endpoints.COMPLETIONS: ("max_tokens",),
    endpoints.FIM: ("max_tokens",), endpoints.MESSAGES: ("max_tokens",), endpoints.COMPLETE: ("max_tokens_to_sample",),
    endpoints.RESPONSES: ("max_output_tokens",), endpoints.EMBEDDINGS: (),
}


class NotReadable(Exception):
    """The body is not a JSON object."""


class View:
    """What a request body says about its cost."""

    __slots__ = ("model", "limits", "choices", "prompts", "chars", "messages", "images", "image_bytes", "unbounded",
                 "estimate", "multiplier")

    def __init__(self) -> None:
        self.model: str | None = None
        self.limits: dict[str, int | None] = {}  # output-limit fields present: value (None: not an int)
        self.choices = 1  # answers per prompt (n, best_of)
        self.prompts = 1  # prompts answered (a completions batch)
        self.chars = 0  # characters of text, for the estimate
        self.messages = 0
        self.images = 0
        self.image_bytes = 0  # bytes of the body that are images (inline data, URLs), priced per image instead
        self.unbounded = False  # the prompt holds content the body does not
        self.estimate: int | None = None  # set by the generic reader
        self.multiplier = 1.0  # a price above the text rate: priority processing, audio tokens

    def estimate_prompt(self) -> int:
        """SPEC §5's estimate: characters / 4 plus the per-message overhead."""
        if self.estimate is not None:
            return self.estimate
        return -(-self.chars // 4) + self.messages * MESSAGE_OVERHEAD + REPLY_PRIMER

    def bound_prompt(self, body_bytes: int, price: Price) -> int:
        if self.unbounded:
            return price.context
        return min(price.context, max(0, body_bytes - self.image_bytes) + self.messages * MESSAGE_OVERHEAD
                   + REPLY_PRIMER + self.images * price.image_tokens)


# ------------------------------------------------------------------ typed reading


_ABSENT = msgspec.Raw(b"")  # a Raw field's default (``Raw | None`` does not decode arrays)


class _Part(msgspec.Struct):
    type: Any = None
    text: Any = None
    content: str | list[_Part] | None = None  # Anthropic tool_result blocks nest content
    output: str | list[_Part] | None = None  # Responses tool outputs: text, or parts (images, files)
    image_url: msgspec.Raw = _ABSENT  # an image's URL or inline data (OpenAI; a string on Responses)
    source: msgspec.Raw = _ABSENT  # an Anthropic image's inline data or URL
    image: msgspec.Raw = _ABSENT


class _Message(msgspec.Struct):
    type: Any = None  # Responses input items
    content: str | list[_Part] | None = None
    tool_calls: msgspec.Raw = _ABSENT
    output: str | list[_Part] | None = None


class _Tool(msgspec.Struct):
    type: Any = None


class _Request(msgspec.Struct):
    model: Any = None
    messages: list[_Message] | None = None
    system: str | list[_Part] | None = None
    instructions: Any = None
    input: msgspec.Raw = _ABSENT
    prompt: msgspec.Raw = _ABSENT
    suffix: Any = None
    tools: msgspec.Raw = _ABSENT
    n: Any = None
    best_of: Any = None
    max_tokens: Any = msgspec.UNSET
    max_completion_tokens: Any = msgspec.UNSET
    max_output_tokens: Any = msgspec.UNSET
    max_tokens_to_sample: Any = msgspec.UNSET
    previous_response_id: Any = None
    conversation: Any = None
    service_tier: Any = None
    modalities: Any = None
    audio: Any = None


_decode_request = msgspec.json.Decoder(_Request).decode
_decode_tools = msgspec.json.Decoder(list[_Tool]).decode
# Tools the client runs itself: their results come back in a later request's body. Any other (web search,
# file search, MCP, code execution, Anthropic's web_fetch) pulls content into the prompt the body does not hold.
CLIENT_TOOLS = frozenset((None, "", "function", "custom"))
PRIORITY_FACTOR = 2.0  # service_tier "priority" bills about twice the standard rate
AUDIO_FACTOR = 16.0  # audio tokens bill up to 16x text tokens (gpt-4o-audio input: $40 vs $2.50 per 1M)

_decode_items = msgspec.json.Decoder(str | list[_Message]).decode
_decode_any = msgspec.json.Decoder().decode


def read(body: bytes, billed: str) -> View:
    """The cost view of a request to the ``billed`` endpoint; raises ``NotReadable``."""
    try:
        req = _decode_request(body)
    except msgspec.ValidationError:
        return _read_generic(body, billed)  # a shape the typed reader does not expect: read it whole
    except (msgspec.DecodeError, RecursionError):
        raise NotReadable() from None
    view = View()
    view.model = req.model if isinstance(req.model, str) else None
    for field in OUTPUT_FIELDS[billed]:
        value = getattr(req, field)
        if value is not msgspec.UNSET and value is not None:
            view.limits[field] = _count(value)
    view.choices = max(_count(req.n) or 1, _count(req.best_of) or 1)
    for message in req.messages or ():
        view.messages += 1
        _content(view, message.content)
        view.chars += len(message.tool_calls)
    _content(view, req.system)
    if isinstance(req.instructions, str):
        view.chars += len(req.instructions)
    view.chars += len(req.tools)
    if req.tools is not _ABSENT and _server_tools(req.tools):
        view.unbounded = True
    if req.service_tier == "priority":
        view.multiplier *= PRIORITY_FACTOR
    if req.audio is not None or (isinstance(req.modalities, list) and "audio" in req.modalities):
        view.multiplier *= AUDIO_FACTOR
    if isinstance(req.suffix, str):
        view.chars += len(req.suffix)
    if req.prompt is not _ABSENT:
        _prompt(view, req.prompt, billed)
    if req.input is not _ABSENT:
        _input(view, req.input, billed)
    if req.previous_response_id is not None or req.conversation is not None:
        view.unbounded = True
    return view


def _server_tools(raw: msgspec.Raw) -> bool:
    try:
        tools = _decode_tools(raw)
    except (msgspec.DecodeError, RecursionError):
        return True  # not a list of tools this reader knows: assume the worst
    return any(tool.type not in CLIENT_TOOLS for tool in tools)


def _count(value: Any) -> int | None:
    """A positive count as a lenient upstream reads it (``5``, ``5.0`` and ``"5"`` alike, as pydantic
    coerces them), or None for what no upstream takes as one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, float):
        if not value.is_integer():  # also nan and inf: no upstream takes them as a count
            return None
        value = int(value)
    if not isinstance(value, int):
        return None
    return value if value > 0 else None


def _content(view: View, content: Any) -> None:
    if content is None:
        return
    if isinstance(content, str):
        view.chars += len(content)
        return
    for part in content:
        kind = part.type
        if kind in IMAGE_PARTS:
            view.images += 1
            view.image_bytes += len(part.image_url) + len(part.source) + len(part.image)
        elif kind in UNBOUNDED_PARTS:
            view.unbounded = True
        if kind == "input_audio":
            view.multiplier = max(view.multiplier, AUDIO_FACTOR)
        if isinstance(part.text, str):
            view.chars += len(part.text)
        _content(view, part.output)
        _content(view, part.content)


def _prompt(view: View, raw: msgspec.Raw, billed: str) -> None:
    if billed == endpoints.RESPONSES:  # a stored prompt template: its text is not in the body
        view.unbounded = True
        return
    view.chars += len(raw)
    try:
        prompt = _decode_any(raw)
    except (msgspec.DecodeError, RecursionError):
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        view.prompts = len(prompt)  # a batch of prompts (strings or token lists): each is answered


def _input(view: View, raw: msgspec.Raw, billed: str) -> None:
    if billed != endpoints.RESPONSES:  # embeddings: strings or token ids, all in the body
        ids = _token_ids(raw)
        view.chars += len(raw) if ids is None else 4 * ids  # token ids are counted, not their digits
        return
    try:
        items = _decode_items(raw)
    except msgspec.ValidationError:
        view.chars += len(raw)
        view.unbounded = True  # not a shape this reader knows: assume the worst
        return
    except (msgspec.DecodeError, RecursionError):
        return
    if isinstance(items, str):
        view.chars += len(items)
        return
    for item in items:
        view.messages += 1
        if item.type in UNBOUNDED_PARTS:
            view.unbounded = True
        _content(view, item.output)
        _content(view, item.content)


_decode_token_ids = msgspec.json.Decoder(list[int | list[int]]).decode


def _token_ids(raw: msgspec.Raw) -> int | None:
    """How many token ids an embeddings ``input`` of token ids holds (a list of them, or of lists of them);
    None for text."""
    try:
        items = _decode_token_ids(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return sum(1 if isinstance(item, int) else len(item) for item in items)


# ------------------------------------------------------------------ any other shape


def _read_generic(body: bytes, billed: str) -> View:
    try:
        doc = _decode_any(body)
    except (msgspec.DecodeError, RecursionError):
        raise NotReadable() from None
    if not isinstance(doc, dict):
        raise NotReadable()
    view = View()
    model = doc.get("model")
    view.model = model if isinstance(model, str) else None
    for field in OUTPUT_FIELDS[billed]:
        if doc.get(field) is not None:
            view.limits[field] = _count(doc[field])
    view.choices = max(_count(doc.get("n")) or 1, _count(doc.get("best_of")) or 1)
    # Whatever the shape, the body's size bounds the text; every part is searched for images and files.
    view.estimate = estimate_prompt_tokens(doc)
    view.messages = len(doc["messages"]) if isinstance(doc.get("messages"), list) else 0
    _walk(view, doc, 0)
    if doc.get("previous_response_id") is not None or doc.get("conversation") is not None:
        view.unbounded = True
    tools = doc.get("tools")
    if tools is not None and (not isinstance(tools, list) or any(
            not isinstance(t, dict) or t.get("type") not in CLIENT_TOOLS for t in tools)):
        view.unbounded = True
    if doc.get("service_tier") == "priority":
        view.multiplier *= PRIORITY_FACTOR
    modalities = doc.get("modalities")
    if doc.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        view.multiplier *= AUDIO_FACTOR
    prompt = doc.get("prompt")
    if billed == endpoints.RESPONSES and prompt is not None:
        view.unbounded = True
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        view.prompts = len(prompt)
    return view


_IMAGE_FIELDS = ("image_url", "source", "image")


def _json_size(value: Any) -> int:
    """At most the bytes ``value`` took in the body (its strings' UTF-8; escapes only made it longer)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict):
        return sum(_json_size(v) for v in value.values())
    return 0


def _walk(view: View, node: Any, depth: int) -> None:
    if depth > 64:
        view.unbounded = True
        return
    if isinstance(node, dict):
        kind = node.get("type")
        if kind in IMAGE_PARTS:
            view.images += 1
            for field in _IMAGE_FIELDS:
                view.image_bytes += _json_size(node.get(field))
        elif kind in UNBOUNDED_PARTS:
            view.unbounded = True
        elif kind == "input_audio":
            view.multiplier = max(view.multiplier, AUDIO_FACTOR)
        for value in node.values():
            if isinstance(value, (dict, list)):
                _walk(view, value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, (dict, list)):
                _walk(view, value, depth + 1)
