"""RuntimeService pod sandbox RPCs: translation between CRI messages and the sandbox manager."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import InvalidArgument
from moorage.network import Bandwidth, PortMapping
from moorage.sandbox.cgroups import Resources
from moorage.sandbox.files import DnsConfig
from moorage.sandbox.manager import SandboxFilter, SandboxManager, get_in, select_in
from moorage.sandbox.model import Mode, Sandbox, SandboxSpec, State, UserNamespace
from moorage.sandbox.userns import FIELD
from moorage.server import wire
from moorage.server.msgcache import Answers
from moorage.server.rpc import Ctx, read, read_stream, unary
from moorage.util import codec
from moorage.util.idmap import IdMapping
from moorage.util.quantity import parse_quantity

_PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}
#: CNI bandwidth burst when only a rate is given (what containerd and CRI-O pass).
_DEFAULT_BURST = 2**31 - 1
INGRESS_ANNOTATION = "kubernetes.io/ingress-bandwidth"
EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"
STREAM_BATCH = 100


def resources_from_proto(r: pb.LinuxContainerResources) -> Resources:
    return Resources(
        cpu_period=r.cpu_period, cpu_quota=r.cpu_quota, cpu_shares=r.cpu_shares,
        memory_limit=r.memory_limit_in_bytes, memory_swap_limit=r.memory_swap_limit_in_bytes,
        cpuset_cpus=r.cpuset_cpus, cpuset_mems=r.cpuset_mems,
        hugepage_limits={h.page_size: h.limit for h in r.hugepage_limits},
        unified=dict(r.unified),
    )


def _bandwidth(annotations: dict[str, str]) -> Bandwidth | None:
    rates = {}
    for key in (INGRESS_ANNOTATION, EGRESS_ANNOTATION):
        if key in annotations:
            try:
                rates[key] = parse_quantity(annotations[key])
            except ValueError as e:
                raise InvalidArgument(f"config.annotations[{key!r}]: {e}") from e
            if rates[key] <= 0:
                raise InvalidArgument(f"config.annotations[{key!r}] must be positive")
    if not rates:
        return None
    ingress, egress = rates.get(INGRESS_ANNOTATION, 0), rates.get(EGRESS_ANNOTATION, 0)
    return Bandwidth(ingress_rate=ingress, ingress_burst=_DEFAULT_BURST if ingress else 0,
                     egress_rate=egress, egress_burst=_DEFAULT_BURST if egress else 0)


def _mode(value: int, name: str) -> Mode:
    try:
        return Mode(value)
    except ValueError as e:
        raise InvalidArgument(f"config.linux.security_context.namespace_options.{name}: "
                              f"unknown namespace mode {value}") from e


def ids_from_proto(mappings: Iterable[pb.IDMapping]) -> tuple[IdMapping, ...]:
    return tuple(IdMapping(m.container_id, m.host_id, m.length) for m in mappings)


def ids_to_proto(mappings: Iterable[IdMapping]) -> list[pb.IDMapping]:
    return [pb.IDMapping(host_id=m.host_id, container_id=m.container_id, length=m.length)
            for m in mappings]


def userns_from_proto(ns: pb.NamespaceOption, field: str) -> UserNamespace | None:
    """``userns_options`` (None when absent: the caller decides what that means); ``field``
    names it in errors."""
    if not ns.HasField("userns_options"):
        return None
    u = ns.userns_options
    try:
        mode = Mode(u.mode)
    except ValueError:
        raise InvalidArgument(f"{field}.mode: unknown namespace mode {u.mode}") from None
    return UserNamespace(
        mode=mode,
        uids=ids_from_proto(u.uids), gids=ids_from_proto(u.gids),
    )


def userns_to_proto(userns: UserNamespace) -> pb.UserNamespace:
    return pb.UserNamespace(mode=int(userns.mode),  # type: ignore[arg-type]
                            uids=ids_to_proto(userns.uids), gids=ids_to_proto(userns.gids))


def spec_from_proto(request: pb.RunPodSandboxRequest) -> SandboxSpec:
    if not request.HasField("config"):
        raise InvalidArgument("config is required")
    c = request.config
    if not c.HasField("metadata"):
        raise InvalidArgument("config.metadata is required")
    linux = c.linux
    sec = linux.security_context
    ns = sec.namespace_options
    annotations = dict(c.annotations)
    mappings = []
    for pm in c.port_mappings:
        if pm.protocol not in _PROTOCOLS:
            raise InvalidArgument(f"config.port_mappings: unknown protocol {pm.protocol}")
        mappings.append(PortMapping(host_port=pm.host_port, container_port=pm.container_port,
                                    protocol=_PROTOCOLS[pm.protocol], host_ip=pm.host_ip))
    return SandboxSpec(
        name=c.metadata.name, namespace=c.metadata.namespace, uid=c.metadata.uid,
        attempt=c.metadata.attempt, hostname=c.hostname, log_directory=c.log_directory,
        runtime_handler=request.runtime_handler,
        dns=DnsConfig(tuple(c.dns_config.servers), tuple(c.dns_config.searches),
                      tuple(c.dns_config.options)),
        port_mappings=tuple(mappings), labels=dict(c.labels), annotations=annotations,
        cgroup_parent=linux.cgroup_parent, network=_mode(ns.network, "network"),
        pid=_mode(ns.pid, "pid"), ipc=_mode(ns.ipc, "ipc"), sysctls=dict(linux.sysctls),
        resources=resources_from_proto(linux.resources) if linux.HasField("resources") else None,
        bandwidth=_bandwidth(annotations), privileged=sec.privileged,
        # No options: the host's user namespace (what crictl and older kubelets mean).
        userns=userns_from_proto(ns, FIELD) or UserNamespace(),
    )


def _metadata(sb: Sandbox) -> pb.PodSandboxMetadata:
    s = sb.spec
    return pb.PodSandboxMetadata(name=s.name, uid=s.uid, namespace=s.namespace, attempt=s.attempt)


def _state(sb: Sandbox) -> int:
    return int(pb.SANDBOX_READY if sb.state == State.READY else pb.SANDBOX_NOTREADY)


def to_pod_sandbox(sb: Sandbox) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=sb.id, metadata=_metadata(sb), state=_state(sb),  # type: ignore[arg-type]
        created_at=sb.created_at, labels=sb.spec.labels, annotations=sb.spec.annotations,
        runtime_handler=sb.runtime_handler,
    )


def to_status(sb: Sandbox) -> pb.PodSandboxStatus:
    s = sb.spec
    ips = sb.ips if sb.state == State.READY else []
    return pb.PodSandboxStatus(
        id=sb.id, metadata=_metadata(sb), state=_state(sb),  # type: ignore[arg-type]
        created_at=sb.created_at,
        network=pb.PodSandboxNetworkStatus(
            ip=ips[0] if ips else "",
            additional_ips=[pb.PodIP(ip=ip) for ip in ips[1:]],
        ),
        linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=pb.NamespaceOption(
            network=int(s.network), pid=int(s.pid), ipc=int(s.ipc),  # type: ignore[arg-type]
            userns_options=userns_to_proto(s.userns),
        ))),
        labels=s.labels, annotations=s.annotations, runtime_handler=sb.runtime_handler,
    )


def _filter(flt: pb.PodSandboxFilter | None) -> SandboxFilter | None:
    if flt is None:
        return None
    state = None
    if flt.HasField("state"):
        state = State.READY if flt.state.state == pb.SANDBOX_READY else State.NOTREADY
    out = SandboxFilter(id=flt.id, state=state, labels=dict(flt.label_selector))
    # An empty filter selects everything.
    return None if out == _NO_FILTER else out


_NO_FILTER = SandboxFilter()


class SandboxRpcs:
    sandboxes: SandboxManager

    @functools.cached_property
    def _sandbox_answers(self) -> Answers[Sandbox]:
        return Answers(to_pod_sandbox)

    @functools.cached_property
    def _sandbox_status_answers(self) -> Answers[Sandbox]:
        return Answers(to_status)

    def _verbose_info(self, sb: Sandbox) -> dict[str, str]:
        pinned = self.sandboxes.pinned(sb)
        info: dict[str, Any] = {
            "pid": sb.infra_pid or 0,
            "netnsPath": pinned.net or "",
            "namespaces": {"net": pinned.net, "ipc": pinned.ipc, "uts": pinned.uts,
                           "user": pinned.user},
            "cgroupPath": sb.cgroup_path,
            "runtimeHandler": sb.runtime_handler,
            "cniResult": (self.sandboxes.cni.cached(sb.id) or {}).get("result"),
            "config": codec.to_data(sb.spec),
        }
        return {"info": json.dumps(info)}

    @unary
    async def RunPodSandbox(self, request: pb.RunPodSandboxRequest, context: Ctx
                            ) -> pb.RunPodSandboxResponse:
        sb = await self.sandboxes.run(spec_from_proto(request))
        return pb.RunPodSandboxResponse(pod_sandbox_id=sb.id)

    @unary
    async def StopPodSandbox(self, request: pb.StopPodSandboxRequest, context: Ctx
                             ) -> pb.StopPodSandboxResponse:
        await self.sandboxes.stop(_required_id(request.pod_sandbox_id))
        return pb.StopPodSandboxResponse()

    @unary
    async def RemovePodSandbox(self, request: pb.RemovePodSandboxRequest, context: Ctx
                               ) -> pb.RemovePodSandboxResponse:
        await self.sandboxes.remove(_required_id(request.pod_sandbox_id))
        return pb.RemovePodSandboxResponse()

    @read
    async def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest, context: Ctx
                               ) -> bytes:
        sb = get_in(self.sandboxes.published(), request.pod_sandbox_id)
        answer = wire.embed(1, self._sandbox_status_answers.get(sb))
        if request.verbose:
            info = await asyncio.to_thread(self._verbose_info, sb)
            answer += pb.PodSandboxStatusResponse(info=info).SerializeToString()
        return answer

    @read
    async def ListPodSandbox(self, request: pb.ListPodSandboxRequest, context: Ctx) -> bytes:
        flt = _filter(request.filter if request.HasField("filter") else None)
        items = self.sandboxes.published()
        if flt is None:  # kubelet's relist: the same answer while nothing changed
            return self._sandbox_answers.listing(items, 1, select_in)
        return self._sandbox_answers.repeated(1, select_in(items, flt))

    @read_stream
    async def StreamPodSandboxes(self, request: pb.StreamPodSandboxesRequest, context: Ctx
                                 ) -> AsyncIterator[bytes]:
        flt = _filter(request.filter if request.HasField("filter") else None)
        selected = select_in(self.sandboxes.published(), flt)
        for start in range(0, len(selected), STREAM_BATCH):
            yield self._sandbox_answers.repeated(1, selected[start:start + STREAM_BATCH])


def _required_id(value: str) -> str:
    if not value:
        raise InvalidArgument("pod_sandbox_id is required")
    return value
