"""The seed documents' environment variables (issue #14 point 3; seeds 003 and 004): read, mapped onto the config,
named in the startup log; a value that cannot be used is an error naming the variable."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest

from gateway.config import load_config
from gateway.config.model import RateLimitConfig, UserRateLimit
from gateway.config.seed_env import SeedEnvError, apply
from tests.support.cli_harness import CLI, assert_no_traceback, free_port

SEED_004 = {"MAX_REQUESTS_PER_MINUTE": "10", "MAX_REQUESTS_PER_HOUR": "100", "CACHE_TTL_SECONDS": "3600",
            "LOG_LEVEL": "INFO", "COST_PER_TOKEN_GPT4": "0.00003", "COST_PER_TOKEN_GPT35": "0.000002",
            "COST_PER_TOKEN_CLAUDE": "0.000015"}
SEED_003 = {"PORT": "3000", "DEFAULT_PROVIDER": "openai", "RATE_LIMIT_MAX": "100", "RATE_LIMIT_WINDOW_MS": "60000",
            "RETRY_MAX_ATTEMPTS": "3", "IDEMPOTENCY_TTL_MS": "3600000"}


def test_seed_003s_table_maps_onto_the_config() -> None:
    config, applied, warnings = apply(load_config(None, env={}), SEED_003, port_given=False)
    s = config.server
    assert (s.port, s.default_target, s.rate_limit_per_ip_rpm) == (3000, "openai", 100)
    for t in config.targets.values():
        assert [t.retry_matrix[c].attempts for c in ("429", "5xx", "net")] == [2, 2, 2]  # 3 attempts = 2 retries
        assert t.idempotency.ttl_s == 3600
    assert [line.split(" ")[0] for line in applied] == ["PORT", "DEFAULT_PROVIDER", "RATE_LIMIT_MAX",
                                                         "RETRY_MAX_ATTEMPTS", "IDEMPOTENCY_TTL_MS"]
    assert warnings == []


def test_seed_004s_table_maps_onto_the_config() -> None:
    config, applied, warnings = apply(load_config(None, env={}), SEED_004, port_given=False)
    for t in config.targets.values():  # the built-in targets are all LLM targets
        assert t.cache is not None and t.cache.enabled and t.cache.ttl_s == 3600
    assert config.pricing["gpt-4"].input == pytest.approx(30.0) and config.pricing["gpt-4"].output == pytest.approx(30.0)
    assert config.pricing["gpt-3.5-turbo"].input == pytest.approx(2.0)
    assert config.pricing["claude"].output == pytest.approx(15.0)
    assert config.rate_limit.per_user is not None
    assert (config.rate_limit.per_user.rpm, config.rate_limit.per_user.rph) == (10, 100)
    assert len(applied) == 6 and warnings == []


def test_max_requests_per_minute_overriding_the_files_per_user_limit_is_a_warning() -> None:
    base = msgspec.structs.replace(load_config(None, env={}), rate_limit=RateLimitConfig(per_user=UserRateLimit(rpm=5, rph=50)))
    config, applied, warnings = apply(base, {"MAX_REQUESTS_PER_MINUTE": "10"}, port_given=False)
    assert (config.rate_limit.per_user.rpm, config.rate_limit.per_user.rph) == (10, 50)
    assert applied == ["MAX_REQUESTS_PER_MINUTE → rate_limit.per_user.rpm 10"]
    assert warnings == ["MAX_REQUESTS_PER_MINUTE overrides the config file's rate_limit.per_user.rpm (5 → 10)"]


def test_a_window_other_than_a_minute_is_converted_to_a_rate_per_minute() -> None:
    config, _, _ = apply(load_config(None, env={}), {"RATE_LIMIT_MAX": "10", "RATE_LIMIT_WINDOW_MS": "1000"},
                         port_given=False)
    assert config.server.rate_limit_per_ip_rpm == 600


def test_a_long_windows_small_limit_says_it_comes_out_looser() -> None:
    """100 a day is less than one a minute: the whole request a minute it becomes lets 1,440 through; said."""
    config, _, warnings = apply(load_config(None, env={}), {"RATE_LIMIT_MAX": "100", "RATE_LIMIT_WINDOW_MS": "86400000"},
                                port_given=False)
    assert config.server.rate_limit_per_ip_rpm == 1
    assert any("allows about 1,440" in w for w in warnings), warnings
    _, _, exact = apply(load_config(None, env={}), {"RATE_LIMIT_MAX": "100", "RATE_LIMIT_WINDOW_MS": "60000"},
                        port_given=False)
    assert not any("allows about" in w for w in exact)


@pytest.mark.parametrize(("env", "message"), [
    ({"PORT": "abc"}, "PORT: expected an integer"),
    ({"PORT": "70000"}, "PORT: expected a port number"),
    ({"DEFAULT_PROVIDER": "cohere"}, "DEFAULT_PROVIDER: no target has provider 'cohere'"),
    ({"RATE_LIMIT_WINDOW_MS": "1000"}, "give RATE_LIMIT_MAX"),
    ({"RETRY_MAX_ATTEMPTS": "0"}, "RETRY_MAX_ATTEMPTS: expected at least 1"),
    ({"COST_PER_TOKEN_GPT4": "cheap"}, "COST_PER_TOKEN_GPT4: expected a number"),
])
def test_a_value_that_cannot_be_used_is_an_error_naming_the_variable(env, message) -> None:
    with pytest.raises(SeedEnvError, match=message):
        apply(load_config(None, env={}), env, port_given=False)


def test_reliapi_port_and_the_flag_win_over_port() -> None:
    config, applied, _ = apply(load_config(None, env={}), {"PORT": "3000"}, port_given=True)
    assert config.server.port == 8000 and applied == []


async def test_the_gateway_listens_on_port_and_names_what_it_applied(cli: CLI) -> None:
    port = free_port()
    gw = cli.start(port=port, env={"PORT": str(port), "DEFAULT_PROVIDER": "anthropic", "LOG_LEVEL": "INFO",
                                   "MAX_REQUESTS_PER_MINUTE": "10"})
    await asyncio.to_thread(gw.wait_healthy)
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as resp:
        assert resp.status == 200
    messages = gw.messages()
    applied = next(m for m in messages if m.startswith("environment: PORT"))
    assert "DEFAULT_PROVIDER → server.default_target anthropic" in applied
    assert "MAX_REQUESTS_PER_MINUTE → rate_limit.per_user.rpm 10" in applied
    assert gw.terminate() == 0
    assert_no_traceback(gw.stderr)
