"""Shared helpers for the configuration tests: parse a YAML text, collect its errors, the retry defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_config
from gateway.config.model import Config, RetryRule

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO.parent / "shared" / "seeds"

DEFAULT_RETRY = {
    "429": RetryRule(attempts=3, backoff="exp-jitter", base_s=1.0, max_s=60.0),
    "5xx": RetryRule(attempts=2, backoff="exp-jitter", base_s=1.0, max_s=60.0),
    "net": RetryRule(attempts=2, backoff="exp-jitter", base_s=1.0, max_s=60.0),
    "timeout": RetryRule(attempts=0, backoff="exp-jitter", base_s=1.0, max_s=60.0),
}


def load(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(text, env={} if env is None else env)


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={} if env is None else env)
    return info.value.errors

