"""What the idempotency tests share (``tests/test_idempotency.py``, ``tests/test_idempotency_outcomes.py``): the
config, a numbered fake upstream, the requests, and the store key of an idempotency key."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import msgspec
from multidict import CIMultiDict

from gateway.headers import CREDENTIAL_HEADERS
from policies.idempotency import hash_values
from tests.support.config import NO_RETRY, GatewayConfig
from tests.support.fakes import FakeUpstream, Fault
from tests.support.gateway import until  # noqa: F401 (the idempotency tests import it from here)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
CLAUDE = {"model": "claude-test-1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT_PATH = "/v1/chat/completions"
REPLAYED = "Idempotent-Replayed"

TENANTS = [{"name": "alpha", "api_key": "alpha-key-0001"}, {"name": "beta", "api_key": "beta-key-0002"}]
ALPHA = {"Authorization": "Bearer alpha-key-0001"}
BETA = {"X-API-Key": "beta-key-0002"}


def config(url: str, *, idem: dict | None = None, tenants: list[dict] = (), store: dict | None = None,
           **up_fields: object) -> GatewayConfig:
    """``up`` (OpenAI), ``claude`` (Anthropic) and ``rest`` (plain HTTP, echoes) at the fake,
    no retries (one client request = one upstream attempt), the idempotency block under test."""
    cfg = GatewayConfig(url, default_target="up").tenants(*tenants)
    if store:
        cfg.store(**store)
    cfg.up(timeout_ms=5000, **up_fields).claude().rest()
    return cfg.each(retry_matrix=NO_RETRY, idempotency=idem or {})


def numbered(fake: FakeUpstream, **fault: Any) -> None:
    """Every unplanned upstream call n answers as model ``gpt-answer-<n>`` (plus ``fault``)."""
    fake.script = lambda n, seen: Fault(model=f"gpt-answer-{n}", **fault)


def model_of(body: bytes) -> str:
    return msgspec.json.decode(body)["model"]


async def post(client, body: Any = CHAT, *, key: str | None = None, path: str = CHAT_PATH,
               headers: dict[str, str] | None = None, header: str = "Idempotency-Key"):
    h = dict(headers or {})
    if key is not None:
        h[header] = key
    return await client.post(path, json=body, headers=h)


async def call(client, body: Any = CHAT, **kwargs) -> tuple[int, CIMultiDict[str], bytes]:
    """POST and read the whole answer: (status, headers, body bytes)."""
    resp = await post(client, body, **kwargs)
    return resp.status, resp.headers, await resp.read()


def store_key(key: str, tenant: str | None = None) -> str:
    """Where the policy keeps a key's record (gateway/state/flights.py, policies/idempotency.py): a tenant's, or on
    the passthrough ``up`` target without tenants that of a client sending no credential."""
    if tenant is None:
        h = hashlib.sha256()
        hash_values(h, CIMultiDict(), CREDENTIAL_HEADERS)
        tenant = "c." + h.hexdigest()[:24]
    return f"idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def openai_error(body: bytes) -> dict:
    return msgspec.json.decode(body)["error"]


def starter(fake: Any, gateway: Any, clock: Any) -> Callable[..., Any]:
    """``start(**options)``: a gateway (its client) on ``config(fake.url, **options)`` and the test's clock."""
    async def make(**options: Any) -> Any:
        client, _ = await gateway(config(fake.url, **options), clock=clock)
        return client

    return make
