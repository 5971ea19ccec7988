"""A configured target made ready to serve: its URL base, provider, credential and transport.

Everything here is computed once when a config is loaded; the request path only
reads it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from gateway.config.model import Config, KeyPool, TargetConfig
from gateway.errors import UnknownTarget
from gateway.upstream.paths import UpstreamBase
from gateway.upstream.transport import Transport
from providers import Provider, get_provider
from providers.auth import Credential, resolve


class Target:
    __slots__ = ("name", "config", "kind", "provider", "base", "credential", "transport",
                 "timeout_s", "ttft_timeout_s", "idle_timeout_s", "max_tokens")

    def __init__(
        self, name: str, config: TargetConfig, env: Mapping[str, str], pool: KeyPool | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.kind = config.kind
        self.provider: Provider = get_provider(config.provider or "http")
        self.base = UpstreamBase(config.base_url)
        self.credential: Credential = resolve(config.auth, self.provider, name, env, pool)
        # The pool is unbounded: max_concurrency is a bulkhead that answers 503 at once, not a queue.
        self.transport = Transport(name, connect_timeout_s=config.connect_timeout_ms / 1000)
        self.timeout_s = config.timeout_ms / 1000
        self.ttft_timeout_s = min(config.ttft_timeout_ms, config.timeout_ms) / 1000
        self.idle_timeout_s = config.stream_idle_timeout_ms / 1000
        self.max_tokens = config.llm.max_tokens if config.llm is not None else None  # for dialects that require one


class Router:
    """Picks the target of a request: by name, or for /v1/* by header → model glob → default."""

    def __init__(self, config: Config, targets: dict[str, Target]) -> None:
        self._targets = targets
        self._default = targets.get(config.server.default_target or "")
        patterns = [(re.compile(fnmatch.translate(g)), t) for name, t in targets.items() for g in t.config.models]
        self._patterns = patterns
        self._by_model: dict[str, Target | None] = {}

    def by_name(self, name: str) -> Target:
        target = self._targets.get(name)
        if target is None:
            raise UnknownTarget(f"unknown target {name!r}", param="target")
        return target

    def for_v1(self, header: str | None, model: str | None) -> Target:
        if header:
            return self.by_name(header)
        if model is not None:
            target = self._by_model.get(model, False)
            if target is False:
                target = next((t for rx, t in self._patterns if rx.match(model)), None)
                if len(self._by_model) < 4096:  # bounded: models come from clients
                    self._by_model[model] = target
            if target is not None:
                return target
        if self._default is not None:
            return self._default
        if model is not None:
            raise UnknownTarget(f"no target serves model {model!r}", param="model")
        raise UnknownTarget("no target for this request: send X-ReliAPI-Target or configure server.default_target")
