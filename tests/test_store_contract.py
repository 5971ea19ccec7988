"""The store contract: one suite, run against every backend (memory and Redis).

Expects ``asyncio_mode = auto`` (setup.cfg); run alone with
``pytest -o asyncio_mode=auto tests/test_store_contract.py``.

Redis comes from ``REDIS_URL`` (default redis://127.0.0.1:6379/0). When it does not
answer, the Redis cases skip with the reason — or fail when ``RELIAPI_REQUIRE_REDIS=1``
(CI). Each test works under its own random key prefix and deletes it afterwards.
Time: the memory store runs on a fake clock; Redis expires keys on its own clock,
so TTL cases sleep a few hundred ms there, and GCRA cases inject ``now``.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import pytest_asyncio

from gateway.errors import StoreUnavailable
from gateway.store import Claim, Store, StoreError, StoreURLError, Take, TakeResult, Write, open_store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from gateway.store.resp import ReplyError
from tests.support.stores import PrivateRedis, drop, new_prefix
from tests.support.stores import redis_store as _redis_store
from tests.support.topologies import ClusterGroup, SentinelGroup


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory):
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    try:
        yield group.start()
    finally:
        group.stop()


@pytest.fixture(scope="session")
def cluster_group(tmp_path_factory: pytest.TempPathFactory):
    group = ClusterGroup(tmp_path_factory.mktemp("cluster"))
    try:
        yield group.start()
    finally:
        group.stop()


@pytest_asyncio.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def store(request: pytest.FixtureRequest, prefix: str, clock: FakeClock):
    """Every backend: memory, one Redis, Sentinel's primary, a 3-primary Cluster (the last two of
    the suite's own, started once per session from redis-server on loopback ports)."""
    if request.param == "memory":
        s: Store = MemoryStore(clock=clock)
    elif request.param == "redis":
        s = await _redis_store(prefix)
    else:
        s = RedisStore(request.getfixturevalue(f"{request.param}_group").url, key_prefix=prefix)
        await s.ping()
    yield s
    await s.delete_prefix("")
    await s.close()


@pytest.fixture
def advance(store: Store, clock: FakeClock):
    """Let ``seconds`` pass for the store: move the fake clock, or really wait for Redis."""

    async def advance(seconds: float) -> None:
        if store.backend == "memory":
            clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    return advance


async def keys(store: Store, prefix: str = "") -> list[str]:
    return sorted([k async for k in store.scan_prefix(prefix)])


# -- key/value -----------------------------------------------------------------


async def test_get_set_delete(store: Store) -> None:
    assert await store.get("missing") is None
    await store.set("k", b"\x00binary\xff")
    assert await store.get("k") == b"\x00binary\xff"
    await store.set("k", b"v2")
    assert await store.get("k") == b"v2"
    await store.delete("k")
    await store.delete("k")  # deleting an absent key is fine
    assert await store.get("k") is None


async def test_ttl_expires_and_none_means_forever(store: Store, advance) -> None:
    await store.set("short", b"x", ttl_s=0.2)
    await store.set("forever", b"y")
    assert await store.get("short") == b"x"
    await advance(0.35)
    assert await store.get("short") is None
    assert await store.get("forever") == b"y"
    assert await keys(store) == ["forever"]


async def test_set_nx_one_winner_among_100_concurrent_claims(store: Store) -> None:
    results = await asyncio.gather(*(store.set_nx("lock", f"t{i}".encode(), ttl_s=5) for i in range(100)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert await store.get("lock") == f"t{winner}".encode()


async def test_set_nx_claim_frees_after_its_ttl(store: Store, advance) -> None:
    assert await store.set_nx("lock", b"old", ttl_s=0.2)
    assert not await store.set_nx("lock", b"new", ttl_s=0.2)
    await advance(0.35)
    assert await store.set_nx("lock", b"new", ttl_s=5)  # takeover of a dead holder's lock


async def test_claim_takes_a_free_key_or_returns_what_holds_it(store: Store, advance) -> None:
    assert await store.claim("k", b"mine", ttl_s=0.4) is None
    assert await store.get("k") == b"mine"
    assert await store.claim("k", b"theirs", ttl_s=0.4) == b"mine"
    await advance(0.5)
    assert await store.claim("k", b"theirs", ttl_s=10) is None
    assert await store.get("k") == b"theirs"


async def test_claim_one_winner_among_50_concurrent(store: Store) -> None:
    results = await asyncio.gather(*(store.claim("k", str(i).encode(), ttl_s=10) for i in range(50)))
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(r == str(winners[0]).encode() for r in results if r is not None)


async def test_fenced_writes_announce_themselves_only_when_they_happen(store: Store) -> None:
    await store.set("k", b"lock-a", ttl_s=10)
    async with store.subscribe("k-ch") as sub:
        assert not await store.compare_and_set("k", b"lock-b", b"x", 10, notify="k-ch")
        assert not await store.compare_and_delete("k", b"lock-b", notify="k-ch")
        assert await sub.get(0.1) is None
        assert await store.compare_and_set("k", b"lock-a", b"lock-a2", 10, notify="k-ch")
        assert await sub.get(2) == b"done"
        assert await store.compare_and_delete("k", b"lock-a2", notify="k-ch")
        assert await sub.get(2) == b"released"
    assert await store.get("k") is None


async def test_compare_and_delete_only_with_the_right_token(store: Store) -> None:
    await store.set("lock", b"mine")
    assert not await store.compare_and_delete("lock", b"theirs")
    assert await store.get("lock") == b"mine"
    assert await store.compare_and_delete("lock", b"mine")
    assert await store.get("lock") is None
    assert not await store.compare_and_delete("lock", b"mine")


async def test_compare_and_set_is_a_fenced_write(store: Store, advance) -> None:
    await store.set("idem", b"token-1", ttl_s=5)
    assert not await store.compare_and_set("idem", b"token-0", b"stale result", ttl_s=60)
    assert await store.get("idem") == b"token-1"
    assert await store.compare_and_set("idem", b"token-1", b"result", ttl_s=0.2)
    assert await store.get("idem") == b"result"
    assert not await store.compare_and_set("absent", b"token-1", b"x", ttl_s=None)
    assert await store.get("absent") is None
    await advance(0.35)
    assert await store.get("idem") is None  # the new value got the new TTL


class OneByOne(MemoryStore):
    """A backend without a ``commit`` or ``claim_first`` of its own: the base class's, one call after the other."""

    commit = Store.commit
    claim_first = Store.claim_first


@pytest_asyncio.fixture(params=["memory", "redis", "sentinel", "cluster", "base"])
async def committing(request: pytest.FixtureRequest, prefix: str, clock: FakeClock):
    """``store`` plus the base class's ``commit`` (what a backend gets without writing one)."""
    if request.param == "redis":
        s: Store = await _redis_store(prefix)
    elif request.param in ("sentinel", "cluster"):
        s = RedisStore(request.getfixturevalue(f"{request.param}_group").url, key_prefix=prefix)
        await s.ping()
    else:
        s = MemoryStore(clock=clock) if request.param == "memory" else OneByOne(clock=clock)
    yield s
    await s.delete_prefix("")
    await s.close()


async def test_commit_applies_each_fenced_write_on_its_own_and_says_which(committing: Store) -> None:
    store = committing
    await store.set("idem", b"lock-i", ttl_s=10)
    await store.set("cache", b"lock-c", ttl_s=10)
    await store.set("stale", b"someone else's", ttl_s=10)
    await store.set("gone", b"x")
    async with store.subscribe("idem") as idem_ch, store.subscribe("cache") as cache_ch, \
            store.subscribe("stale") as stale_ch:
        done = await store.commit([
            Write("idem", b"D-answer", expected=b"lock-i", ttl_s=60, notify="idem"),
            Write("stale", b"D-mine", expected=b"lock-s", ttl_s=60, notify="stale"),  # not ours: not written
            Write("cache", None, expected=b"lock-c", notify="cache"),  # released
            Write("entry", b"D-entry", ttl_s=0.3),  # unfenced set
            Write("gone", None),  # unfenced delete
        ])
        assert done == [True, False, True, True, True]
        assert await idem_ch.get(2) == b"done"
        assert await cache_ch.get(2) == b"released"
        assert await stale_ch.get(0.1) is None  # a write that did not happen announces nothing
    assert await store.get("idem") == b"D-answer"
    assert await store.get("stale") == b"someone else's"
    assert await store.get("cache") is None
    assert await store.get("entry") == b"D-entry"
    assert await store.get("gone") is None


async def test_commit_writes_expire_as_set_does(committing: Store, clock: FakeClock) -> None:
    store = committing
    await store.set("k", b"lock", ttl_s=10)
    assert await store.commit([Write("k", b"v", expected=b"lock", ttl_s=0.2), Write("forever", b"f")]) == [True, True]
    if store.backend == "memory":
        clock.now += 0.35
    else:
        await asyncio.sleep(0.35)
    assert await store.get("k") is None
    assert await store.get("forever") == b"f"


async def test_commit_is_fenced_under_concurrency(committing: Store) -> None:
    """Twenty committers holding twenty different tokens for one key: only the holder's write lands."""
    store = committing
    await store.set("k", b"token-7", ttl_s=10)
    results = await asyncio.gather(*(store.commit([Write("k", b"answer-%d" % i, expected=b"token-%d" % i, ttl_s=10)])
                                     for i in range(20)))
    assert [i for i, r in enumerate(results) if r == [True]] == [7]
    assert await store.get("k") == b"answer-7"


async def test_claim_first_claims_in_order_while_each_is_free_then_takes(committing: Store) -> None:
    """A miss's idempotency key, cache entry and quota in one call; a held claim stops everything after it."""
    store = committing
    quota = Take("rl:{acme}", rate_per_s=1 / 60, burst=1)  # two now, then one a minute
    held, taken = await store.claim_first([Claim("idem:1", b"L-i1", 10), Claim("cache:1", b"L-c1", 10)], [quota])
    assert held == [None, None] and taken is not None and [t.allowed for t in taken] == [True]
    assert (await store.get("idem:1"), await store.get("cache:1")) == (b"L-i1", b"L-c1")
    # another key, the same cache entry: the key is claimed, the entry's holder said, and no quota is taken
    held, taken = await store.claim_first([Claim("idem:2", b"L-i2", 10), Claim("cache:1", b"L-c2", 10)], [quota])
    assert held == [None, b"L-c1"] and taken is None
    assert await store.get("idem:2") == b"L-i2" and await store.get("cache:1") == b"L-c1"
    # the same key again: what holds it, and nothing after it is tried
    held, taken = await store.claim_first([Claim("idem:1", b"L-i3", 10), Claim("cache:3", b"L-c3", 10)], [quota])
    assert held == [b"L-i1"] and taken is None
    assert await store.get("cache:3") is None
    peek = await store.take_all([Take("rl:{acme}", rate_per_s=1 / 60, burst=1, quantity=0)])
    assert peek[0].remaining == 1  # one taken of two: the held claims took none


async def test_claim_first_gives_its_claims_back_when_a_take_is_refused(committing: Store) -> None:
    store = committing
    minute, hour = Take("m:{acme}", rate_per_s=1 / 60, burst=0), Take("h:{acme}", rate_per_s=1 / 3600, burst=5)
    assert (await store.claim_first([Claim("idem:a", b"L-a", 10)], [minute, hour]))[1][0].allowed  # type: ignore[index]
    held, taken = await store.claim_first([Claim("idem:b", b"L-b", 10), Claim("cache:b", b"L-cb", 10)], [minute, hour])
    assert held == [None, None] and taken is not None
    assert [t.allowed for t in taken] == [False, True] and taken[0].retry_after_s > 50
    assert await store.get("idem:b") is None and await store.get("cache:b") is None  # given back
    assert (await store.take_all([Take("h:{acme}", rate_per_s=1 / 3600, burst=5, quantity=0)]))[0].remaining == 5
    held, taken = await store.claim_first([Claim("idem:b", b"L-b2", 10)], [])  # free for the retry
    assert held == [None] and taken is None


async def test_claim_first_has_one_winner_among_concurrent_callers(committing: Store) -> None:
    store = committing
    quota = Take("rl:{t}", rate_per_s=100, burst=100)
    results = await asyncio.gather(*(store.claim_first([Claim("idem:k", b"L%d" % i, 10), Claim("cache:k", b"C%d" % i, 10)],
                                                       [quota]) for i in range(20)))
    winners = [i for i, (held, _) in enumerate(results) if held == [None, None]]
    assert len(winners) == 1
    assert await store.get("idem:k") == b"L%d" % winners[0] and await store.get("cache:k") == b"C%d" % winners[0]
    assert all(held == [b"L%d" % winners[0]] for i, (held, _) in enumerate(results) if i != winners[0])


async def test_give_back_undoes_a_claim_first_that_was_applied_after_all(store: Store) -> None:
    """A claim_first whose answer never came (a stalled Redis runs it once it resumes): its claims are deleted if
    they are ours, and its takes given back when the last claim was ours (exactly when they were taken)."""
    quota = Take("rl:{acme}", rate_per_s=1 / 60, burst=2)  # three now, then one a minute
    full = [Claim("idem:1", b"L-i1", 10), Claim("cache:1", b"L-c1", 10)]
    assert (await store.claim_first(full, [quota]))[0] == [None, None]
    assert await store.give_back(full, [quota])
    assert await store.get("idem:1") is None and await store.get("cache:1") is None
    remaining = (await store.take_all([Take("rl:{acme}", rate_per_s=1 / 60, burst=2, quantity=0)]))[0].remaining
    refunds = store.claims_together or isinstance(store, MemoryStore)  # (a Cluster sends nothing ahead of an answer)
    assert remaining == (3 if refunds else 2)
    # the cache entry was someone else's: the key is given back, the entry and the quota are not touched
    await store.set("cache:2", b"L-other", ttl_s=10)
    held = [Claim("idem:2", b"L-i2", 10), Claim("cache:2", b"L-c2", 10)]
    assert (await store.claim_first(held, [quota]))[0] == [None, b"L-other"]
    assert not await store.give_back(held, [quota])
    assert await store.get("idem:2") is None and await store.get("cache:2") == b"L-other"
    # never applied: nothing changes
    assert not await store.give_back([Claim("idem:3", b"L-i3", 10)], [quota])
    after = (await store.take_all([Take("rl:{acme}", rate_per_s=1 / 60, burst=2, quantity=0)]))[0].remaining
    assert after == remaining


# -- counters ------------------------------------------------------------------


async def test_incr_counts_atomically(store: Store) -> None:
    assert await store.incr("n") == 1
    assert await store.incr("n", 5) == 6
    assert await store.incr("n", -2) == 4
    assert await store.get("n") == b"4"
    await asyncio.gather(*(store.incr("c") for _ in range(50)))
    assert await store.incr("c", 0) == 50


async def test_counter_ttl_counts_from_first_increment(store: Store, advance) -> None:
    await store.incr("window", ttl_s=0.3)
    await store.incr_float("spend", 0.5, ttl_s=0.3)
    await store.hincr("usage", "requests", 1, ttl_s=0.3)
    await advance(0.2)
    assert await store.incr("window", ttl_s=0.3) == 2  # must not extend the window
    await store.incr_float("spend", 0.5, ttl_s=0.3)
    await store.hincr("usage", "requests", 1, ttl_s=0.3)
    await advance(0.2)
    assert await store.get("window") is None
    assert await store.get("spend") is None
    assert await store.hgetall("usage") == {}
    assert await store.incr("window") == 1


async def test_incr_float_and_usage_hashes(store: Store) -> None:
    assert await store.incr_float("spend", 0.25) == pytest.approx(0.25)
    assert await store.incr_float("spend", 1.5) == pytest.approx(1.75)
    assert await store.hgetall("usage") == {}
    await asyncio.gather(*(store.hincr("usage", "requests", 1) for _ in range(20)))
    assert await store.hincr("usage", "cost_usd", 0.001) == pytest.approx(0.001)
    assert await store.hincr("usage", "cost_usd", 0.002) == pytest.approx(0.003)
    assert await store.hgetall("usage") == pytest.approx({"requests": 20.0, "cost_usd": 0.003})


# -- GCRA ----------------------------------------------------------------------


async def test_gcra_redis_cell_table(store: Store) -> None:
    """TC31: burst 4, rate 1/s — five at t0 (remaining 4..0), the sixth waits 1 s,
    t0+3 s is allowed with remaining 2, a quantity of 6 never fits."""
    t0 = 1_700_000_000.0

    async def take(at: float, quantity: int = 1) -> TakeResult:
        return await store.take("tenant:t1", rate_per_s=1, burst=4, quantity=quantity, now=at)

    for expected in [4, 3, 2, 1, 0]:
        result = await take(t0)
        assert (result.allowed, result.limit, result.remaining, result.retry_after_s) == (True, 5, expected, 0.0)
    sixth = await take(t0)
    assert not sixth.allowed and sixth.remaining == 0
    assert sixth.retry_after_s == pytest.approx(1.0) and math.ceil(sixth.retry_after_s) == 1
    assert sixth.reset_after_s == pytest.approx(5.0)
    later = await take(t0 + 3)
    assert later.allowed and later.remaining == 2 and later.reset_after_s == pytest.approx(3.0)
    too_big = await take(t0 + 3, quantity=6)
    assert not too_big.allowed and too_big.retry_after_s == math.inf
    assert not (await store.take("fresh", rate_per_s=1, burst=4, quantity=6, now=t0)).allowed


async def test_gcra_refills_at_the_rate_and_peeks(store: Store) -> None:
    t0 = 1_700_000_000.0
    rpm = dict(rate_per_s=60 / 60, burst=0)  # 60 rpm without burst: one per second
    assert (await store.take("k", **rpm, now=t0)).allowed
    denied = await store.take("k", **rpm, now=t0 + 0.25)
    assert not denied.allowed and denied.retry_after_s == pytest.approx(0.75)
    peek = await store.take("k", **rpm, quantity=0, now=t0 + 1)
    assert peek.allowed and peek.remaining == 1
    assert (await store.take("k", **rpm, now=t0 + 1)).allowed
    assert (await store.take("other", **rpm, now=t0 + 1)).allowed  # keys are independent


async def test_gcra_is_atomic_under_concurrency(store: Store) -> None:
    results = await asyncio.gather(
        *(store.take("k", rate_per_s=1, burst=4, now=1_700_000_000.0) for _ in range(30))
    )
    assert sum(r.allowed for r in results) == 5


async def test_gcra_on_the_store_clock(store: Store) -> None:
    first = await store.take("k", rate_per_s=0.5, burst=1)
    second = await store.take("k", rate_per_s=0.5, burst=1)
    third = await store.take("k", rate_per_s=0.5, burst=1)
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert 1.5 < third.retry_after_s <= 2.0


async def test_take_all_takes_every_bucket_or_none(store: Store) -> None:
    """A request counted against a minute and an hour window: refused by either, it uses up neither."""
    t0 = 1_700_000_000.0
    minute = Take("m:{acme}", rate_per_s=2 / 60, burst=1)  # 2 per minute
    hour = Take("h:{acme}", rate_per_s=3 / 3600, burst=2)  # 3 per hour
    for expected in [(1, 2), (0, 1)]:
        got = await store.take_all([minute, hour], now=t0)
        assert [r.allowed for r in got] == [True, True]
        assert (got[0].remaining, got[1].remaining) == expected
    refused = await store.take_all([minute, hour], now=t0 + 1)  # the minute is used up, the hour is not
    assert [r.allowed for r in refused] == [False, True] and refused[0].retry_after_s == pytest.approx(29.0)
    # nothing was taken from the hour by the refused request: its one left is still there
    peek = await store.take_all([Take("h:{acme}", rate_per_s=3 / 3600, burst=2, quantity=0)], now=t0 + 1)
    assert peek[0].remaining == 1
    later = await store.take_all([minute, hour], now=t0 + 60)  # the minute refilled; the hour's last
    assert [r.allowed for r in later] == [True, True] and later[1].remaining == 0
    again = await store.take_all([minute, hour], now=t0 + 120)
    assert [r.allowed for r in again] == [True, False]
    assert (await store.take_all([minute], now=t0 + 120))[0].remaining == 1  # still one in the minute


async def test_take_all_is_atomic_under_concurrency(store: Store) -> None:
    takes = [Take("a{t}", rate_per_s=1, burst=4), Take("b{t}", rate_per_s=1, burst=2)]
    results = await asyncio.gather(*(store.take_all(takes, now=1_700_000_000.0) for _ in range(20)))
    assert sum(all(r.allowed for r in got) for got in results) == 3  # b's three, and a keeps two
    left = await store.take_all([Take("a{t}", rate_per_s=1, burst=4, quantity=0)], now=1_700_000_000.0)
    assert left[0].remaining == 2


async def test_gcra_rejects_nonsense_parameters(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.take("k", rate_per_s=0, burst=1)
    with pytest.raises(ValueError):
        await store.take("k", rate_per_s=1, burst=-1)


async def test_hincr_many_adds_a_whole_row_at_once(store: Store) -> None:
    await store.hincr_many("row", {"requests": 1, "cost_usd": 0.25}, ttl_s=60)
    await store.hincr_many("row", {"requests": 1, "cost_usd": 0.5, "prompt_tokens": 7}, ttl_s=60)
    assert await store.hgetall("row") == {"requests": 2.0, "cost_usd": 0.75, "prompt_tokens": 7.0}


async def test_reserve_holds_every_window_or_none(store: Store) -> None:
    keys, limits, ttls = ["spend:{acme}:d", "spend:{acme}:m"], [1.0, 1.5], [60.0, 600.0]
    assert await store.reserve(keys, 0.6, limits, ttls) == -1
    assert await store.reserve(keys, 0.6, limits, ttls) == 0  # the day would overrun: nothing added
    assert float(await store.get("spend:{acme}:m") or 0) == pytest.approx(0.6)
    await store.incr_float("spend:{acme}:d", -0.6)  # a settlement refunds the day
    assert await store.reserve(keys, 0.6, limits, ttls) == -1
    assert await store.reserve(keys, 0.6, limits, ttls) == 0
    await store.incr_float("spend:{acme}:d", -1.2)
    assert await store.reserve(keys, 0.6, limits, ttls) == 1  # now the month is what overruns


async def test_keys_of_one_atomic_operation_must_share_a_hash_tag(store: Store) -> None:
    """On a Cluster two untagged keys are (almost always) in two slots: every backend refuses them alike,
    before anything is written, so a policy building them wrong fails on the memory store too."""
    for call in (lambda: store.take_all([Take("a", 1, 1), Take("b", 1, 1)], now=1_700_000_000.0),
                 lambda: store.reserve(["day", "month"], 1.0, [5.0, 5.0], [60.0, 60.0])):
        with pytest.raises(ValueError, match="hash tag"):
            await call()
    assert await keys(store) == []



async def test_a_give_back_never_takes_a_spend_counter_below_zero(store: Store) -> None:
    """A settlement that reaches a counter the store lost (a restart without persistence) must not leave it
    negative: the tenant would get that much budget on top of its limit."""
    keys, limits, ttls = ["spend:{acme}:d", "spend:{acme}:m"], [1.0, 1.5], [60.0, 600.0]
    assert await store.reserve(keys, 0.5, limits, ttls) == -1
    await store.delete("spend:{acme}:d")  # lost
    assert await store.reserve(keys, -0.4, [1e18, 1e18], ttls) == -1
    assert float(await store.get("spend:{acme}:d") or 0) == 0.0
    assert float(await store.get("spend:{acme}:m") or 0) == pytest.approx(0.1)
    assert await store.reserve(keys, 1.0, limits, ttls) == -1 and await store.reserve(keys, 0.1, limits, ttls) == 0

async def test_reserve_is_atomic_under_concurrency(store: Store) -> None:
    results = await asyncio.gather(*(store.reserve(["spend"], 1.0, [10.0], [60.0]) for _ in range(50)))
    assert results.count(-1) == 10
    assert float(await store.get("spend") or 0) == pytest.approx(10.0)


# -- lists -----------------------------------------------------------------------


async def test_append_and_range_read_a_log_from_any_index(store: Store) -> None:
    assert await store.range("log") == []
    assert await store.append("log", [b"head", b"c1"], ttl_s=60) == 2
    assert await store.append("log", [b"c2"], ttl_s=60) == 3
    assert await store.range("log") == [b"head", b"c1", b"c2"]
    assert await store.range("log", 2) == [b"c2"]
    assert await store.range("log", 5) == []


async def test_append_refreshes_the_expiry(store: Store, advance) -> None:
    await store.append("log", [b"a"], ttl_s=0.4)
    await advance(0.3)
    await store.append("log", [b"b"], ttl_s=0.4)
    await advance(0.3)
    assert await store.range("log") == [b"a", b"b"]
    await advance(0.2)
    assert await store.range("log") == []


async def test_append_announces_the_new_length_atomically(store: Store) -> None:
    async with store.subscribe("log-ch") as sub:
        await store.append("log", [b"a", b"b"], ttl_s=60, notify="log-ch")
        assert await sub.get(2) == b"2"
        assert await store.range("log") == [b"a", b"b"]


# -- notification --------------------------------------------------------------


async def test_subscriber_gets_a_publish_made_right_after_subscribing(store: Store) -> None:
    async with store.subscribe("done:a") as sub:
        await store.publish("done:a", b"result-key")
        assert await sub.get(timeout_s=2) == b"result-key"


async def test_wait_times_out_with_none(store: Store) -> None:
    started = time.monotonic()
    assert await store.wait("done:never", timeout_s=0.1) is None
    assert time.monotonic() - started < 1


async def test_every_waiter_gets_the_message_and_only_its_channel(store: Store) -> None:
    async with store.subscribe("done:a") as one, store.subscribe("done:a") as two:
        async with store.subscribe("done:b") as other:
            await store.publish("done:a", b"A")
            assert await one.get(2) == b"A"
            assert await two.get(2) == b"A"
            assert await other.get(0.1) is None


async def test_wait_is_woken_by_a_later_publish(store: Store) -> None:
    waiter = asyncio.create_task(store.wait("done:x", timeout_s=2))
    for _ in range(50):  # publish only once the waiter is subscribed, or it is lost
        await store.publish("done:x", b"hello")
        await asyncio.sleep(0.02)
        if waiter.done():
            break
    assert await waiter == b"hello"


async def test_resubscribing_after_unsubscribe_still_receives(store: Store) -> None:
    for i in range(3):
        async with store.subscribe("done:again") as sub:
            await store.publish("done:again", f"m{i}".encode())
            assert await sub.get(2) == f"m{i}".encode()


# -- prefixes and health -------------------------------------------------------


async def test_scan_and_delete_by_prefix(store: Store) -> None:
    for key in ["cache:t1:a", "cache:t1:b", "cache:t2:a", "idem:x", "cache*weird"]:
        await store.set(key, b"v")
    assert await keys(store, "cache:t1:") == ["cache:t1:a", "cache:t1:b"]
    assert await keys(store, "cache*") == ["cache*weird"]  # glob characters are literal
    assert await store.delete_prefix("cache:") == 3
    assert await keys(store) == ["cache*weird", "idem:x"]
    assert await store.delete_prefix("nothing:") == 0


async def test_ping_and_identity(store: Store) -> None:
    await store.ping()
    assert store.backend in ("memory", "redis")
    assert store.url_for_display.startswith(("memory://", "redis://", "redis+sentinel://", "redis+cluster://"))


# -- URL dispatch and failures ---------------------------------------------------


async def test_open_store_picks_the_backend_by_scheme() -> None:
    memory = open_store("memory://")
    assert isinstance(memory, MemoryStore) and memory.backend == "memory"
    for url, topology in [("redis://localhost:6379/0", "single"), ("rediss://h:6380/1", "single"),
                          ("unix:///tmp/redis.sock", "single"), ("redis+sentinel://h:26379,h2/mymaster/0", "sentinel"),
                          ("redis+cluster://h:7000,h:7001", "cluster")]:
        redis_store = open_store(url, key_prefix="x")
        assert isinstance(redis_store, RedisStore) and redis_store.backend == "redis"
        assert redis_store.topology == topology
        await redis_store.close()
    with pytest.raises(StoreURLError, match="memory://, redis://"):
        open_store("http://localhost:6379")


async def test_display_url_masks_passwords() -> None:
    store = RedisStore("redis://user:s3cr%40t@db.example:6379/0", key_prefix="x")
    assert store.url_for_display == "redis://user:***@db.example:6379/0"
    await store.close()
    store = RedisStore("redis://db.example:6379/0?username=user&password=other", key_prefix="x")
    assert store.url_for_display == "redis://db.example:6379/0?username=user&password=***"
    await store.close()
    store = RedisStore("redis+sentinel://:pw1234@s1,s2/main?sentinel_password=sent1nel", key_prefix="x")
    assert store.url_for_display == "redis+sentinel://:***@s1,s2/main?sentinel_password=***"
    await store.close()


async def test_unreachable_redis_raises_store_error_fast_without_password() -> None:
    store = open_store("redis://:secret@127.0.0.1:1/0", key_prefix="x")
    for operation in (store.ping, lambda: store.get("k"), lambda: store.wait("ch", 1)):
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            await operation()
        assert time.monotonic() - started < 2.5
        assert isinstance(info.value, StoreUnavailable) and info.value.status == 503
        assert "secret" not in str(info.value)
    await store.close()


async def test_redis_errors_are_translated_and_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore("redis://:hunter2@127.0.0.1:6379/0", key_prefix="x")

    replies = iter([ReplyError("ERR unknown command 'AUTH', with args beginning with: 'hunter2'"),
                    ReplyError("ERR a server that quotes 'hunter2' back"), ReplyError("ERR Connection hunter2-ish")])

    async def failing(*args: object) -> None:
        raise next(replies)

    monkeypatch.setattr(store, "_call", failing)
    # what Redis quotes back of a command it did not take is cut off; a quoted password is masked as a last
    # guard; free text is never substituted (that would reveal the password: "***ionError" for "Connect")
    for expected in (r"redis get failed: ERR unknown command 'AUTH'$", r"redis get failed: ERR a server that quotes "
                     r"'\*\*\*' back$", r"redis get failed: ERR Connection hunter2-ish$"):
        with pytest.raises(StoreError, match=expected):
            await store.get("k")
    await store.close()


async def test_a_redis_that_refuses_the_password_is_a_store_error_without_it() -> None:
    await drop(await _redis_store(new_prefix()))  # skips (fails in CI) without Redis
    store = RedisStore("redis://:hunter2@127.0.0.1:6379/0", key_prefix="x")
    with pytest.raises(StoreError) as info:
        await store.get("k")
    assert "hunter2" not in str(info.value) and "AUTH" in str(info.value)
    await store.close()


# -- Redis only: many instances, a broken pub/sub connection ----------------------


@pytest_asyncio.fixture
async def two_instances(prefix: str):
    a, b = await _redis_store(prefix), await _redis_store(prefix)
    yield a, b
    await a.delete_prefix("")
    await a.close()
    await b.close()


async def test_two_instances_share_state_and_notifications(two_instances) -> None:
    a, b = two_instances
    await a.set("k", b"from a")
    assert await b.get("k") == b"from a"
    claims = await asyncio.gather(*(s.set_nx("lock", b"token", ttl_s=5) for s in (a, b) * 10))
    assert claims.count(True) == 1
    allowed = [await s.take("rl", rate_per_s=1, burst=1, now=1_700_000_000.0) for s in (a, b, a)]
    assert [r.allowed for r in allowed] == [True, True, False]
    async with a.subscribe("done:k") as sub:
        await b.publish("done:k", b"ready")
        assert await sub.get(2) == b"ready"


async def test_waiter_is_woken_when_pubsub_reconnects(two_instances) -> None:
    a, admin = two_instances
    async with a.subscribe("done:k") as sub:
        host, port = a._hub._proto.transport.get_extra_info("sockname")[:2]  # type: ignore[union-attr]
        await admin._call(None, "CLIENT", "KILL", f"{host}:{port}")
        started = time.monotonic()
        assert await sub.get(5) is None  # re-check the key: a publish may have been lost
        assert time.monotonic() - started < 2
        await admin.publish("done:k", b"again")  # and the subscription survived the reconnect
        assert await sub.get(2) == b"again"


async def test_waiter_fails_fast_when_redis_goes_and_hears_again_when_it_is_back() -> None:
    redis = PrivateRedis()
    redis.start()
    store = RedisStore(redis.url, key_prefix=new_prefix())
    try:
        async with store.subscribe("done:k") as sub:
            redis.stop()
            started = time.monotonic()
            with pytest.raises(StoreError, match="pub/sub"):
                await sub.get(5)
            assert time.monotonic() - started < 2
            redis.start()  # the same port
            assert await sub.get(5) is None  # back: re-check the key
            await store.publish("done:k", b"after")
            assert await sub.get(2) == b"after"
    finally:
        await store.close()
        redis.stop()
