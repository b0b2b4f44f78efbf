"""Single-use, expiring stream URLs: issue and redeem in constant time.

Every token gets the same TTL, so insertion order is expiry order: expired entries
are collected from the front of one ordered dict on each call, no timer per token.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


class TokensExhausted(Exception):
    """Too many outstanding tokens (gRPC RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """What a token stands for: the CRI PortForward request it was issued for."""

    sandbox_id: str
    ports: tuple[int, ...] = ()
    kind: str = "portforward"


@dataclass(slots=True)
class _Entry:
    request: StreamRequest
    expires_at: float


class TokenStore:
    def __init__(
        self,
        ttl: float = 60.0,
        max_outstanding: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_outstanding = max_outstanding
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.issued = 0
        self.redeemed = 0
        self.expired = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def collect(self) -> None:
        """Drop the expired tokens now (crishim serve calls it every few seconds: without
        calls, URLs never redeemed were held, and counted as outstanding, until the next
        issue or redeem)."""
        self._collect(self._clock())

    def _collect(self, now: float) -> None:
        entries = self._entries
        while entries:
            token, entry = next(iter(entries.items()))
            if entry.expires_at > now:
                break
            del entries[token]
            self.expired += 1

    def issue(self, request: StreamRequest) -> str:
        """A fresh token for request: 128 random bits, URL-safe."""
        now = self._clock()
        self._collect(now)
        if len(self._entries) >= self.max_outstanding:
            self.refused += 1
            raise TokensExhausted(
                f"{len(self._entries)} stream URLs outstanding (max_tokens={self.max_outstanding})"
            )
        token = secrets.token_urlsafe(16)
        self._entries[token] = _Entry(request, now + self.ttl)
        self.issued += 1
        return token

    def redeem(self, token: str) -> StreamRequest | None:
        """The request behind token, once; None if unknown, used or expired."""
        now = self._clock()
        entry = self._entries.pop(token, None)
        self._collect(now)
        if entry is None:
            return None
        if entry.expires_at <= now:
            self.expired += 1
            return None
        self.redeemed += 1
        return entry.request
