"""The pieces the retry policy decides with, on their own (SPEC §5 "Retry", TC20).

``backoff_s`` (full jitter and the other forms), ``retry_after_s`` / ``should_retry``
(header parsing), the providers' ``classify`` (which failures are retried at all) and
``RetryBudget`` arithmetic. ``test_retry.py`` drives the policy through a gateway.
"""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest
from multidict import CIMultiDict

from gateway.config.model import RetryRule
from gateway.headers import retry_after_s, should_retry
from policies.retry import RetryBudget, backoff_s
from providers.anthropic import AnthropicProvider
from providers.openai import OpenAIProvider

NOW = 1_700_000_000.0  # a wall-clock reading for the header tests


# ================================================================ unit: backoff_s


def test_exp_jitter_backoff_falls_in_zero_to_base_times_two_to_the_n():
    rule = RetryRule(attempts=10, backoff="exp-jitter", base_s=0.25, max_s=8.0)
    rng = random.Random(1234).random
    for n in range(10):
        bound = min(8.0, 0.25 * 2**n)
        draws = [backoff_s(rule, n, rng) for _ in range(200)]
        assert all(0 <= d < bound for d in draws), (n, max(draws), bound)
        assert max(draws) > 0.8 * bound  # the whole range is used: full jitter, not a fixed fraction


def test_exp_jitter_backoff_is_the_rng_draw_scaled_and_capped():
    rule = RetryRule(attempts=10, backoff="exp-jitter", base_s=1.0, max_s=5.0)
    assert backoff_s(rule, 0, lambda: 0.5) == 0.5
    assert backoff_s(rule, 2, lambda: 0.5) == 2.0
    assert backoff_s(rule, 3, lambda: 0.5) == 2.5  # min(5, 8) · 0.5
    assert backoff_s(rule, 30, lambda: 0.999) == pytest.approx(4.995)  # capped at max_s
    assert backoff_s(rule, 3, lambda: 0.0) == 0.0


def test_exp_jitter_with_a_seeded_rng_is_reproducible():
    rule = RetryRule(attempts=3, backoff="exp-jitter", base_s=0.25, max_s=8.0)
    a, b = random.Random(7).random, random.Random(7).random
    assert [backoff_s(rule, n, a) for n in range(3)] == [backoff_s(rule, n, b) for n in range(3)]


def test_exp_backoff_doubles_up_to_the_cap():
    rule = RetryRule(attempts=10, backoff="exp", base_s=0.25, max_s=8.0)
    assert [backoff_s(rule, n, lambda: 0.5) for n in range(8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_linear_backoff_grows_by_base_up_to_the_cap():
    rule = RetryRule(attempts=10, backoff="linear", base_s=1.5, max_s=4.0)
    assert [backoff_s(rule, n, lambda: 0.5) for n in range(4)] == [1.5, 3.0, 4.0, 4.0]


def test_constant_backoff_is_base_capped_by_max():
    assert backoff_s(RetryRule(backoff="constant", base_s=2.0, max_s=60.0), 5, lambda: 0.5) == 2.0
    assert backoff_s(RetryRule(backoff="constant", base_s=5.0, max_s=2.0), 0, lambda: 0.5) == 2.0


# ================================================================ unit: headers


def _h(**headers: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize(("value", "expected"), [("2", 2.0), ("0", 0.0), ("1.5", 1.5), (" 7 ", 7.0), ("120", 120.0)])
def test_retry_after_seconds(value, expected):
    assert retry_after_s(_h(Retry_After=value), NOW) == expected


def test_retry_after_http_date_in_the_future_is_the_delta():
    assert retry_after_s(_h(Retry_After=formatdate(NOW + 3, usegmt=True)), NOW) == pytest.approx(3.0)
    assert retry_after_s(_h(Retry_After=formatdate(NOW + 90, usegmt=True)), NOW) == pytest.approx(90.0)


def test_retry_after_http_date_without_zone_is_gmt():
    text = formatdate(NOW + 3, usegmt=True).replace("GMT", "-0000")  # RFC 2822 "unknown zone": still GMT
    assert retry_after_s(_h(Retry_After=text), NOW) == pytest.approx(3.0)


def test_retry_after_http_date_in_the_past_is_zero():
    assert retry_after_s(_h(Retry_After=formatdate(NOW - 30, usegmt=True)), NOW) == 0.0


@pytest.mark.parametrize("value", ["abc", "-1", "-0.5", "inf", "nan", "", "2 seconds"])
def test_retry_after_garbage_or_negative_is_ignored(value):
    assert retry_after_s(_h(Retry_After=value), NOW) is None


def test_retry_after_absent_is_none():
    assert retry_after_s(_h(), NOW) is None


def test_retry_after_ms_wins_over_retry_after():
    assert retry_after_s(_h(Retry_After="10", retry_after_ms="1500"), NOW) == 1.5
    assert retry_after_s(_h(retry_after_ms="250"), NOW) == 0.25


def test_unreadable_retry_after_ms_falls_back_to_retry_after():
    assert retry_after_s(_h(Retry_After="10", retry_after_ms="soon"), NOW) == 10.0
    assert retry_after_s(_h(Retry_After="10", retry_after_ms="-5"), NOW) == 10.0


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("false", False), (" TRUE ", True), ("False", False), ("maybe", None), ("1", None),
])
def test_should_retry_header(value, expected):
    assert should_retry(_h(x_should_retry=value)) is expected


def test_should_retry_absent_is_none():
    assert should_retry(_h()) is None


# ================================================================ unit: provider classify


def _classify(provider, status: int, body: bytes = b"", **headers: str):
    return provider.classify(status, _h(**headers), body, NOW)


def test_openai_insufficient_quota_429_is_not_retryable():
    body = (b'{"error": {"message": "You exceeded your current quota, please check your plan and billing details.",'
            b' "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}')
    f = _classify(OpenAIProvider(), 429, body)
    assert f.reason == "quota_exhausted" and f.retry_class is None and f.should_retry is False
    assert not f.trips_breaker


def test_openai_plain_429_is_rate_limited_with_its_retry_after():
    body = b'{"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}'
    f = _classify(OpenAIProvider(), 429, body, Retry_After="3")
    assert f.reason == "rate_limited" and f.retry_class == "429" and f.retry_after_s == 3.0
    assert not f.trips_breaker and f.should_retry is None


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_openai_5xx_is_a_server_error(status):
    f = _classify(OpenAIProvider(), status, b'{"error": {"message": "upstream down", "type": "server_error"}}')
    assert f.reason == "server_error" and f.retry_class == "5xx" and f.trips_breaker


def test_anthropic_529_overloaded_is_a_server_error_of_its_own_kind():
    body = b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
    f = _classify(AnthropicProvider(), 529, body)
    assert f.reason == "upstream_overloaded" and f.retry_class == "5xx" and f.trips_breaker
    assert f.falls_back_on(frozenset({"server_error"}))


def test_anthropic_enforced_spend_limit_429_is_not_retryable():
    body = (b'{"type": "error", "error": {"type": "rate_limit_error", "message": "Spend limit reached",'
            b' "details": {"error_code": "enforced_spend_limit_reached"}}}')
    f = _classify(AnthropicProvider(), 429, body, Retry_After="30")
    assert f.reason == "quota_exhausted" and f.retry_class is None and f.should_retry is False


@pytest.mark.parametrize(("provider", "body"), [
    (OpenAIProvider(), b'{"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}'),
    (OpenAIProvider(), b'{"error": {"message": "This model\'s maximum context length is 8192 tokens.", "code": null}}'),
    (AnthropicProvider(), b'{"type": "error", "error": {"type": "invalid_request_error",'
                          b' "message": "prompt is too long: 210000 tokens > 200000 maximum"}}'),
], ids=["openai-code", "openai-message", "anthropic"])
def test_context_length_exceeded_has_its_own_reason_and_is_not_retried(provider, body):
    f = _classify(provider, 400, body)
    assert f.reason == "context_length_exceeded" and f.retry_class is None and not f.trips_breaker


def test_content_policy_violation_has_its_own_reason_and_is_not_retried():
    body = b'{"error": {"message": "Your request was rejected.", "type": "invalid_request_error", "code": "content_policy_violation"}}'
    f = _classify(OpenAIProvider(), 400, body)
    assert f.reason == "content_policy_violation" and f.retry_class is None


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_not_retried(status):
    f = _classify(OpenAIProvider(), status, b'{"error": {"message": "Incorrect API key provided"}}')
    assert f.reason == "auth" and f.retry_class is None and not f.trips_breaker


def test_plain_400_is_a_client_error_and_x_should_retry_is_carried():
    f = _classify(OpenAIProvider(), 400, b'{"error": {"message": "bad"}}', x_should_retry="true")
    assert f.reason == "client_error" and f.retry_class is None and f.should_retry is True


def test_success_is_no_failure():
    assert _classify(OpenAIProvider(), 200, b"{}") is None
    assert _classify(AnthropicProvider(), 200, b"{}") is None


# ================================================================ unit: retry budget


def test_retry_budget_percent_of_active_requests():
    budget = RetryBudget(percent=20, min_concurrent=0)
    budget.active = 10  # 20 % of 10 → 2 may be retrying
    budget.retrying = 1
    assert budget.allows_another()
    budget.retrying = 2
    assert not budget.allows_another()


def test_retry_budget_min_concurrent_is_a_floor():
    budget = RetryBudget(percent=20, min_concurrent=3)
    budget.active, budget.retrying = 4, 2  # 20 % of 4 = 0.8, but 3 are always allowed
    assert budget.allows_another()
    budget.retrying = 3
    assert not budget.allows_another()
    budget.active = 20  # now the percentage is larger than the floor: 4
    assert budget.allows_another()
    budget.retrying = 4
    assert not budget.allows_another()


def test_retry_budget_lone_request_may_retry_even_without_a_floor():
    budget = RetryBudget(percent=20, min_concurrent=0)
    budget.active = 1  # the request asking is itself active: 0 < 0.2
    assert budget.allows_another()
    budget.active = 0
    assert not budget.allows_another()
