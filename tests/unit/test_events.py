"""The container event broadcaster, the container listener, and GetContainerEvents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

import pytest

from moorage.container.manager import ContainerManager
from moorage.container.model import State as CState
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import ResourceExhausted
from moorage.events import (
    ContainerEvent,
    EventBroadcaster,
    EventsLost,
    EventType,
    watch_containers,
)
from moorage.sandbox.manager import SandboxManager
from tests.unit.test_stats_rpcs import Aborted, World


async def drain(sub: Any, n: int) -> list[Any]:
    return [await sub.get() for _ in range(n)]


async def test_every_subscriber_gets_every_item_in_order() -> None:
    b = EventBroadcaster[int]()
    one, two = b.subscribe(), b.subscribe()
    assert b.subscribers == 2
    for i in range(5):
        assert b.publish(i) == 2
    assert await drain(one, 5) == [0, 1, 2, 3, 4]
    assert await drain(two, 5) == [0, 1, 2, 3, 4]
    one.close()
    assert b.subscribers == 1
    assert b.publish(9) == 1
    assert await two.get() == 9


async def test_a_waiting_subscriber_wakes_up() -> None:
    b = EventBroadcaster[str]()
    sub = b.subscribe()
    waiter = asyncio.ensure_future(sub.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    b.publish("x")
    assert await waiter == "x"


async def test_slow_subscriber_loses_its_oldest_items_and_is_told() -> None:
    lost: list[int] = []
    b = EventBroadcaster[int](maxsize=3, on_lost=lost.append)
    slow, fast = b.subscribe(), b.subscribe()
    got_fast = []
    for i in range(10):
        b.publish(i)  # never blocks, whatever the slow one does
        got_fast.append(await fast.get())
    assert got_fast == list(range(10))
    assert len(slow) == 3
    assert sum(lost) == 7 and slow.lost_total == 7
    # The gap comes first (the lost items were the oldest), then the newest ones.
    with pytest.raises(EventsLost) as e:
        await slow.get()
    assert e.value.count == 7
    assert await drain(slow, 3) == [7, 8, 9]


async def test_close_ends_iteration_after_what_is_queued() -> None:
    b = EventBroadcaster[int]()
    sub = b.subscribe()
    b.publish(1)
    b.publish(2)
    b.close()
    assert [i async for i in sub] == [1, 2]
    assert b.subscribers == 0
    with pytest.raises(ResourceExhausted):
        b.subscribe()


async def test_subscriber_limit() -> None:
    b = EventBroadcaster[int](max_subscribers=2)
    first = b.subscribe()
    b.subscribe()
    with pytest.raises(ResourceExhausted):
        b.subscribe()
    first.close()
    first.close()  # twice is fine
    b.subscribe()
    with pytest.raises(ValueError):
        EventBroadcaster[int](maxsize=0)


async def until_subscribed(w: World, n: int) -> None:
    for _ in range(100):
        if w.svc.events.subscribers >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError("the stream never subscribed")


def make_world(tmp_path: Path) -> tuple[World, Any]:
    w = World(tmp_path)
    listener = watch_containers(w.svc.events, cast(ContainerManager, w.containers),
                                cast(SandboxManager, w.sandboxes), clock=lambda: 42)
    return w, listener


async def test_listener_snapshots_the_pod(tmp_path: Path) -> None:
    w, listener = make_world(tmp_path)
    assert w.containers.listeners == [listener]
    listener("started", w.busy)  # nobody listens: nothing is built or kept
    sub = w.svc.events.subscribe()
    listener("started", w.busy)
    listener("resized", w.busy)  # not a CRI event: ignored
    ev = await sub.get()
    assert isinstance(ev, ContainerEvent) and len(sub) == 0
    assert (ev.type, ev.container_id, ev.created_at) == (EventType.STARTED, w.busy.id, 42)
    assert ev.sandbox is not None and ev.sandbox.id == w.pod_a.id
    assert ev.sandbox is not w.pod_a  # a copy, as it was at the event
    assert sorted(c.id for c in ev.containers) == sorted([w.busy.id, w.idle.id])
    # A later change does not rewrite the event.
    w.busy.state = CState.EXITED
    assert next(c for c in ev.containers if c.id == w.busy.id).state == CState.RUNNING
    # A deleted container is no longer in its pod.
    del w.containers.items[w.busy.id]
    listener("deleted", w.busy)
    ev = await sub.get()
    assert ev.type == EventType.DELETED and [c.id for c in ev.containers] == [w.idle.id]
    # A container whose pod is gone: no sandbox status.
    del w.sandboxes.items[w.pod_b.id]
    listener("stopped", w.other)
    ev = await sub.get()
    assert ev.sandbox is None


async def test_get_container_events_two_subscribers(tmp_path: Path) -> None:
    w, listener = make_world(tmp_path)

    async def collect(n: int) -> list[pb.ContainerEventResponse]:
        out = []
        stream = cast(AsyncGenerator[pb.ContainerEventResponse, None],
                      w.svc.GetContainerEvents(pb.GetEventsRequest(), w.ctx))
        async for msg in stream:
            out.append(msg)
            if len(out) == n:
                break
        await stream.aclose()  # what grpc does when the client goes away
        return out

    streams = [asyncio.ensure_future(collect(4)) for _ in range(2)]
    await until_subscribed(w, 2)
    for kind in ("created", "started", "stopped", "deleted"):
        if kind == "stopped":
            w.busy.state, w.busy.exit_code, w.busy.reason = CState.EXITED, 137, "Error"
        if kind == "deleted":
            del w.containers.items[w.busy.id]
        listener(kind, w.busy)
    for got in await asyncio.gather(*streams):
        assert [m.container_event_type for m in got] == [
            pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT,
            pb.CONTAINER_STOPPED_EVENT, pb.CONTAINER_DELETED_EVENT]
        assert all(m.container_id == w.busy.id and m.created_at == 42 for m in got)
        first = got[0]
        assert first.pod_sandbox_status.id == w.pod_a.id
        assert first.pod_sandbox_status.metadata.uid == "uid-web"
        assert first.pod_sandbox_status.state == pb.SANDBOX_READY
        statuses = {s.id: s for s in first.containers_statuses}
        assert statuses[w.busy.id].state == pb.CONTAINER_RUNNING
        assert statuses[w.busy.id].metadata.name == "busy"
        stopped = {s.id: s for s in got[2].containers_statuses}[w.busy.id]
        assert (stopped.state, stopped.exit_code) == (pb.CONTAINER_EXITED, 137)
        assert [s.id for s in got[3].containers_statuses] == [w.idle.id]
    # Both streams ended: their subscriptions are gone.
    assert w.svc.events.subscribers == 0


async def test_get_container_events_too_slow_ends_the_stream(tmp_path: Path) -> None:
    w, listener = make_world(tmp_path)
    w.svc.events.maxsize = 2
    stream = w.svc.GetContainerEvents(pb.GetEventsRequest(), w.ctx)
    first = asyncio.ensure_future(stream.__anext__())
    await until_subscribed(w, 1)
    listener("created", w.busy)
    assert (await first).container_event_type == pb.CONTAINER_CREATED_EVENT
    for _ in range(5):  # the client reads nothing meanwhile: 3 of these cannot be kept
        listener("started", w.busy)
    with pytest.raises(Aborted) as e:
        await stream.__anext__()
    assert e.value.code.name == "RESOURCE_EXHAUSTED" and "reopen" in e.value.message
    assert w.svc.events.subscribers == 0


async def test_get_container_events_ends_at_shutdown(tmp_path: Path) -> None:
    w, _ = make_world(tmp_path)
    stream = w.svc.GetContainerEvents(pb.GetEventsRequest(), w.ctx)
    pending = asyncio.ensure_future(stream.__anext__())
    await until_subscribed(w, 1)
    w.svc.events.close()
    with pytest.raises(StopAsyncIteration):
        await pending
