"""Container lifecycle events for ``GetContainerEvents`` (kubelet's evented PLEG).

An :class:`EventBroadcaster` hands every published item to each subscriber's own bounded
queue. Publishing never blocks and never waits for a reader: when a subscriber's queue is
full, its oldest item is discarded and the subscriber is told, at the point of the gap,
with :class:`EventsLost` (the RPC then ends that stream with an error, so the client
relists and opens a new one: kubelet does exactly that). Other subscribers are unaffected.

Events live in memory only: after a daemon restart the stream can be opened again and
carries the events from then on (kubelet relists when its stream breaks).

Everything here runs on the event loop thread (the container manager calls its listeners
there).
"""

from __future__ import annotations

import asyncio
import copy
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from moorage.container.manager import ContainerFilter, ContainerManager
from moorage.container.model import Container
from moorage.errors import ResourceExhausted
from moorage.sandbox.manager import SandboxManager
from moorage.sandbox.model import Sandbox

__all__ = [
    "ContainerEvent",
    "EventBroadcaster",
    "EventType",
    "EventsLost",
    "Subscription",
    "watch_containers",
]

T = TypeVar("T")

#: Items a subscriber may have waiting before the oldest are discarded.
DEFAULT_QUEUE = 1000
#: Subscribers at once (kubelet opens one stream; crictl and tools a few).
DEFAULT_MAX_SUBSCRIBERS = 64


class EventsLost(Exception):
    """Items were discarded because the subscriber read too slowly."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} events were discarded: the subscriber read too slowly")
        self.count = count


class Subscription(Generic[T]):
    """One subscriber's queue; iterate it with ``async for``.

    Iteration raises :class:`EventsLost` where items were discarded (iterating on after it
    yields the newer items), and ends after :meth:`close` or when the broadcaster closes
    (items already queued are still yielded then).
    """

    def __init__(self, owner: EventBroadcaster[T], maxsize: int) -> None:
        self._owner = owner
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._lost = 0
        self.lost_total = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def _offer(self, item: T) -> bool:
        """Queue ``item``; False when an older item had to be discarded for it."""
        kept = True
        if len(self._items) >= self._maxsize:
            self._items.popleft()
            self._lost += 1
            self.lost_total += 1
            kept = False
        self._items.append(item)
        self._wakeup.set()
        return kept

    async def get(self) -> T:
        """The next item; raises EventsLost at a gap, StopAsyncIteration when closed."""
        while True:
            if self._lost:
                lost, self._lost = self._lost, 0
                raise EventsLost(lost)
            if self._items:
                return self._items.popleft()
            if self.closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()

    def close(self) -> None:
        """Unsubscribe; what is queued is dropped."""
        self._items.clear()
        self._end()
        self._owner._remove(self)

    def _end(self) -> None:
        self.closed = True
        self._wakeup.set()


class EventBroadcaster(Generic[T]):
    def __init__(
        self,
        maxsize: int = DEFAULT_QUEUE,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.max_subscribers = max_subscribers
        #: Called with the number of items discarded (for a metric).
        self.on_lost = on_lost
        self._subscribers: list[Subscription[T]] = []
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription[T]:
        """A new subscription that gets every item published from now on."""
        if self.closed:
            raise ResourceExhausted("the daemon is shutting down; no new event subscriptions")
        if len(self._subscribers) >= self.max_subscribers:
            raise ResourceExhausted(
                f"too many event subscribers ({self.max_subscribers}); close one first"
            )
        sub = Subscription(self, self.maxsize)
        self._subscribers.append(sub)
        return sub

    def publish(self, item: T) -> int:
        """Give ``item`` to every subscriber; never blocks. Returns how many got it."""
        lost = 0
        for sub in self._subscribers:
            if not sub._offer(item):
                lost += 1
        if lost and self.on_lost is not None:
            self.on_lost(lost)
        return len(self._subscribers)

    def close(self) -> None:
        """End every subscription (after what they have queued) and refuse new ones."""
        self.closed = True
        for sub in list(self._subscribers):
            sub._end()
        self._subscribers.clear()

    def _remove(self, sub: Subscription[T]) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)


# -- container events ---------------------------------------------------------------------------


class EventType(enum.StrEnum):
    """The container manager's listener event names (the CRI ContainerEventType)."""

    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    DELETED = "deleted"


@dataclass(frozen=True)
class ContainerEvent:
    """What evented PLEG needs: the event, and the pod as it was at that moment (its
    sandbox and the status of every container it still has)."""

    type: EventType
    container_id: str
    created_at: int  # ns
    sandbox: Sandbox | None
    containers: tuple[Container, ...]


def _snapshot_sandbox(sb: Sandbox) -> Sandbox:
    snap = copy.copy(sb)
    snap.ips = list(sb.ips)
    return snap


def watch_containers(
    broadcaster: EventBroadcaster[ContainerEvent],
    containers: ContainerManager,
    sandboxes: SandboxManager,
    clock: Callable[[], int] = time.time_ns,
) -> Callable[[str, Container], None]:
    """Publish the container manager's events on ``broadcaster``; returns the listener it
    registered in ``containers.listeners``.

    The pod is copied at the event (containers and sandbox are mutable records), and only
    when someone is subscribed: with no subscriber an event costs nothing.
    """

    def listener(event: str, c: Container) -> None:
        try:
            kind = EventType(event)
        except ValueError:
            return
        if not broadcaster.subscribers:
            return
        sb = sandboxes.find(c.sandbox_id)
        pod = containers.select(ContainerFilter(sandbox_id=c.sandbox_id))
        broadcaster.publish(ContainerEvent(
            type=kind, container_id=c.id, created_at=clock(),
            sandbox=_snapshot_sandbox(sb) if sb is not None else None,
            containers=tuple(copy.copy(x) for x in pod),
        ))

    containers.listeners.append(listener)
    return listener
