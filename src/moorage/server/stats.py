"""RuntimeService stats, metrics, events, pod resources and checkpoint RPCs.

``StatsRpcs`` is a mixin of :class:`moorage.server.runtime.RuntimeService`: it uses the
service's ``containers`` (ContainerManager), ``sandboxes`` (SandboxManager) and ``events``
(the container event broadcaster), and makes its stats collector on first use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TypeVar

from moorage.container.manager import ContainerFilter, ContainerManager
from moorage.container.model import State as ContainerState
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from moorage.events import ContainerEvent, EventBroadcaster, EventsLost, EventType
from moorage.sandbox.cgroups import Resources
from moorage.sandbox.manager import SandboxFilter, SandboxManager
from moorage.sandbox.model import Sandbox
from moorage.server.container import to_status as container_status
from moorage.server.rpc import Ctx, stream, unary
from moorage.server.sandbox import resources_from_proto
from moorage.server.sandbox import to_status as sandbox_status
from moorage.stats import cadvisor
from moorage.stats.cgroup import CgroupStats, MemoryStats, Psi, PsiData
from moorage.stats.checkpoint import CheckpointRequest, checkpoint
from moorage.stats.collector import (
    ContainerStats,
    NetworkStats,
    PodStats,
    StatsCollector,
)
from moorage.stats.network import InterfaceStats

#: Items per message of the Stream* RPCs.
STREAM_BATCH = 100

T = TypeVar("T")

_EVENT_TYPES = {
    EventType.CREATED: pb.CONTAINER_CREATED_EVENT,
    EventType.STARTED: pb.CONTAINER_STARTED_EVENT,
    EventType.STOPPED: pb.CONTAINER_STOPPED_EVENT,
    EventType.DELETED: pb.CONTAINER_DELETED_EVENT,
}
_METRIC_TYPES = {"counter": pb.COUNTER, "gauge": pb.GAUGE}


# -- domain -> proto ------------------------------------------------------------------------------


def _u(value: int) -> pb.UInt64Value:
    return pb.UInt64Value(value=max(int(value), 0))


def _psi_data(d: PsiData) -> pb.PsiData:
    return pb.PsiData(Total=d.total_ns, Avg10=d.avg10, Avg60=d.avg60, Avg300=d.avg300)


def _psi(p: Psi) -> pb.PsiStats:
    msg = pb.PsiStats(Some=_psi_data(p.some))
    if p.full is not None:
        msg.Full.CopyFrom(_psi_data(p.full))
    return msg


def _cpu(stats: CgroupStats, nano_cores: int | None) -> pb.CpuUsage | None:
    if stats.cpu is None:
        return None
    msg = pb.CpuUsage(timestamp=stats.timestamp_ns,
                      usage_core_nano_seconds=_u(stats.cpu.usage_ns))
    if nano_cores is not None:
        msg.usage_nano_cores.CopyFrom(_u(nano_cores))
    if stats.cpu.psi is not None:
        msg.psi.CopyFrom(_psi(stats.cpu.psi))
    return msg


def _memory(stats: CgroupStats) -> pb.MemoryUsage | None:
    m: MemoryStats | None = stats.memory
    if m is None:
        return None
    msg = pb.MemoryUsage(
        timestamp=stats.timestamp_ns, working_set_bytes=_u(m.working_set),
        usage_bytes=_u(m.usage), rss_bytes=_u(m.rss), page_faults=_u(m.page_faults),
        major_page_faults=_u(m.major_page_faults),
    )
    if m.available is not None:
        msg.available_bytes.CopyFrom(_u(m.available))
    if m.psi is not None:
        msg.psi.CopyFrom(_psi(m.psi))
    return msg


def _swap(stats: CgroupStats) -> pb.SwapUsage | None:
    m = stats.memory
    if m is None or m.swap_usage is None:
        return None
    msg = pb.SwapUsage(timestamp=stats.timestamp_ns, swap_usage_bytes=_u(m.swap_usage))
    if m.swap_limit is not None:
        msg.swap_available_bytes.CopyFrom(_u(m.swap_limit - m.swap_usage))
    return msg


def _io(stats: CgroupStats) -> pb.IoUsage | None:
    if stats.io is None or stats.io.psi is None:
        return None
    return pb.IoUsage(timestamp=stats.timestamp_ns, psi=_psi(stats.io.psi))


def container_stats_pb(s: ContainerStats) -> pb.ContainerStats:
    c = s.container
    msg = pb.ContainerStats(attributes=pb.ContainerAttributes(
        id=c.id, metadata=pb.ContainerMetadata(name=c.spec.name, attempt=c.spec.attempt),
        labels=c.spec.labels, annotations=c.spec.annotations,
    ))
    if s.cgroup is not None:
        for field, value in (("cpu", _cpu(s.cgroup, s.nano_cores)),
                             ("memory", _memory(s.cgroup)), ("swap", _swap(s.cgroup)),
                             ("io", _io(s.cgroup))):
            if value is not None:
                getattr(msg, field).CopyFrom(value)
    if s.writable_layer is not None:
        fs = s.writable_layer
        msg.writable_layer.CopyFrom(pb.FilesystemUsage(
            timestamp=fs.timestamp_ns, fs_id=pb.FilesystemIdentifier(mountpoint=fs.mountpoint),
            used_bytes=_u(fs.used_bytes), inodes_used=_u(fs.inodes_used),
        ))
    return msg


def _interface(i: InterfaceStats) -> pb.NetworkInterfaceUsage:
    return pb.NetworkInterfaceUsage(name=i.name, rx_bytes=_u(i.rx_bytes),
                                    rx_errors=_u(i.rx_errors), tx_bytes=_u(i.tx_bytes),
                                    tx_errors=_u(i.tx_errors))


def _network(n: NetworkStats) -> pb.NetworkUsage:
    msg = pb.NetworkUsage(timestamp=n.timestamp_ns,
                          interfaces=[_interface(i) for i in n.others])
    if n.default is not None:
        msg.default_interface.CopyFrom(_interface(n.default))
    return msg


def pod_stats_pb(p: PodStats) -> pb.PodSandboxStats:
    sb = p.sandbox
    s = sb.spec
    linux = pb.LinuxPodSandboxStats(containers=[container_stats_pb(c) for c in p.containers])
    if p.cgroup is not None:
        for field, value in (("cpu", _cpu(p.cgroup, p.nano_cores)),
                             ("memory", _memory(p.cgroup)), ("io", _io(p.cgroup))):
            if value is not None:
                getattr(linux, field).CopyFrom(value)
        if p.cgroup.pids is not None:
            linux.process.CopyFrom(pb.ProcessUsage(timestamp=p.cgroup.timestamp_ns,
                                                   process_count=_u(p.cgroup.pids.current)))
    if p.network is not None:
        linux.network.CopyFrom(_network(p.network))
    return pb.PodSandboxStats(
        attributes=pb.PodSandboxAttributes(
            id=sb.id, metadata=pb.PodSandboxMetadata(name=s.name, uid=s.uid,
                                                     namespace=s.namespace,
                                                     attempt=s.attempt),
            labels=s.labels, annotations=s.annotations,
        ),
        linux=linux,
    )


def _samples(samples: Sequence[cadvisor.Sample]) -> list[pb.Metric]:
    return [pb.Metric(name=m.name, timestamp=0,
                      metric_type=_METRIC_TYPES[m.kind],
                      label_values=list(m.label_values), value=_u(m.value))
            for m in samples]


def pod_metrics_pb(m: cadvisor.PodMetrics) -> pb.PodSandboxMetrics:
    return pb.PodSandboxMetrics(
        pod_sandbox_id=m.pod_sandbox_id, metrics=_samples(m.samples),
        container_metrics=[pb.ContainerMetrics(container_id=cid, metrics=_samples(samples))
                           for cid, samples in m.containers],
    )


def event_pb(ev: ContainerEvent) -> pb.ContainerEventResponse:
    msg = pb.ContainerEventResponse(
        container_id=ev.container_id,
        container_event_type=_EVENT_TYPES[ev.type],
        created_at=ev.created_at,
        containers_statuses=[container_status(c) for c in ev.containers],
    )
    if ev.sandbox is not None:
        msg.pod_sandbox_status.CopyFrom(sandbox_status(ev.sandbox))
    return msg


def pod_resources(request: pb.UpdatePodSandboxResourcesRequest) -> Resources | None:
    """The pod cgroup's limits: ``resources`` (the sum of the containers') plus
    ``overhead``, as kubelet sizes the pod cgroup. Overhead is added only to a value that
    is set: it never turns "no limit" into a limit."""
    has_res, has_over = request.HasField("resources"), request.HasField("overhead")
    if not has_res and not has_over:
        return None
    res = resources_from_proto(request.resources) if has_res else Resources()
    if not has_over:
        return res
    over = resources_from_proto(request.overhead)

    def plus(a: int, b: int) -> int:
        return a + b if a > 0 and b > 0 else a

    return replace(
        res,
        cpu_shares=plus(res.cpu_shares, over.cpu_shares),
        cpu_quota=plus(res.cpu_quota, over.cpu_quota),
        memory_limit=plus(res.memory_limit, over.memory_limit),
        hugepage_limits={k: plus(v, over.hugepage_limits.get(k, 0))
                         for k, v in res.hugepage_limits.items()},
    )


def _batches(items: Sequence[T]) -> list[Sequence[T]]:
    return [items[i:i + STREAM_BATCH] for i in range(0, len(items), STREAM_BATCH)]


def _container_filter(f: pb.ContainerStatsFilter | None) -> ContainerFilter | None:
    if f is None:
        return None
    return ContainerFilter(id=f.id, sandbox_id=f.pod_sandbox_id, labels=dict(f.label_selector))


def _sandbox_filter(f: pb.PodSandboxStatsFilter | None) -> SandboxFilter | None:
    if f is None:
        return None
    return SandboxFilter(id=f.id, labels=dict(f.label_selector))


# -- the RPCs -------------------------------------------------------------------------------------


class StatsRpcs:
    containers: ContainerManager
    sandboxes: SandboxManager
    events: EventBroadcaster[ContainerEvent]
    #: Metric groups of ListPodSandboxMetrics (see stats.cadvisor.GROUPS); None: all.
    pod_metric_groups: frozenset[str] | None = None
    _stats_collector: StatsCollector | None = None

    @property
    def stats_collector(self) -> StatsCollector:
        if self._stats_collector is None:
            self._stats_collector = StatsCollector(self.containers, self.sandboxes)
        return self._stats_collector

    async def _container_stats(self, flt: ContainerFilter | None) -> list[pb.ContainerStats]:
        stats = await self.stats_collector.container_stats(self.containers.select(flt))
        return [container_stats_pb(s) for s in stats]

    async def _pod_stats(self, sbs: list[Sandbox]) -> list[PodStats]:
        return await self.stats_collector.pod_stats(sbs)

    @unary
    async def ContainerStats(self, request: pb.ContainerStatsRequest, context: Ctx
                             ) -> pb.ContainerStatsResponse:
        if not request.container_id:
            raise InvalidArgument("container_id is required")
        c = self.containers.get(request.container_id)
        [stats] = await self.stats_collector.container_stats([c])
        return pb.ContainerStatsResponse(stats=container_stats_pb(stats))

    @unary
    async def ListContainerStats(self, request: pb.ListContainerStatsRequest, context: Ctx
                                 ) -> pb.ListContainerStatsResponse:
        flt = _container_filter(request.filter if request.HasField("filter") else None)
        return pb.ListContainerStatsResponse(stats=await self._container_stats(flt))

    @stream
    async def StreamContainerStats(self, request: pb.StreamContainerStatsRequest, context: Ctx
                                   ) -> AsyncIterator[pb.StreamContainerStatsResponse]:
        flt = _container_filter(request.filter if request.HasField("filter") else None)
        for batch in _batches(await self._container_stats(flt)):
            yield pb.StreamContainerStatsResponse(container_stats=batch)

    @unary
    async def PodSandboxStats(self, request: pb.PodSandboxStatsRequest, context: Ctx
                              ) -> pb.PodSandboxStatsResponse:
        if not request.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id is required")
        sb = self.sandboxes.get(request.pod_sandbox_id)
        [stats] = await self._pod_stats([sb])
        return pb.PodSandboxStatsResponse(stats=pod_stats_pb(stats))

    @unary
    async def ListPodSandboxStats(self, request: pb.ListPodSandboxStatsRequest, context: Ctx
                                  ) -> pb.ListPodSandboxStatsResponse:
        flt = _sandbox_filter(request.filter if request.HasField("filter") else None)
        stats = await self._pod_stats(self.sandboxes.select(flt))
        return pb.ListPodSandboxStatsResponse(stats=[pod_stats_pb(s) for s in stats])

    @stream
    async def StreamPodSandboxStats(self, request: pb.StreamPodSandboxStatsRequest, context: Ctx
                                    ) -> AsyncIterator[pb.StreamPodSandboxStatsResponse]:
        flt = _sandbox_filter(request.filter if request.HasField("filter") else None)
        stats = [pod_stats_pb(s) for s in await self._pod_stats(self.sandboxes.select(flt))]
        for batch in _batches(stats):
            yield pb.StreamPodSandboxStatsResponse(pod_sandbox_stats=batch)

    @unary
    async def ListMetricDescriptors(self, request: pb.ListMetricDescriptorsRequest, context: Ctx
                                    ) -> pb.ListMetricDescriptorsResponse:
        return pb.ListMetricDescriptorsResponse(descriptors=[
            pb.MetricDescriptor(name=d.name, help=d.help, label_keys=list(d.label_keys))
            for d in cadvisor.descriptors(self.pod_metric_groups)
        ])

    async def _pod_metrics(self) -> list[pb.PodSandboxMetrics]:
        stats = await self._pod_stats(self.sandboxes.select())
        return [pod_metrics_pb(m) for m in cadvisor.pod_metrics(stats, self.pod_metric_groups)]

    @unary
    async def ListPodSandboxMetrics(self, request: pb.ListPodSandboxMetricsRequest, context: Ctx
                                    ) -> pb.ListPodSandboxMetricsResponse:
        return pb.ListPodSandboxMetricsResponse(pod_metrics=await self._pod_metrics())

    @stream
    async def StreamPodSandboxMetrics(self, request: pb.StreamPodSandboxMetricsRequest,
                                      context: Ctx
                                      ) -> AsyncIterator[pb.StreamPodSandboxMetricsResponse]:
        for batch in _batches(await self._pod_metrics()):
            yield pb.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=batch)

    @stream
    async def GetContainerEvents(self, request: pb.GetEventsRequest, context: Ctx
                                 ) -> AsyncIterator[pb.ContainerEventResponse]:
        sub = self.events.subscribe()
        try:
            async for event in sub:
                yield event_pb(event)
        except EventsLost as e:
            raise ResourceExhausted(
                f"GetContainerEvents: {e.count} events were dropped because this client "
                "read too slowly; list the containers again and reopen the stream"
            ) from e
        finally:
            sub.close()

    @unary
    async def UpdatePodSandboxResources(self, request: pb.UpdatePodSandboxResourcesRequest,
                                        context: Ctx) -> pb.UpdatePodSandboxResourcesResponse:
        if not request.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id is required")
        sb = self.sandboxes.get(request.pod_sandbox_id)
        res = pod_resources(request)
        if res is not None:
            await self.sandboxes.apply_resources(sb, res)
        return pb.UpdatePodSandboxResourcesResponse()

    @unary
    async def CheckpointContainer(self, request: pb.CheckpointContainerRequest, context: Ctx
                                  ) -> pb.CheckpointContainerResponse:
        if not request.container_id:
            raise InvalidArgument("container_id is required")
        if request.timeout < 0:
            raise InvalidArgument("timeout must not be negative")
        c = self.containers.get(request.container_id)
        if c.state != ContainerState.RUNNING:
            raise FailedPrecondition(
                f"container {c.id} is {c.state.value}: only a running container can be "
                "checkpointed"
            )
        await checkpoint(self.containers.runtimes[c.runtime_handler], CheckpointRequest(
            container_id=c.id, name=c.spec.name, sandbox_id=c.sandbox_id, image=c.image.name,
            image_ref=c.image.ref, created_at=c.created_at, labels=dict(c.spec.labels),
            annotations=dict(c.spec.annotations), bundle=self.containers.state_dir(c),
            upper=self.containers.storage.rootfs(c.id).upper, location=request.location,
            timeout=float(request.timeout),
        ))
        return pb.CheckpointContainerResponse()
