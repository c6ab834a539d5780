"""The cached List answers (server/msgcache.py) of real container and sandbox managers: the
same response while nothing changed, a new one after any change that shows in it, filters
applied as before. Objects are put in the managers' tables directly, as a create would."""

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
        raise AssertionError(f"{code}: {message}")


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
    return Rpcs(sandboxes, containers)


def add_pod(r: Rpcs, name: str, **labels: str) -> Sandbox:
    sb = Sandbox(id=f"{name}-{'0' * 60}", created_at=time.time_ns(), runtime_handler="runc",
                 spec=SandboxSpec(name=name, namespace="ns", uid=f"uid-{name}", attempt=0,
                                  labels=dict(labels), annotations={"note": name}),
                 state=SState.READY)
    r.sandboxes._sandboxes[sb.id] = sb
    return sb


def add_container(r: Rpcs, sb: Sandbox, name: str, state: CState = CState.RUNNING,
                  **labels: str) -> Container:
    image = ImageView(id="sha256:" + "a" * 64, ref="sha256:" + "a" * 64, name="busybox:1",
                      config={}, layers=())
    c = Container(id=f"{name}-{'1' * 60}", sandbox_id=sb.id, created_at=time.time_ns(),
                  runtime_handler="runc", image=image, state=state,
                  spec=ContainerSpec(name=name, attempt=0, image="busybox:1",
                                     labels=dict(labels), annotations={"a": name}))
    r.containers._containers[c.id] = c
    return c


async def containers(r: Rpcs, flt: pb.ContainerFilter | None = None
                     ) -> pb.ListContainersResponse:
    req = pb.ListContainersRequest(filter=flt) if flt is not None else pb.ListContainersRequest()
    return await r.ListContainers(req, Context())  # type: ignore[arg-type]


async def pods(r: Rpcs, flt: pb.PodSandboxFilter | None = None) -> pb.ListPodSandboxResponse:
    req = pb.ListPodSandboxRequest(filter=flt) if flt is not None else pb.ListPodSandboxRequest()
    return await r.ListPodSandbox(req, Context())  # type: ignore[arg-type]


def fresh_containers(r: Rpcs) -> pb.ListContainersResponse:
    """What an uncached ListContainers answers."""
    return pb.ListContainersResponse(
        containers=[csrv.to_container(c) for c in r.containers.select()])


def fresh_pods(r: Rpcs) -> pb.ListPodSandboxResponse:
    return pb.ListPodSandboxResponse(items=[ssrv.to_pod_sandbox(s) for s in r.sandboxes.select()])


async def test_unchanged_list_is_reused_and_exact(rpcs: Rpcs) -> None:
    sb = add_pod(rpcs, "p1", app="web")
    for i in range(5):
        add_container(rpcs, sb, f"c{i}", role="db" if i % 2 else "web")
    first = await containers(rpcs)
    assert first == fresh_containers(rpcs) and len(first.containers) == 5
    assert await containers(rpcs) is first
    # kubelet's relist sends an empty filter: the same answer
    assert await containers(rpcs, pb.ContainerFilter()) is first
    listed = await pods(rpcs)
    assert listed == fresh_pods(rpcs) and await pods(rpcs, pb.PodSandboxFilter()) is listed


async def test_state_change_shows(rpcs: Rpcs) -> None:
    sb = add_pod(rpcs, "p1")
    c = add_container(rpcs, sb, "c0", state=CState.CREATED)
    before = await containers(rpcs)
    assert before.containers[0].state == pb.CONTAINER_CREATED
    c.state = CState.EXITED
    after = await containers(rpcs)
    assert after is not before and after == fresh_containers(rpcs)
    assert after.containers[0].state == pb.CONTAINER_EXITED
    sb.state = SState.NOTREADY
    listed = await pods(rpcs)
    assert listed.items[0].state == pb.SANDBOX_NOTREADY and listed == fresh_pods(rpcs)


async def test_label_change_shows(rpcs: Rpcs) -> None:
    sb = add_pod(rpcs, "p1", app="web")
    c = add_container(rpcs, sb, "c0", role="web")
    await containers(rpcs)
    await pods(rpcs)
    c.spec = replace(c.spec, labels={"role": "db"}, annotations={"a": "changed"})
    sb.spec = replace(sb.spec, labels={"app": "api"})
    listed = (await containers(rpcs)).containers[0]
    assert dict(listed.labels) == {"role": "db"} and dict(listed.annotations) == {"a": "changed"}
    assert dict((await pods(rpcs)).items[0].labels) == {"app": "api"}
    # the per-item message of a filtered list is rebuilt too
    flt = pb.ContainerFilter(label_selector={"role": "db"})
    assert [x.id for x in (await containers(rpcs, flt)).containers] == [c.id]
    assert not (await containers(rpcs, pb.ContainerFilter(label_selector={"role": "web"}))
                ).containers


async def test_add_and_remove_show(rpcs: Rpcs) -> None:
    sb = add_pod(rpcs, "p1")
    a = add_container(rpcs, sb, "a")
    await containers(rpcs)
    b = add_container(rpcs, sb, "b")
    assert [x.id for x in (await containers(rpcs)).containers] == [a.id, b.id]
    del rpcs.containers._containers[a.id]
    assert [x.id for x in (await containers(rpcs)).containers] == [b.id]
    # a container being created is never listed
    add_container(rpcs, sb, "creating", state=CState.CREATING)
    assert [x.id for x in (await containers(rpcs)).containers] == [b.id]
    sb2 = add_pod(rpcs, "p2")
    assert [x.id for x in (await pods(rpcs)).items] == [sb.id, sb2.id]
    del rpcs.sandboxes._sandboxes[sb.id]
    assert [x.id for x in (await pods(rpcs)).items] == [sb2.id]
    assert await pods(rpcs) == fresh_pods(rpcs)


async def test_filters_still_apply(rpcs: Rpcs) -> None:
    p1, p2 = add_pod(rpcs, "p1", app="web"), add_pod(rpcs, "p2", app="db")
    running = add_container(rpcs, p1, "run", role="web")
    exited = add_container(rpcs, p1, "exit", state=CState.EXITED, role="web")
    other = add_container(rpcs, p2, "other", role="db")
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
    assert await ids(pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))) == [
        running.id, exited.id, other.id]

    async def pod_ids(flt: pb.PodSandboxFilter) -> list[str]:
        return [x.id for x in (await pods(rpcs, flt)).items]

    assert await pod_ids(pb.PodSandboxFilter(label_selector={"app": "db"})) == [p2.id]
    p2.state = SState.NOTREADY
    assert await pod_ids(pb.PodSandboxFilter(
        state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY))) == [p1.id]
    assert await pod_ids(pb.PodSandboxFilter(id=p2.id)) == [p2.id]


async def test_stream_lists_use_the_same_messages(rpcs: Rpcs) -> None:
    sb = add_pod(rpcs, "p1")
    for i in range(3):
        add_container(rpcs, sb, f"c{i}")
    streamed = [x async for x in rpcs.StreamContainers(
        pb.StreamContainersRequest(), Context())]  # type: ignore[arg-type]
    assert [c for batch in streamed for c in batch.containers] == list(
        fresh_containers(rpcs).containers)
