"""Single-use tokens for streaming requests: what an Exec, Attach or PortForward URL names.

As the reference streaming server (kubernetes cri-streaming ``request_cache.go``): a token
is good for one request within its time to live (a minute), and at most ``capacity``
(1000) unexpired tokens exist at once. Tokens here are 128 random bits, URL-safe.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from moorage.errors import ResourceExhausted

T = TypeVar("T")

TTL = 60.0
CAPACITY = 1000


class TokenCache(Generic[T]):
    def __init__(self, ttl: float = TTL, capacity: int = CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self.clock = clock
        #: token -> (expiry, request), oldest first (expiries grow with insertion).
        self._items: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def insert(self, request: T) -> str:
        """A new token for ``request``; ResourceExhausted when ``capacity`` are in flight."""
        self._expire()
        if len(self._items) >= self.capacity:
            raise ResourceExhausted(
                f"too many streaming requests in flight ({self.capacity}); retry later")
        token = secrets.token_urlsafe(16)
        self._items[token] = (self.clock() + self.ttl, request)
        return token

    def consume(self, token: str) -> T | None:
        """The request of ``token``, once; None if unknown, used or expired."""
        item = self._items.pop(token, None)
        if item is None:
            return None
        expiry, request = item
        return request if self.clock() < expiry else None

    def _expire(self) -> None:
        now = self.clock()
        while self._items:
            token, (expiry, _) = next(iter(self._items.items()))
            if expiry > now:
                return
            del self._items[token]
