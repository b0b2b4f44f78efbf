"""The token bucket every transport's session budgets share."""

from __future__ import annotations

import pytest

from crishim import budget
from crishim.budget import FloodLimits, TokenBucket


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(budget.time, "monotonic", c)
    return c


def test_the_burst_is_spent_then_refused(clock: _Clock) -> None:
    bucket = TokenBucket(rate=10, burst=5)
    assert all(bucket.take() for _ in range(5))
    assert not bucket.take()
    assert not bucket.take()  # a refusal spends nothing, and gains nothing either


def test_tokens_come_back_at_the_rate_up_to_the_burst(clock: _Clock) -> None:
    bucket = TokenBucket(rate=10, burst=5)
    for _ in range(5):
        bucket.take()
    clock.now += 0.25  # 2.5 tokens
    assert bucket.take() and bucket.take()
    assert not bucket.take()
    clock.now += 3600  # never more than the burst
    assert sum(bucket.take() for _ in range(100)) == 5


def test_the_limits_make_fresh_buckets(clock: _Clock) -> None:
    limits = FloodLimits(control_frame_burst=3, stream_open_burst=2)
    first, second = limits.control_budget(), limits.control_budget()
    assert sum(first.take() for _ in range(10)) == 3
    assert second.take()  # a session's budget is its own
    streams = limits.stream_open_budget()
    assert sum(streams.take() for _ in range(10)) == 2


def test_time_spent_full_is_not_saved_up(clock: _Clock) -> None:
    """Refilled only once short, the bucket counted the time it sat full as accrual: a
    burst half spent, an idle hour, and the next burst came twice over."""
    bucket = TokenBucket(rate=10, burst=100)
    assert all(bucket.take() for _ in range(50))
    clock.now += 3600
    assert sum(bucket.take() for _ in range(1000)) == 100  # the burst, not 150 or 200
