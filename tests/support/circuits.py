"""Helpers shared by the circuit breaker tests: the gateway config under test and small probes of its state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.keys import RUNTIME
from gateway.observe.events import CircuitTransition
from tests.support.config import NO_RETRY, GatewayConfig
from tests.support.fakes import Fault

CHAT = [{"role": "user", "content": "hi"}]
OPENAI_BODY = {"model": "gpt-4o-mini", "messages": CHAT}
COOLDOWN = 30
CIRCUIT = {"error_threshold": 2, "cooldown_s": COOLDOWN}


def config(up: str, *, circuit: dict = CIRCUIT, backup: str | None = None, timeout_ms: int = 2000,
           **up_fields: object) -> GatewayConfig:
    """Target ``up`` (OpenAI) and ``claude`` (Anthropic) at the fake, with the circuit under test and
    no retries; optionally a fallback ``backup`` on a second fake. ``up_fields``: more for ``up``."""
    cfg = GatewayConfig(up, default_target="up")
    cfg.up(timeout_ms=timeout_ms, retry_matrix=NO_RETRY, circuit=circuit,
           fallback_targets=["backup"] if backup else None, **up_fields)
    cfg.claude(retry_matrix=NO_RETRY, circuit=circuit)
    if backup:
        cfg.target("backup", f"{backup}/v1", provider="openai", retry_matrix=NO_RETRY)
    return cfg


async def chat(client, path: str = "/v1/chat/completions", body: dict | None = None, **kwargs):
    """POST a chat request; returns (status, headers, decoded JSON body or None)."""
    resp = await client.post(path, json=body or OPENAI_BODY, **kwargs)
    raw = await resp.read()
    try:
        data = await resp.json(content_type=None) if raw else None
    except ValueError:
        data = None
    return resp.status, resp.headers, data


def watch(client) -> list[CircuitTransition]:
    """Every circuit transition the gateway emits from now on."""
    seen: list[CircuitTransition] = []
    client.app[RUNTIME].current.events.subscribe(lambda e: seen.append(e) if isinstance(e, CircuitTransition) else None)
    return seen


def moves(transitions: list[CircuitTransition], target: str = "up") -> list[tuple[str, str]]:
    return [(t.from_state, t.to_state) for t in transitions if t.target == target]


def state(client, target: str = "up") -> str:
    return client.app[RUNTIME].current.circuits[target].breaker.state


async def eventually(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` (real time) passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def assert_circuit_open_openai(status, headers, data, *, retry_after: tuple[int, int] = (COOLDOWN - 1, COOLDOWN)):
    assert status == 503
    assert data["error"]["code"] == "circuit_open"
    assert retry_after[0] <= int(headers["Retry-After"]) <= retry_after[1]
    assert headers["X-Request-Id"]


async def open_circuit(client, fake, path: str = "/v1/chat/completions", body: dict | None = None) -> None:
    """Two upstream 503s (threshold 2) — each passed through to the client as sent."""
    fake.plan(Fault(status=503), Fault(status=503))
    for _ in range(2):
        status, _, _ = await chat(client, path, body)
        assert status == 503
    assert not fake.planned
