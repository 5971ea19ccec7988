"""What the response-cache tests share (``tests/test_cache.py``, ``tests/test_cache_storing.py``): the config, the
requests, and how an answer is looked at."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from gateway.store.memory import MemoryStore
from tests.support.config import NO_5XX_RETRY, PASSTHROUGH, GatewayConfig
from tests.support.gateway import until as eventually  # noqa: F401 (the cache tests import it from here)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "what is the capital of France?"}],
        "temperature": 0}
STREAM = {**CHAT, "stream": True}
MESSAGES = {"model": "claude-test-1", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
CACHE_ON = {"ttl_s": 60}


def config(url: str, *, cache: dict | None = CACHE_ON, rest_cache: dict | None = ..., tenants: list[dict] = ()
           ) -> GatewayConfig:
    """Targets ``up`` (OpenAI), ``claude`` (Anthropic) and ``rest`` (plain HTTP echo), all with
    ``cache`` (``rest_cache`` instead for ``rest`` when given; ``None``: no block); 5xx answers are not retried."""
    cfg = GatewayConfig(url, default_target="up").tenants(*tenants)
    cfg.up(retry_matrix=NO_5XX_RETRY, cache=cache).claude(retry_matrix=NO_5XX_RETRY, cache=cache)
    return cfg.rest(auth=PASSTHROUGH, retry_matrix=NO_5XX_RETRY, cache=cache if rest_cache is ... else rest_cache)


def tenants_block(**a_fields: object) -> list[dict]:
    """Tenants ``a`` (with ``a_fields``) and ``b``."""
    return [{"name": "a", "api_key": KEY_A, **a_fields}, {"name": "b", "api_key": KEY_B}]


class Answer:
    """One response as the client saw it."""

    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def cache(self) -> str | None:
        return self.headers.get("X-Cache")

    def json(self) -> dict:
        return msgspec.json.decode(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, X-Cache={self.cache}, {self.body[:120]!r})"


async def send(client, method: str, path: str, *, json: dict | None = None, headers: dict | None = None) -> Answer:
    async with client.request(method, path, json=json, headers=headers) as resp:
        return Answer(resp.status, resp.headers, await resp.read())


async def chat(client, body: dict = CHAT, *, path: str = "/v1/chat/completions", headers: dict | None = None) -> Answer:
    return await send(client, "POST", path, json=body, headers=headers)


async def get(client, path: str = "/t/rest/items?a=1", *, headers: dict | None = None) -> Answer:
    return await send(client, "GET", path, headers=headers)


def upstream_request_id(answer: Answer) -> str:
    """The request id the echo upstream received: which upstream call produced this body."""
    return {k.lower(): v for k, v in answer.json()["headers"].items()}["x-request-id"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_hit(answer: Answer) -> None:
    assert answer.status == 200, answer
    assert answer.headers["X-Cache"] == "HIT" and answer.headers["X-Cached"] == "true", answer
    assert int(answer.headers["Age"]) >= 0


def assert_sse(answer: Answer) -> None:
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"].startswith("text/event-stream"), answer
    assert answer.body.endswith(b"data: [DONE]\n\n"), answer


def starter(fake: Any, gateway: Any, clock: Any) -> Callable[..., Any]:
    """``start(**options)``: a gateway on ``config(fake.url, **options)`` and a memory store on the test's clock
    (``store=`` another one)."""
    async def make(**options: Any) -> Any:
        store = options.pop("store", None) or MemoryStore(clock=clock.time)
        client, logs = await gateway(config(fake.url, **options), clock=clock, store=store)
        return client, logs

    return make
