"""Token bucket with exponential backoff, as a pure function of a key's stored state.

The bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per second; an
answered image costs one token. A request that finds too few tokens, or arrives while
the key is blocked, is a strike: strike k blocks the key for
``min(backoff_max_s, backoff_base_s * 2**(k-1))`` seconds (429 with Retry-After). Strikes
are forgotten after ``strike_forget_s`` without a new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Bucket:
    """A key's limiter state as stored: tokens at time ``tokens_at`` (unix seconds)."""

    rate: float
    burst: float
    tokens: float
    tokens_at: float
    strikes: int = 0
    blocked_until: float = 0.0
    last_strike_at: float = 0.0


@dataclass(frozen=True)
class Backoff:
    base_s: float
    max_s: float
    forget_s: float


def refill(bucket: Bucket, now: float) -> Bucket:
    """The bucket at ``now``: tokens grown by the elapsed time, capped at burst; strikes
    older than the forget window dropped."""
    elapsed = max(0.0, now - bucket.tokens_at)
    tokens = min(bucket.burst, bucket.tokens + elapsed * bucket.rate)
    return replace(bucket, tokens=tokens, tokens_at=max(now, bucket.tokens_at))


def retry_after(bucket: Bucket, cost: float, now: float) -> int:
    """Whole seconds until ``cost`` tokens could be taken (at least 1)."""
    wait = max(bucket.blocked_until - now, (cost - bucket.tokens) / bucket.rate, 0.0)
    return max(1, math.ceil(wait))


def admit(bucket: Bucket, cost: float, now: float) -> bool:
    """Whether ``cost`` tokens are there and the key is not blocked (nothing changes)."""
    current = refill(bucket, now)
    return now >= current.blocked_until and current.tokens >= cost


def take(bucket: Bucket, cost: float, now: float) -> Bucket:
    """The bucket after spending ``cost`` tokens (call only after ``admit``)."""
    current = refill(bucket, now)
    return replace(current, tokens=current.tokens - cost)


def strike(bucket: Bucket, now: float, backoff: Backoff) -> Bucket:
    """The bucket after a violation: one more strike and the doubled block."""
    current = refill(bucket, now)
    strikes = current.strikes
    if now - current.last_strike_at > backoff.forget_s:
        strikes = 0
    strikes += 1
    # the exponent is capped: a client ignoring Retry-After piles up strikes without end
    block = min(backoff.max_s, backoff.base_s * 2.0 ** min(strikes - 1, 60))
    return replace(current, strikes=strikes, last_strike_at=now,
                   blocked_until=max(current.blocked_until, now + block))
