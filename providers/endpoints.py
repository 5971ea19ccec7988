"""Which LLM endpoint a request is for, however its path is spelled.

Policies decide by endpoint, not by path string: a budget must not be walked around with
``chat/completions/`` (a trailing slash), ``Chat/Completions``, ``chat/%63ompletions``,
``chat/completions;x=1`` or ``v1/chat/completions`` on ``/t/``. ``endpoint(path)`` takes the
path the upstream will see (the target's base path and the client's, ``Exchange``),
normalises it once (percent-escapes decoded, ``;`` parameters dropped, lower case, everything
up to a ``v1`` segment dropped) and says:

- ``billed``: the canonical name of an endpoint that bills tokens and whose cost can be
  bounded before it runs — ``chat/completions`` (also Azure's
  ``openai/deployments/{d}/chat/completions`` and Mistral's ``agents/completions``),
  ``completions`` (also ``engines/{e}/completions``), ``fim/completions``, ``messages``,
  ``complete``, ``responses``, ``embeddings``;
- ``free``: an endpoint known to cost nothing per call (models, files, uploads, vector stores,
  assistants and threads but their runs, conversations, a stored chat completion's metadata
  (``chat/completions/{id}``), ``messages/count_tokens``, ``responses/input_tokens``, cancelling). A tenant with a spend budget may POST to billed and free endpoints only: every
  other one — batches, images, audio, realtime, runs, ``responses/compact``, whatever a provider
  adds next — could cost what no reservation holds;
- ``dialect``: the API shape its requests and answers are in (``providers.dialects``): ``chat``,
  ``completions`` (also FIM), ``messages``, ``responses``, or None (read as OpenAI's, never translated);
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
# Known to cost nothing per call: by first segment (a run, wherever it is, is not free), by whole path.
_FREE_FIRST = frozenset(("models", "files", "uploads", "vector_stores", "assistants", "threads", "conversations"))
_FREE_PATHS = frozenset(("messages/count_tokens", "responses/input_tokens"))
_FREE_LAST = frozenset(("cancel",))


# The dialect of each billed endpoint (the rest: None).
_DIALECTS = {CHAT: "chat", COMPLETIONS: "completions", FIM: "completions", MESSAGES: "messages", RESPONSES: "responses"}


class Endpoint:
    __slots__ = ("path", "billed", "free", "dialect")

    def __init__(self, path: str, billed: str | None, free: bool) -> None:
        self.path = path
        self.billed = billed
        self.free = free
        self.dialect = _DIALECTS.get(billed)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Endpoint({self.path!r}, billed={self.billed!r}, free={self.free})"


def normalize(path: str) -> str:
    """A path (validated by ``gateway.upstream.paths``) as an upstream would read it, from its API version on."""
    path = unquote(path) if "%" in path else path
    segments = [s.partition(";")[0].lower() for s in path.split("/") if s]
    if "v1" in segments:  # /v1/…, /openai/v1/…, /api/v1/…: the endpoint is what follows
        del segments[:segments.index("v1") + 1]
    return "/".join(segments)


def endpoint(path: str) -> Endpoint:
    found = _memo.get(path)
    if found is None:
        found = _classify(normalize(path))
        if len(_memo) < 4096:  # paths come from clients: bounded
            _memo[path] = found
    return found


def _classify(path: str) -> Endpoint:
    billed = _EXACT.get(path)
    if billed is None:
        billed = next((name for suffix, name in _SUFFIXES if path.endswith(suffix)), None)
    segments = path.split("/")
    free = billed is None and (path in _FREE_PATHS or segments[-1] in _FREE_LAST
                               or (segments[0] in _FREE_FIRST and "runs" not in segments)
                               or (len(segments) == 3 and path.startswith("chat/completions/")))  # a stored one
    return Endpoint(path, billed, free)


_memo: dict[str, Endpoint] = {}
