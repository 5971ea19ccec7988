"""The Prometheus series SPEC §7 names, shared by the metrics and the dashboard tests."""

# Each series and the label names it carries (histograms: plus ``le`` on buckets).
SPEC_SERIES = {
    "reliapi_requests_total": {"target", "kind", "route", "status", "tenant"},
    "reliapi_request_duration_seconds": {"target", "kind"},
    "reliapi_upstream_duration_seconds": {"target"},
    "reliapi_ttft_seconds": {"target"},
    "reliapi_errors_total": {"target", "code"},
    "reliapi_retries_total": {"target", "reason"},
    "reliapi_cache_hits_total": {"target"},
    "reliapi_cache_misses_total": {"target"},
    "reliapi_idempotent_hits_total": {"target"},
    "reliapi_coalesced_total": {"target"},
    "reliapi_circuit_breaker_state": {"target"},
    "reliapi_circuit_breaker_transitions_total": {"target", "to"},
    "reliapi_fallbacks_total": {"from", "to"},
    "reliapi_rate_limited_total": {"tenant"},
    "reliapi_budget_events_total": {"target", "event"},
    "reliapi_llm_tokens_total": {"target", "model", "kind"},
    "reliapi_llm_cost_usd_total": {"target", "model", "tenant"},
    "reliapi_llm_cost_usd": {"target", "model"},
    "reliapi_inflight_requests": {"target"},
    "reliapi_key_pool_keys": {"target", "state"},
}

# The names the ReliAPI wiki (seed 000) gives: the SPEC's counts by fewer labels, and in milliseconds.
WIKI_SERIES = {
    "reliapi_http_requests_total": {"target", "status"},
    "reliapi_llm_requests_total": {"target", "status"},
    "reliapi_latency_ms": {"target", "kind"},
}
EXPOSED_SERIES = {**SPEC_SERIES, **WIKI_SERIES}
