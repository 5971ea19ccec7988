"""Which LLM endpoint a request is for, however its path is spelled.

Policies decide by endpoint, not by path string: a budget must not be walked around with
``chat/completions/`` (a trailing slash), ``Chat/Completions``, ``chat/%63ompletions``,
``chat/completions;x=1`` or ``v1/chat/completions`` on ``/t/``. ``endpoint(rel_path)``
normalises a validated path once (percent-escapes decoded, ``;`` parameters dropped, lower
case, a leading ``v1`` dropped) and says:

- ``billed``: the canonical name of an endpoint that bills tokens and whose cost can be
  bounded before it runs — ``chat/completions`` (also Azure's
  ``openai/deployments/{d}/chat/completions`` and Mistral's ``agents/completions``),
  ``completions`` (also ``engines/{e}/completions``), ``fim/completions``, ``messages``,
  ``complete``, ``responses``, ``embeddings``;
- ``unbounded``: an endpoint that costs money in a way no request field bounds (batches,
  images, audio, fine-tuning, realtime, videos, assistant runs, containers): a tenant with
  a spend budget may not call it;
- ``path``: the normalised path, for everything else that looks at it.
"""

from __future__ import annotations

from urllib.parse import unquote

CHAT, COMPLETIONS, FIM, MESSAGES, COMPLETE, RESPONSES, EMBEDDINGS = (
    "chat/completions", "completions", "fim/completions", "messages", "complete", "responses", "embeddings",
)
_EXACT = {CHAT: CHAT, COMPLETIONS: COMPLETIONS, FIM: FIM, MESSAGES: MESSAGES, COMPLETE: COMPLETE,
          RESPONSES: RESPONSES, EMBEDDINGS: EMBEDDINGS, "agents/completions": CHAT}
# Paths that end like these bill like them (deployment- and engine-scoped spellings).
_SUFFIXES = (("/chat/completions", CHAT), ("/embeddings", EMBEDDINGS), ("/completions", COMPLETIONS))
# A segment that makes a POST cost money no request field bounds.
_UNBOUNDED = frozenset(("batches", "images", "audio", "fine_tuning", "fine-tunes", "realtime", "videos", "runs",
                        "containers"))
_FREE_LAST = frozenset(("cancel",))  # cancelling one of those costs nothing


class Endpoint:
    __slots__ = ("path", "billed", "unbounded")

    def __init__(self, path: str, billed: str | None, unbounded: bool) -> None:
        self.path = path
        self.billed = billed
        self.unbounded = unbounded

    def __repr__(self) -> str:
        return f"Endpoint({self.path!r}, billed={self.billed!r}, unbounded={self.unbounded})"


def normalize(rel_path: str) -> str:
    """``rel_path`` (validated by ``gateway.paths``) as an upstream would read it."""
    path = unquote(rel_path) if "%" in rel_path else rel_path
    segments = [s.partition(";")[0].lower() for s in path.split("/") if s]
    if segments and segments[0] == "v1":
        del segments[0]
    return "/".join(segments)


def endpoint(rel_path: str) -> Endpoint:
    found = _memo.get(rel_path)
    if found is None:
        found = _classify(normalize(rel_path))
        if len(_memo) < 4096:  # paths come from clients: bounded
            _memo[rel_path] = found
    return found


def _classify(path: str) -> Endpoint:
    billed = _EXACT.get(path)
    if billed is None:
        billed = next((name for suffix, name in _SUFFIXES if path.endswith(suffix)), None)
    segments = path.split("/")
    unbounded = billed is None and segments[-1] not in _FREE_LAST and any(s in _UNBOUNDED for s in segments)
    return Endpoint(path, billed, unbounded)


_memo: dict[str, Endpoint] = {}
