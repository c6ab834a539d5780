"""The gRPC front (server/front.py, server/rpc.py): a real grpc.aio server on its own thread
and loop, a real client; the test's own loop plays the daemon's (the domain loop)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.errors import NotFound
from moorage.server.front import NICE, Front
from moorage.server.rpc import Ctx, fill_unimplemented, generic_handler, read, stream, unary

WAIT = 30.0  # seconds before a test gives up on something that should happen


class Servicer(pb_grpc.RuntimeServiceServicer):
    def __init__(self) -> None:
        self.threads: dict[str, int] = {}
        self.nice: int | None = None
        self.cancelled = threading.Event()
        self.closed = threading.Event()
        self.entered = threading.Event()

    @read
    async def Version(self, request: pb.VersionRequest, context: Ctx) -> bytes:
        self.threads["Version"] = threading.get_ident()
        self.nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return pb.VersionResponse(runtime_name="front").SerializeToString()

    @unary
    async def RunPodSandbox(self, request: pb.RunPodSandboxRequest, context: Ctx
                            ) -> pb.RunPodSandboxResponse:
        self.threads["RunPodSandbox"] = threading.get_ident()
        if request.config.metadata.name == "missing":
            raise NotFound("config.metadata.name: 'missing' not found")
        if request.config.metadata.name == "forever":
            self.entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return pb.RunPodSandboxResponse(pod_sandbox_id=request.config.metadata.name)

    @stream
    async def GetContainerEvents(self, request: pb.GetEventsRequest, context: Ctx
                                 ) -> AsyncIterator[pb.ContainerEventResponse]:
        try:
            for i in range(1_000_000):
                self.threads["GetContainerEvents"] = threading.get_ident()
                yield pb.ContainerEventResponse(container_id=str(i))
        finally:
            self.closed.set()


fill_unimplemented(Servicer, pb.DESCRIPTOR.services_by_name["RuntimeService"])


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Servicer, pb_grpc.RuntimeServiceStub]]:
    servicer = Servicer()
    handler = generic_handler(servicer, pb.DESCRIPTOR.services_by_name["RuntimeService"],
                              asyncio.get_running_loop())
    sock = tmp_path / "front.sock"

    async def serve() -> grpc.aio.Server:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        return server

    front = Front()
    front.start()
    server = await front.run(serve())
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield servicer, pb_grpc.RuntimeServiceStub(channel)
    finally:
        channel.close()
        await front.run(server.stop(grace=1))
        front.stop()


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking client call, off the domain loop (which must go on running)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_reads_are_answered_while_the_domain_loop_is_blocked(
        served: tuple[Servicer, pb_grpc.RuntimeServiceStub]) -> None:
    servicer, stub = served
    answered = threading.Event()

    def client() -> None:
        assert stub.Version(pb.VersionRequest(), timeout=WAIT).runtime_name == "front"
        answered.set()

    th = threading.Thread(target=client)
    th.start()
    # The domain loop blocks (as under a long computation) until the read was answered:
    # a read that needed it would never be.
    assert answered.wait(WAIT)
    th.join()
    assert servicer.threads["Version"] != threading.get_ident()
    # ... on a thread that comes first for a CPU (where the process may raise it)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert servicer.nice == (NICE if os.geteuid() == 0 else mine)


async def test_other_calls_run_on_the_domain_loop(
        served: tuple[Servicer, pb_grpc.RuntimeServiceStub]) -> None:
    servicer, stub = served
    resp = await call(stub.RunPodSandbox, pb.RunPodSandboxRequest(
        config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="p"))), timeout=WAIT)
    assert resp.pod_sandbox_id == "p"
    assert servicer.threads["RunPodSandbox"] == threading.get_ident()
    with pytest.raises(grpc.RpcError) as e:
        await call(stub.RunPodSandbox, pb.RunPodSandboxRequest(
            config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="missing"))),
            timeout=WAIT)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "config.metadata.name: 'missing' not found"
    with pytest.raises(grpc.RpcError) as e:
        await call(stub.StopPodSandbox, pb.StopPodSandboxRequest(), timeout=WAIT)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "RuntimeService.StopPodSandbox" in (e.value.details() or "")


async def test_a_call_the_client_gives_up_is_cancelled_on_the_domain_loop(
        served: tuple[Servicer, pb_grpc.RuntimeServiceStub]) -> None:
    servicer, stub = served
    future = stub.RunPodSandbox.future(pb.RunPodSandboxRequest(
        config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="forever"))),
        timeout=WAIT)
    assert await call(servicer.entered.wait, WAIT)
    future.cancel()
    assert await call(servicer.cancelled.wait, WAIT)


async def test_a_stream_is_stepped_on_the_domain_loop_and_closed_when_left(
        served: tuple[Servicer, pb_grpc.RuntimeServiceStub]) -> None:
    servicer, stub = served
    responses = stub.GetContainerEvents(pb.GetEventsRequest(), timeout=WAIT)

    def first(n: int) -> list[str]:
        it: Iterator[pb.ContainerEventResponse] = iter(responses)
        return [next(it).container_id for _ in range(n)]

    assert await call(first, 5) == ["0", "1", "2", "3", "4"]
    assert servicer.threads["GetContainerEvents"] == threading.get_ident()
    responses.cancel()
    # The generator, left half-way, is closed once the client went away.
    assert await call(servicer.closed.wait, WAIT)
