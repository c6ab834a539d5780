"""Stats, metrics, pod resources and checkpoint RPCs over fixture cgroup trees and fake
managers (the RPC handlers are called directly, as grpc would)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import pytest

from moorage.container.manager import ContainerFilter, ContainerManager, get_in, select_in
from moorage.container.model import Container, ContainerSpec, ImageView
from moorage.container.model import State as CState
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import NotFound
from moorage.events import ContainerEvent, EventBroadcaster
from moorage.sandbox.cgroups import Layout, Resources
from moorage.sandbox.manager import SandboxFilter, SandboxManager
from moorage.sandbox.manager import get_in as sandbox_get_in
from moorage.sandbox.manager import select_in as sandbox_select_in
from moorage.sandbox.model import Sandbox, SandboxSpec
from moorage.sandbox.model import State as SState
from moorage.sandbox.namespaces import PinnedNamespaces
from moorage.server import stats as srv
from moorage.stats import cadvisor
from moorage.stats.collector import StatsCollector
from moorage.stats.rate import NS_PER_S
from tests.unit.test_stats_cgroup import make_v1, make_v2

T0 = 1_700_000_000 * NS_PER_S
POD_CG = "/kubepods/burstable/podabc"


# -- fakes -------------------------------------------------------------------------------------


class Aborted(Exception):
    def __init__(self, code: Any, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class FakeContext:
    async def abort(self, code: Any, message: str) -> None:
        raise Aborted(code, message)


class FakeStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.missing: set[str] = set()

    def usage(self, container_id: str) -> tuple[int, int]:
        if container_id in self.missing:
            raise NotFound(f"container {container_id} has no storage")
        return 8192, 5

    def rootfs(self, container_id: str) -> Any:
        class R:
            upper = self.root / container_id / "upper"
        return R()


class FakeContainers:
    def __init__(self, root: Path) -> None:
        self.items: dict[str, Container] = {}
        self.storage = FakeStorage(root / "overlay")
        self.listeners: list[Any] = []
        self.runtimes: dict[str, Any] = {"runc": object()}

    def add(self, c: Container) -> Container:
        self.items[c.id] = c
        return c

    def select(self, flt: ContainerFilter | None = None) -> list[Container]:
        return select_in(self.items, flt)

    def get(self, cid: str) -> Container:
        return get_in(self.items, cid)

    def state_dir(self, c: Container) -> Path:
        return self.storage.root / "run" / c.id


class FakeSandboxes:
    cgroup_driver = "cgroupfs"
    #: The real one: it writes the fixture tree's files.
    apply_resources = SandboxManager.apply_resources

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.items: dict[str, Sandbox] = {}

    def add(self, sb: Sandbox) -> Sandbox:
        self.items[sb.id] = sb
        return sb

    def select(self, flt: SandboxFilter | None = None) -> list[Sandbox]:
        return sandbox_select_in(self.items, flt)

    def get(self, sid: str) -> Sandbox:
        return sandbox_get_in(self.items, sid)

    def find(self, sid: str) -> Sandbox | None:
        try:
            return self.get(sid)
        except NotFound:
            return None

    def pinned(self, sb: Sandbox) -> PinnedNamespaces:
        return PinnedNamespaces(net=None, ipc=None, uts=None)


def container(cid: str, sandbox_id: str, name: str, *, cgroups_path: str,
              state: CState = CState.RUNNING, labels: dict[str, str] | None = None,
              started_at: int = T0 - 10 * NS_PER_S) -> Container:
    return Container(
        id=cid, sandbox_id=sandbox_id,
        spec=ContainerSpec(name=name, attempt=1, image="busybox:1", labels=labels or {},
                           annotations={"a": "b"}),
        image=ImageView(id="sha256:img", ref="sha256:img", name="busybox:1", config={},
                        layers=()),
        created_at=T0 - 20 * NS_PER_S, runtime_handler="runc", state=state,
        started_at=started_at, extra={"cgroups_path": cgroups_path},
    )


def sandbox(sid: str, name: str, *, cgroup_path: str = POD_CG,
            labels: dict[str, str] | None = None) -> Sandbox:
    return Sandbox(id=sid, spec=SandboxSpec(name=name, namespace="ns", uid=f"uid-{name}",
                                            attempt=0, labels=labels or {}),
                   created_at=T0 - 30 * NS_PER_S, runtime_handler="runc",
                   state=SState.READY, cgroup_path=cgroup_path)


class Service(srv.StatsRpcs):
    def __init__(self, containers: FakeContainers, sandboxes: FakeSandboxes,
                 clock: Any = None) -> None:
        self.containers = cast(ContainerManager, containers)
        self.sandboxes = cast(SandboxManager, sandboxes)
        self.events = EventBroadcaster[ContainerEvent]()
        if clock is not None:
            self._stats_collector = StatsCollector(self.containers, self.sandboxes,
                                                   clock=clock)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class World:
    """Two pods; pod A holds a busy and an idle container, pod B one; over a v1 tree."""

    def __init__(self, tmp: Path, v2: bool = False) -> None:
        self.tmp = tmp
        self.a_cg = f"{POD_CG}/moorage-aaaa"
        self.i_cg = f"{POD_CG}/moorage-iiii"
        self.b_pod = "/kubepods/besteffort/podb"
        self.b_cg = f"{self.b_pod}/moorage-bbbb"
        make = make_v2 if v2 else make_v1
        self.layout = make(tmp / "cg", POD_CG)
        for rel in (self.a_cg, self.i_cg, self.b_pod, self.b_cg):
            make(tmp / "cg", rel)
        self.containers = FakeContainers(tmp)
        self.sandboxes = FakeSandboxes(self.layout)
        self.pod_a = self.sandboxes.add(sandbox("a" * 64, "web", labels={"app": "web"}))
        self.pod_b = self.sandboxes.add(sandbox("b" * 64, "db", cgroup_path=self.b_pod))
        self.busy = self.containers.add(container("aaaa" + "0" * 60, self.pod_a.id, "busy",
                                                  cgroups_path=self.a_cg,
                                                  labels={"role": "busy"}))
        self.idle = self.containers.add(container("iiii" + "0" * 60, self.pod_a.id, "idle",
                                                  cgroups_path=self.i_cg,
                                                  labels={"role": "idle"}))
        self.other = self.containers.add(container("bbbb" + "0" * 60, self.pod_b.id, "db",
                                                   cgroups_path=self.b_cg))
        self.clock = Clock()
        self.svc = Service(self.containers, self.sandboxes, self.clock)
        self.ctx: Any = FakeContext()
        self.v2 = v2

    def set_cpu(self, rel: str, usage_ns: int) -> None:
        d = self.tmp / "cg" / rel.strip("/")
        if self.v2:
            (d / "cpu.stat").write_text(f"usage_usec {usage_ns // 1000}\n")
        else:
            (self.tmp / "cg" / "cpuacct" / rel.strip("/") / "cpuacct.usage").write_text(
                f"{usage_ns}\n")


def ids(stats: Iterable[pb.ContainerStats]) -> list[str]:
    return sorted(s.attributes.id for s in stats)


# -- container stats ---------------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
async def test_container_stats_and_nano_cores(tmp_path: Path, v2: bool) -> None:
    w = World(tmp_path, v2=v2)
    w.set_cpu(w.a_cg, 10 * NS_PER_S)
    w.set_cpu(w.i_cg, 0)
    r = await w.svc.ContainerStats(pb.ContainerStatsRequest(container_id=w.busy.id), w.ctx)
    s = r.stats
    assert s.attributes.id == w.busy.id and s.attributes.metadata.name == "busy"
    assert dict(s.attributes.labels) == {"role": "busy"}
    assert dict(s.attributes.annotations) == {"a": "b"}
    assert s.cpu.timestamp == T0
    assert s.cpu.usage_core_nano_seconds.value == 10 * NS_PER_S
    # First sample: the average since the container started 10 s ago = one core.
    assert s.cpu.usage_nano_cores.value == NS_PER_S
    # Two seconds later, 1.5 s more CPU: 0.75 cores.
    w.clock.now += 2 * NS_PER_S
    w.set_cpu(w.a_cg, 11_500_000_000)
    r = await w.svc.ContainerStats(pb.ContainerStatsRequest(container_id=w.busy.id), w.ctx)
    assert r.stats.cpu.usage_core_nano_seconds.value == 11_500_000_000
    assert r.stats.cpu.usage_nano_cores.value == 750_000_000
    idle = (await w.svc.ContainerStats(pb.ContainerStatsRequest(container_id=w.idle.id[:8]),
                                       w.ctx)).stats
    assert idle.cpu.usage_nano_cores.value == 0
    mem = r.stats.memory
    assert mem.timestamp == T0 + 2 * NS_PER_S
    if v2:
        assert mem.working_set_bytes.value == 41943040 - 16777216
        assert mem.available_bytes.value == 268435456 - (41943040 - 16777216)
        assert (mem.rss_bytes.value, mem.page_faults.value) == (10485760, 98765)
        assert mem.psi.Some.Total == 123456000 and r.stats.cpu.psi.Full.Avg10 == 0.5
        assert r.stats.io.psi.Some.Avg60 == 0.75
        assert r.stats.swap.swap_usage_bytes.value == 1048576
        assert not r.stats.swap.HasField("swap_available_bytes")
    else:
        assert mem.working_set_bytes.value == 40960000 - 8192000
        assert mem.usage_bytes.value == 40960000
        assert mem.available_bytes.value == 104857600 - (40960000 - 8192000)
        assert (mem.rss_bytes.value, mem.page_faults.value,
                mem.major_page_faults.value) == (12288000, 142555, 17)
        assert not mem.HasField("psi") and not r.stats.HasField("io")
        assert r.stats.swap.swap_usage_bytes.value == 1024000
        assert r.stats.swap.swap_available_bytes.value == 104857600 - 1024000
    fs = r.stats.writable_layer
    assert fs.fs_id.mountpoint == str(tmp_path / "overlay")
    assert (fs.used_bytes.value, fs.inodes_used.value) == (8192, 5)


async def test_list_container_stats_filters(tmp_path: Path) -> None:
    w = World(tmp_path)

    async def listed(**kw: Any) -> list[str]:
        req = pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(**kw)) if kw \
            else pb.ListContainerStatsRequest()
        return ids((await w.svc.ListContainerStats(req, w.ctx)).stats)

    assert await listed() == sorted([w.busy.id, w.idle.id, w.other.id])
    assert await listed(id=w.busy.id) == [w.busy.id]
    assert await listed(pod_sandbox_id=w.pod_a.id) == sorted([w.busy.id, w.idle.id])
    assert await listed(pod_sandbox_id=w.pod_a.id, label_selector={"role": "idle"}) == [
        w.idle.id]
    assert await listed(label_selector={"role": "nope"}) == []
    streamed = [s for r in [m async for m in w.svc.StreamContainerStats(
        pb.StreamContainerStatsRequest(), w.ctx)] for s in r.container_stats]
    assert ids(streamed) == sorted([w.busy.id, w.idle.id, w.other.id])


async def test_exited_container_without_cgroup_or_storage(tmp_path: Path) -> None:
    w = World(tmp_path)
    gone = w.containers.add(container("dead" + "0" * 60, w.pod_a.id, "dead",
                                      cgroups_path=f"{POD_CG}/moorage-dead",
                                      state=CState.EXITED))
    w.containers.storage.missing.add(gone.id)
    s = (await w.svc.ContainerStats(pb.ContainerStatsRequest(container_id=gone.id),
                                    w.ctx)).stats
    assert s.attributes.id == gone.id
    assert not s.HasField("cpu") and not s.HasField("memory")
    assert not s.HasField("writable_layer")


async def test_unknown_ids_are_not_found(tmp_path: Path) -> None:
    w = World(tmp_path)
    with pytest.raises(Aborted) as e:
        await w.svc.ContainerStats(pb.ContainerStatsRequest(container_id="nope"), w.ctx)
    assert e.value.code.name == "NOT_FOUND"
    with pytest.raises(Aborted) as e:
        await w.svc.ContainerStats(pb.ContainerStatsRequest(), w.ctx)
    assert e.value.code.name == "INVALID_ARGUMENT" and "container_id" in e.value.message
    with pytest.raises(Aborted) as e:
        await w.svc.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id="zz"), w.ctx)
    assert e.value.code.name == "NOT_FOUND"


# -- pod stats ---------------------------------------------------------------------------------


async def test_pod_stats(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.set_cpu(POD_CG, 30 * NS_PER_S)
    r = await w.svc.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=w.pod_a.id),
                                    w.ctx)
    s = r.stats
    assert s.attributes.id == w.pod_a.id
    assert s.attributes.metadata.name == "web" and s.attributes.metadata.uid == "uid-web"
    assert dict(s.attributes.labels) == {"app": "web"}
    linux = s.linux
    # The pod was created 30 s ago and used 30 s of CPU: one core on average.
    assert linux.cpu.usage_nano_cores.value == NS_PER_S
    assert linux.memory.working_set_bytes.value == 40960000 - 8192000
    assert linux.process.process_count.value == 3
    assert linux.process.timestamp == T0
    assert ids(linux.containers) == sorted([w.busy.id, w.idle.id])
    assert not linux.HasField("network")  # no pinned netns in the fake
    listed = await w.svc.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), w.ctx)
    assert sorted(p.attributes.id for p in listed.stats) == sorted([w.pod_a.id, w.pod_b.id])
    flt = pb.PodSandboxStatsFilter(label_selector={"app": "web"})
    listed = await w.svc.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(filter=flt), w.ctx)
    assert [p.attributes.id for p in listed.stats] == [w.pod_a.id]
    flt = pb.PodSandboxStatsFilter(id=w.pod_b.id[:6])
    streamed = [p for m in [x async for x in w.svc.StreamPodSandboxStats(
        pb.StreamPodSandboxStatsRequest(filter=flt), w.ctx)] for p in m.pod_sandbox_stats]
    assert [p.attributes.id for p in streamed] == [w.pod_b.id]
    assert ids(streamed[0].linux.containers) == [w.other.id]


async def test_samples_of_removed_objects_are_forgotten(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.svc.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), w.ctx)
    tracker = w.svc.stats_collector.rates
    assert len(tracker) == 5  # 2 pods, 3 containers
    del w.containers.items[w.idle.id]
    del w.sandboxes.items[w.pod_b.id]
    del w.containers.items[w.other.id]
    await w.svc.ListContainerStats(pb.ListContainerStatsRequest(), w.ctx)
    assert len(tracker) == 2


def test_network_stats_conversion() -> None:
    from moorage.stats.collector import NetworkStats
    from moorage.stats.network import InterfaceStats, default_interface

    ifaces = (InterfaceStats("net1", rx_bytes=1), InterfaceStats("eth0", rx_bytes=10,
                                                                  rx_errors=1, tx_bytes=20,
                                                                  tx_errors=2))
    msg = srv._network(NetworkStats(T0, default_interface(ifaces), ifaces))
    assert msg.timestamp == T0
    d = msg.default_interface
    assert (d.name, d.rx_bytes.value, d.rx_errors.value, d.tx_bytes.value,
            d.tx_errors.value) == ("eth0", 10, 1, 20, 2)
    assert [i.name for i in msg.interfaces] == ["net1"]


# -- metrics -----------------------------------------------------------------------------------


async def test_metric_descriptors_and_pod_metrics(tmp_path: Path) -> None:
    w = World(tmp_path)
    descs = (await w.svc.ListMetricDescriptors(pb.ListMetricDescriptorsRequest(),
                                               w.ctx)).descriptors
    by_name = {d.name: list(d.label_keys) for d in descs}
    assert len(by_name) == len(descs)
    for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                 "container_network_receive_bytes_total", "container_oom_events_total",
                 "container_spec_memory_limit_bytes", "container_fs_usage_bytes"):
        assert name in by_name
    assert by_name["container_network_receive_bytes_total"] == [
        "container", "id", "image", "name", "namespace", "pod", "interface"]
    metrics = (await w.svc.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest(),
                                                 w.ctx)).pod_metrics
    assert sorted(m.pod_sandbox_id for m in metrics) == sorted([w.pod_a.id, w.pod_b.id])
    for pod in metrics:
        everything = list(pod.metrics) + [m for c in pod.container_metrics for m in c.metrics]
        assert everything
        for m in everything:
            assert m.name in by_name, m.name
            assert len(m.label_values) == len(by_name[m.name]), m.name
            assert m.timestamp == 0
    pod_a = next(m for m in metrics if m.pod_sandbox_id == w.pod_a.id)
    assert sorted(c.container_id for c in pod_a.container_metrics) == sorted(
        [w.busy.id, w.idle.id])
    busy = next(c for c in pod_a.container_metrics if c.container_id == w.busy.id)
    values = {(m.name, *m.label_values[6:]): m for m in busy.metrics}
    ws = values[("container_memory_working_set_bytes",)]
    assert ws.value.value == 40960000 - 8192000 and ws.metric_type == pb.GAUGE
    assert list(ws.label_values) == ["busy", w.a_cg, "busybox:1", w.busy.id, "ns", "web"]
    cpu = values[("container_cpu_usage_seconds_total", "total")]
    assert cpu.value.value == 123 and cpu.metric_type == pb.COUNTER
    assert values[("container_fs_reads_bytes_total", "8:0")].value.value == 4096
    assert values[("container_spec_cpu_quota",)].value.value == 50000
    assert values[("container_oom_events_total",)].value.value == 2
    assert values[("container_fs_usage_bytes",)].value.value == 8192
    pod_level = {m.name: m for m in pod_a.metrics}
    assert list(pod_level["container_processes"].label_values) == [
        "", POD_CG, "", w.pod_a.id, "ns", "web"]
    streamed = [p for r in [x async for x in w.svc.StreamPodSandboxMetrics(
        pb.StreamPodSandboxMetricsRequest(), w.ctx)] for p in r.pod_sandbox_metrics]
    assert sorted(p.pod_sandbox_id for p in streamed) == sorted([w.pod_a.id, w.pod_b.id])


async def test_metric_groups_limit_descriptors_and_samples(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.svc.pod_metric_groups = frozenset({"memory"})
    descs = (await w.svc.ListMetricDescriptors(pb.ListMetricDescriptorsRequest(),
                                               w.ctx)).descriptors
    names = {d.name for d in descs}
    assert "container_memory_rss" in names and "container_last_seen" in names
    assert "container_cpu_usage_seconds_total" not in names
    metrics = (await w.svc.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest(),
                                                 w.ctx)).pod_metrics
    for pod in metrics:
        for c in pod.container_metrics:
            assert {m.name for m in c.metrics} <= names


def test_network_samples_carry_the_interface() -> None:
    from moorage.stats.collector import NetworkStats, PodStats
    from moorage.stats.network import InterfaceStats

    sb = sandbox("c" * 64, "p")
    eth = InterfaceStats("eth0", rx_bytes=100, tx_bytes=50, rx_packets=2)
    net = NetworkStats(T0, eth, (eth,))
    [pm] = cadvisor.pod_metrics([PodStats(sb, T0, POD_CG, None, None, net, ())],
                                clock=lambda: 1234.5)
    got = {(s.name, s.label_values[-1]): s.value for s in pm.samples}
    assert got[("container_network_receive_bytes_total", "eth0")] == 100
    assert got[("container_network_transmit_bytes_total", "eth0")] == 50
    assert got[("container_network_receive_packets_total", "eth0")] == 2
    last_seen = next(s for s in pm.samples if s.name == "container_last_seen")
    assert last_seen.value == 1234


# -- UpdatePodSandboxResources -----------------------------------------------------------------


def test_pod_resources_add_overhead_only_to_set_values() -> None:
    req = pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id="x",
        resources=pb.LinuxContainerResources(cpu_shares=1024, cpu_quota=200000,
                                             cpu_period=100000, memory_limit_in_bytes=0),
        overhead=pb.LinuxContainerResources(cpu_shares=102, cpu_quota=10000,
                                            memory_limit_in_bytes=64 << 20),
    )
    res = srv.pod_resources(req)
    assert res == Resources(cpu_shares=1126, cpu_quota=210000, cpu_period=100000,
                            memory_limit=0)
    assert srv.pod_resources(pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id="x")) is None
    only = srv.pod_resources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id="x", resources=pb.LinuxContainerResources(memory_limit_in_bytes=5)))
    assert only == Resources(memory_limit=5)


async def test_update_pod_sandbox_resources_writes_the_pod_cgroup(tmp_path: Path) -> None:
    w = World(tmp_path, v2=True)
    d = tmp_path / "cg" / POD_CG.strip("/")
    req = pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=w.pod_a.id,
        resources=pb.LinuxContainerResources(cpu_quota=50000, cpu_period=100000,
                                             memory_limit_in_bytes=256 << 20),
        overhead=pb.LinuxContainerResources(memory_limit_in_bytes=16 << 20),
    )
    await w.svc.UpdatePodSandboxResources(req, w.ctx)
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert (d / "memory.max").read_text() == str(272 << 20)
    with pytest.raises(Aborted) as e:
        await w.svc.UpdatePodSandboxResources(
            pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id="nope"), w.ctx)
    assert e.value.code.name == "NOT_FOUND"
    # Nothing to apply is fine.
    await w.svc.UpdatePodSandboxResources(
        pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id=w.pod_a.id), w.ctx)


async def test_update_pod_sandbox_resources_v1(tmp_path: Path) -> None:
    w = World(tmp_path)
    req = pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=w.pod_a.id,
        resources=pb.LinuxContainerResources(cpu_shares=2048, memory_limit_in_bytes=1 << 30))
    await w.svc.UpdatePodSandboxResources(req, w.ctx)
    assert (tmp_path / "cg/cpu" / POD_CG.strip("/") / "cpu.shares").read_text() == "2048"
    assert (tmp_path / "cg/memory" / POD_CG.strip("/") / "memory.limit_in_bytes"
            ).read_text() == str(1 << 30)
    # v2 settings on v1 are dropped (CRI-O); a malformed one is still refused
    await w.svc.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=w.pod_a.id,
        resources=pb.LinuxContainerResources(unified={"memory.high": "1"})), w.ctx)
    bad = pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=w.pod_a.id,
        resources=pb.LinuxContainerResources(unified={"../memory.high": "1"}))
    with pytest.raises(Aborted) as e:
        await w.svc.UpdatePodSandboxResources(bad, w.ctx)
    assert e.value.code.name == "INVALID_ARGUMENT" and "unified" in e.value.message


# -- CheckpointContainer -----------------------------------------------------------------------


async def test_checkpoint_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moorage.stats import checkpoint

    w = World(tmp_path)

    async def call(**kw: Any) -> Aborted:
        with pytest.raises(Aborted) as e:
            await w.svc.CheckpointContainer(pb.CheckpointContainerRequest(**kw), w.ctx)
        return e.value

    assert (await call()).code.name == "INVALID_ARGUMENT"
    assert (await call(container_id=w.busy.id, timeout=-1)).code.name == "INVALID_ARGUMENT"
    assert (await call(container_id="nope", location="/x.tar")).code.name == "NOT_FOUND"
    w.idle.state = CState.EXITED
    e = await call(container_id=w.idle.id, location=str(tmp_path / "c.tar"))
    assert e.code.name == "FAILED_PRECONDITION" and "running" in e.message
    monkeypatch.setattr(checkpoint, "criu_path", lambda: None)
    e = await call(container_id=w.busy.id, location=str(tmp_path / "c.tar"))
    assert e.code.name == "UNIMPLEMENTED" and "CRIU" in e.message
    monkeypatch.setattr(checkpoint, "criu_path", lambda: "/usr/sbin/criu")
    e = await call(container_id=w.busy.id, location="relative.tar")
    assert e.code.name == "INVALID_ARGUMENT" and "absolute" in e.message
    e = await call(container_id=w.busy.id, location=str(tmp_path))
    assert e.code.name == "INVALID_ARGUMENT" and "directory" in e.message
