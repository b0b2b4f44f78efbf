import re
import time

import pytest

from crishim.tokens import StreamRequest, TokensExhausted, TokenStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_is_128_random_bits_url_safe():
    store = TokenStore()
    tokens = {store.issue(StreamRequest("sb")) for _ in range(200)}
    assert len(tokens) == 200
    for t in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", t)  # 16 bytes, base64url, unpadded


def test_redeem_is_single_use():
    store = TokenStore()
    t = store.issue(StreamRequest("sb", (80, 443)))
    assert store.redeem(t) == StreamRequest("sb", (80, 443))
    assert store.redeem(t) is None
    assert store.redeem("not-a-token") is None
    assert (store.issued, store.redeemed) == (1, 1)


def test_expired_token_is_refused_with_injected_clock():
    clock = Clock()
    store = TokenStore(ttl=60, clock=clock)
    t = store.issue(StreamRequest("sb"))
    clock.now += 59.9
    keep = store.issue(StreamRequest("sb2"))
    clock.now += 0.2
    assert store.redeem(t) is None
    assert store.expired == 1
    assert store.redeem(keep) == StreamRequest("sb2")


def test_bound_refuses_then_frees_on_expiry():
    clock = Clock()
    store = TokenStore(ttl=60, max_outstanding=3, clock=clock)
    for _ in range(3):
        store.issue(StreamRequest("sb"))
    with pytest.raises(TokensExhausted, match="max_tokens=3"):
        store.issue(StreamRequest("sb"))
    assert store.refused == 1
    clock.now += 61
    store.issue(StreamRequest("sb"))  # the expired three were collected, no timer needed
    assert len(store) == 1


def test_redeeming_frees_a_slot():
    store = TokenStore(max_outstanding=1)
    t = store.issue(StreamRequest("sb"))
    store.redeem(t)
    store.issue(StreamRequest("sb"))


def test_expired_entries_collected_without_timers():
    clock = Clock()
    store = TokenStore(ttl=1, max_outstanding=100_000, clock=clock)
    for _ in range(10_000):
        store.issue(StreamRequest("sb"))
    clock.now += 2
    store.redeem("x")
    assert len(store) == 0 and store.expired == 10_000


def test_issue_redeem_cost_does_not_grow_with_outstanding():
    # counts operations, not seconds: the front-collection touches only expired entries
    store = TokenStore(max_outstanding=20_000, clock=time.monotonic)
    for _ in range(10_000):
        store.issue(StreamRequest("sb"))
    t = store.issue(StreamRequest("x"))
    assert store.redeem(t) == StreamRequest("x")
    assert len(store) == 10_000
