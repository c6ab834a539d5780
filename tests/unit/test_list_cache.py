"""The read path's answers (server/msgcache.py) over real container and sandbox managers:
what readers see is what the managers last saved (published copies, state/published.py),
never an object half-way through a change; the same serialized answer while nothing was
saved, a new one after any saved change that shows in it; filters applied as before.
Objects are put in the managers' tables and saved (records in a temp dir), as a create
would."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from moorage.container import cdi
from moorage.container import spec as specgen
from moorage.container.manager import ContainerManager
from moorage.container.manager import Paths as ContainerPaths
from moorage.container.model import Container, ContainerSpec, ImageView
from moorage.container.model import State as CState
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import NotFound
from moorage.image import registries
from moorage.image.store import ImageStore
from moorage.monitor.client import MonitorClient
from moorage.network.cni import CNIManager
from moorage.oci.runtime import OciRuntime
from moorage.sandbox.cgroups import Layout
from moorage.sandbox.manager import Paths as SandboxPaths
from moorage.sandbox.manager import SandboxManager
from moorage.sandbox.model import Sandbox, SandboxSpec
from moorage.sandbox.model import State as SState
from moorage.server import container as csrv
from moorage.server import sandbox as ssrv
from moorage.server.container import ContainerRpcs
from moorage.server.sandbox import SandboxRpcs
from moorage.storage.overlay import ContainerStorage


class Rpcs(SandboxRpcs, ContainerRpcs):
    def __init__(self, sandboxes: SandboxManager, containers: ContainerManager) -> None:
        self.sandboxes = sandboxes
        self.containers = containers


class Context:
    async def abort(self, code: Any, message: str) -> None:
        raise NotFound(message) if code.name == "NOT_FOUND" else AssertionError(
            f"{code}: {message}")


@pytest.fixture
def rpcs(tmp_path: Path) -> Rpcs:
    cni = CNIManager(tmp_path / "cni", [tmp_path / "bin"], tmp_path / "cni-cache", "")
    sandboxes = SandboxManager(
        SandboxPaths(tmp_path / "sandboxes", tmp_path / "run" / "sandboxes",
                     tmp_path / "run" / "ns"),
        cni, Layout.detect(), cgroup_driver="cgroupfs", handlers=["runc"],
        default_handler="runc", infra_command=[])
    containers = ContainerManager(
        ContainerPaths(tmp_path / "containers", tmp_path / "run" / "containers"),
        images=ImageStore(tmp_path / "images", registries.RegistriesConfig()),
        sandboxes=sandboxes, storage=ContainerStorage(tmp_path / "overlay"),
        monitor=MonitorClient(tmp_path / "run"),
        runtimes={"runc": OciRuntime("runc", "runc", tmp_path / "runc")},
        spec_options=specgen.SpecOptions(), cdi_registry=cdi.Registry([tmp_path / "cdi"]),
        memory_cgroup_root=None, log_max_line=16384)
    for d in (tmp_path / "sandboxes", tmp_path / "containers"):
        d.mkdir()
    return Rpcs(sandboxes, containers)


async def add_pod(r: Rpcs, name: str, **labels: str) -> Sandbox:
    sb = Sandbox(id=f"{name}-{'0' * 60}", created_at=time.time_ns(), runtime_handler="runc",
                 spec=SandboxSpec(name=name, namespace="ns", uid=f"uid-{name}", attempt=0,
                                  labels=dict(labels), annotations={"note": name}),
                 state=SState.READY)
    r.sandboxes._sandboxes[sb.id] = sb
    await r.sandboxes._save(sb)
    return sb


async def add_container(r: Rpcs, sb: Sandbox, name: str, state: CState = CState.RUNNING,
                        **labels: str) -> Container:
    image = ImageView(id="sha256:" + "a" * 64, ref="sha256:" + "a" * 64, name="busybox:1",
                      config={}, layers=())
    c = Container(id=f"{name}-{'1' * 60}", sandbox_id=sb.id, created_at=time.time_ns(),
                  runtime_handler="runc", image=image, state=state,
                  spec=ContainerSpec(name=name, attempt=0, image="busybox:1",
                                     labels=dict(labels), annotations={"a": name}))
    r.containers._containers[c.id] = c
    await r.containers._save(c)
    return c


async def containers_raw(r: Rpcs, flt: pb.ContainerFilter | None = None) -> bytes:
    req = pb.ListContainersRequest(filter=flt) if flt is not None else pb.ListContainersRequest()
    return await r.ListContainers(req, Context())  # type: ignore[arg-type]


async def containers(r: Rpcs, flt: pb.ContainerFilter | None = None
                     ) -> pb.ListContainersResponse:
    return pb.ListContainersResponse.FromString(await containers_raw(r, flt))


async def pods_raw(r: Rpcs, flt: pb.PodSandboxFilter | None = None) -> bytes:
    req = pb.ListPodSandboxRequest(filter=flt) if flt is not None else pb.ListPodSandboxRequest()
    return await r.ListPodSandbox(req, Context())  # type: ignore[arg-type]


async def pods(r: Rpcs, flt: pb.PodSandboxFilter | None = None) -> pb.ListPodSandboxResponse:
    return pb.ListPodSandboxResponse.FromString(await pods_raw(r, flt))


async def container_status(r: Rpcs, cid: str) -> pb.ContainerStatusResponse:
    raw = await r.ContainerStatus(pb.ContainerStatusRequest(container_id=cid),
                                  Context())  # type: ignore[arg-type]
    return pb.ContainerStatusResponse.FromString(raw)


async def pod_status(r: Rpcs, pod_id: str) -> pb.PodSandboxStatusResponse:
    raw = await r.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                   Context())  # type: ignore[arg-type]
    return pb.PodSandboxStatusResponse.FromString(raw)


def fresh_containers(r: Rpcs) -> pb.ListContainersResponse:
    """What an uncached ListContainers of the live objects answers."""
    return pb.ListContainersResponse(
        containers=[csrv.to_container(c) for c in r.containers.select()])


def fresh_pods(r: Rpcs) -> pb.ListPodSandboxResponse:
    return pb.ListPodSandboxResponse(items=[ssrv.to_pod_sandbox(s) for s in r.sandboxes.select()])


async def test_unchanged_list_is_reused_and_exact(rpcs: Rpcs) -> None:
    sb = await add_pod(rpcs, "p1", app="web")
    for i in range(5):
        await add_container(rpcs, sb, f"c{i}", role="db" if i % 2 else "web")
    first = await containers_raw(rpcs)
    assert pb.ListContainersResponse.FromString(first) == fresh_containers(rpcs)
    assert len(fresh_containers(rpcs).containers) == 5
    assert await containers_raw(rpcs) is first
    # kubelet's relist sends an empty filter: the same answer
    assert await containers_raw(rpcs, pb.ContainerFilter()) is first
    listed = await pods_raw(rpcs)
    assert pb.ListPodSandboxResponse.FromString(listed) == fresh_pods(rpcs)
    assert await pods_raw(rpcs, pb.PodSandboxFilter()) is listed


async def test_a_change_shows_once_saved(rpcs: Rpcs) -> None:
    sb = await add_pod(rpcs, "p1")
    c = await add_container(rpcs, sb, "c0", state=CState.CREATED)
    before = await containers_raw(rpcs)
    assert (await containers(rpcs)).containers[0].state == pb.CONTAINER_CREATED
    # Half-way through a change (as an exit is recorded, field by field): readers still
    # see the last saved container, whole.
    c.state = CState.EXITED
    assert await containers_raw(rpcs) is before
    status = (await container_status(rpcs, c.id)).status
    assert (status.state, status.exit_code) == (pb.CONTAINER_CREATED, 0)
    c.exit_code, c.finished_at, c.reason = 3, time.time_ns(), "Error"
    await rpcs.containers._save(c)
    after = await containers(rpcs)
    assert after == fresh_containers(rpcs)
    assert after.containers[0].state == pb.CONTAINER_EXITED
    status = (await container_status(rpcs, c.id)).status
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 3, "Error")
    assert status == csrv.to_status(c)
    sb.state = SState.NOTREADY
    assert (await pods(rpcs)).items[0].state == pb.SANDBOX_READY
    await rpcs.sandboxes._save(sb)
    listed = await pods(rpcs)
    assert listed.items[0].state == pb.SANDBOX_NOTREADY and listed == fresh_pods(rpcs)
    assert (await pod_status(rpcs, sb.id)).status == ssrv.to_status(sb)


async def test_label_change_shows(rpcs: Rpcs) -> None:
    sb = await add_pod(rpcs, "p1", app="web")
    c = await add_container(rpcs, sb, "c0", role="web")
    await containers(rpcs)
    await pods(rpcs)
    c.spec = replace(c.spec, labels={"role": "db"}, annotations={"a": "changed"})
    sb.spec = replace(sb.spec, labels={"app": "api"})
    await rpcs.containers._save(c)
    await rpcs.sandboxes._save(sb)
    listed = (await containers(rpcs)).containers[0]
    assert dict(listed.labels) == {"role": "db"} and dict(listed.annotations) == {"a": "changed"}
    assert dict((await pods(rpcs)).items[0].labels) == {"app": "api"}
    # the per-item message of a filtered list is rebuilt too
    flt = pb.ContainerFilter(label_selector={"role": "db"})
    assert [x.id for x in (await containers(rpcs, flt)).containers] == [c.id]
    assert not (await containers(rpcs, pb.ContainerFilter(label_selector={"role": "web"}))
                ).containers


async def test_add_and_remove_show(rpcs: Rpcs) -> None:
    sb = await add_pod(rpcs, "p1")
    a = await add_container(rpcs, sb, "a")
    await containers(rpcs)
    b = await add_container(rpcs, sb, "b")
    assert [x.id for x in (await containers(rpcs)).containers] == [a.id, b.id]
    del rpcs.containers._containers[a.id]
    rpcs.containers._published.drop(a.id)
    assert [x.id for x in (await containers(rpcs)).containers] == [b.id]
    with pytest.raises(NotFound):
        await container_status(rpcs, a.id)
    # a container being created is never listed, nor its status given
    creating = await add_container(rpcs, sb, "creating", state=CState.CREATING)
    assert [x.id for x in (await containers(rpcs)).containers] == [b.id]
    with pytest.raises(NotFound):
        await container_status(rpcs, creating.id)
    sb2 = await add_pod(rpcs, "p2")
    assert [x.id for x in (await pods(rpcs)).items] == [sb.id, sb2.id]
    del rpcs.sandboxes._sandboxes[sb.id]
    rpcs.sandboxes._published.drop(sb.id)
    assert [x.id for x in (await pods(rpcs)).items] == [sb2.id]
    assert await pods(rpcs) == fresh_pods(rpcs)


async def test_filters_still_apply(rpcs: Rpcs) -> None:
    p1, p2 = await add_pod(rpcs, "p1", app="web"), await add_pod(rpcs, "p2", app="db")
    running = await add_container(rpcs, p1, "run", role="web")
    exited = await add_container(rpcs, p1, "exit", state=CState.EXITED, role="web")
    other = await add_container(rpcs, p2, "other", role="db")
    await containers(rpcs)  # fills the cache

    async def ids(flt: pb.ContainerFilter) -> list[str]:
        return [x.id for x in (await containers(rpcs, flt)).containers]

    assert await ids(pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))) == [running.id, other.id]
    assert await ids(pb.ContainerFilter(pod_sandbox_id=p1.id)) == [running.id, exited.id]
    assert await ids(pb.ContainerFilter(id=exited.id[:8])) == [exited.id]
    assert await ids(pb.ContainerFilter(label_selector={"role": "db"})) == [other.id]
    # a filtered answer holds the same messages as the unfiltered one
    by_id = {x.id: x for x in (await containers(rpcs)).containers}
    flt = pb.ContainerFilter(pod_sandbox_id=p2.id)
    assert list((await containers(rpcs, flt)).containers) == [by_id[other.id]]
    exited.state = CState.RUNNING
    await rpcs.containers._save(exited)
    assert await ids(pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))) == [
        running.id, exited.id, other.id]

    async def pod_ids(flt: pb.PodSandboxFilter) -> list[str]:
        return [x.id for x in (await pods(rpcs, flt)).items]

    assert await pod_ids(pb.PodSandboxFilter(label_selector={"app": "db"})) == [p2.id]
    p2.state = SState.NOTREADY
    await rpcs.sandboxes._save(p2)
    assert await pod_ids(pb.PodSandboxFilter(
        state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY))) == [p1.id]
    assert await pod_ids(pb.PodSandboxFilter(id=p2.id)) == [p2.id]


async def test_stream_lists_use_the_same_messages(rpcs: Rpcs) -> None:
    sb = await add_pod(rpcs, "p1")
    for i in range(3):
        await add_container(rpcs, sb, f"c{i}")
    streamed = [pb.StreamContainersResponse.FromString(x) async for x in rpcs.StreamContainers(
        pb.StreamContainersRequest(), Context())]  # type: ignore[arg-type]
    assert [c for batch in streamed for c in batch.containers] == list(
        fresh_containers(rpcs).containers)
    streamed_pods = [pb.StreamPodSandboxesResponse.FromString(x)
                     async for x in rpcs.StreamPodSandboxes(
                         pb.StreamPodSandboxesRequest(), Context())]  # type: ignore[arg-type]
    assert [p for batch in streamed_pods for p in batch.pod_sandboxes] == list(
        fresh_pods(rpcs).items)


async def test_published_copies_never_change(rpcs: Rpcs) -> None:
    sb = await add_pod(rpcs, "p1")
    c = await add_container(rpcs, sb, "c0")
    published = rpcs.containers.published()
    copy = published[c.id]
    assert copy is not c and copy == c
    c.user["uid"] = 5  # an in-place change of a mutable field of the live object
    c.state = CState.EXITED
    assert copy.user == {} and copy.state == CState.RUNNING
    await rpcs.containers._save(c)
    assert rpcs.containers.published() is not published  # replaced, not modified
    assert published[c.id] is copy and rpcs.containers.published()[c.id].user == {"uid": 5}
