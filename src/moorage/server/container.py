"""RuntimeService container RPCs: translation between CRI messages and the container manager."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from moorage.container.manager import ContainerFilter, ContainerManager, get_in, select_in
from moorage.container.model import (
    Container,
    ContainerResources,
    ContainerSpec,
    Device,
    Mount,
    Propagation,
    SecurityContext,
    SecurityProfile,
    State,
)
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import InvalidArgument
from moorage.server import wire
from moorage.server.msgcache import Answers
from moorage.server.rpc import Ctx, read, read_stream, unary
from moorage.server.sandbox import (
    ids_from_proto,
    ids_to_proto,
    resources_from_proto,
    userns_from_proto,
)

STREAM_BATCH = 100
#: ExecSync output cap per stream, as CRI-O.
EXEC_OUTPUT_MAX = 16 * 1024 * 1024

_PROPAGATION: dict[int, Propagation] = {
    pb.PROPAGATION_PRIVATE: "private",
    pb.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    pb.PROPAGATION_BIDIRECTIONAL: "rshared",
}
_STATES = {
    State.CREATED: pb.CONTAINER_CREATED,
    State.RUNNING: pb.CONTAINER_RUNNING,
    State.EXITED: pb.CONTAINER_EXITED,
    State.UNKNOWN: pb.CONTAINER_UNKNOWN,
}
_FROM_STATE = {v: k for k, v in _STATES.items()}
_PROFILE_KINDS: dict[int, Any] = {
    pb.SecurityProfile.RuntimeDefault: "RuntimeDefault",
    pb.SecurityProfile.Unconfined: "Unconfined",
    pb.SecurityProfile.Localhost: "Localhost",
}


def _profile(sec: pb.LinuxContainerSecurityContext, name: str, legacy_name: str
             ) -> SecurityProfile:
    """The ``seccomp`` / ``apparmor`` SecurityProfile, else the deprecated string field
    (``runtime/default``, ``unconfined``, ``localhost/<ref>``); neither: kind ``""``."""
    field = f"config.linux.security_context.{name}"
    if sec.HasField(name):  # RuntimeDefault is 0: a set message may have no bytes
        p = getattr(sec, name)
        if p.profile_type not in _PROFILE_KINDS:
            raise InvalidArgument(f"{field}.profile_type: unknown value {p.profile_type}")
        return SecurityProfile(kind=_PROFILE_KINDS[p.profile_type], localhost_ref=p.localhost_ref)
    legacy = getattr(sec, legacy_name)
    if not legacy:
        return SecurityProfile()
    if legacy in ("runtime/default", "docker/default"):
        return SecurityProfile(kind="RuntimeDefault")
    if legacy == "unconfined":
        return SecurityProfile(kind="Unconfined")
    if legacy.startswith("localhost/"):
        return SecurityProfile(kind="Localhost", localhost_ref=legacy.removeprefix("localhost/"))
    if name == "apparmor":  # CRI-O: a bare name is the name of a loaded profile
        return SecurityProfile(kind="Localhost", localhost_ref=legacy)
    raise InvalidArgument(f"config.linux.security_context.{legacy_name}: unknown profile "
                          f"{legacy!r} (runtime/default, unconfined or localhost/<path>)")


def container_resources(r: pb.LinuxContainerResources) -> ContainerResources:
    return ContainerResources(cgroup=resources_from_proto(r), oom_score_adj=r.oom_score_adj)


def spec_from_proto(c: pb.ContainerConfig) -> ContainerSpec:
    sec = c.linux.security_context
    ns = sec.namespace_options
    mounts = []
    for i, m in enumerate(c.mounts):
        if not m.container_path:
            raise InvalidArgument(f"config.mounts[{i}].container_path is required")
        if m.propagation not in _PROPAGATION:
            raise InvalidArgument(f"config.mounts[{i}].propagation: unknown value")
        image = m.image.image.strip() if m.HasField("image") else ""
        if image and m.host_path:
            raise InvalidArgument(
                f"config.mounts[{i}]: both host_path ({m.host_path!r}) and image "
                f"({image!r}) are set; an image volume has no host path")
        if m.image_sub_path and not image:
            raise InvalidArgument(
                f"config.mounts[{i}].image_sub_path: set without config.mounts[{i}].image")
        if image and not m.readonly:
            # The CRI: image mounts are read-only by definition (kubelet sends true);
            # critest expects a runtime to refuse a read-write one.
            raise InvalidArgument(
                f"config.mounts[{i}].readonly: an image volume ({image!r}) is read-only; "
                "readonly must be true")
        mounts.append(Mount(container_path=m.container_path, host_path=m.host_path,
                            readonly=m.readonly, propagation=_PROPAGATION[m.propagation],
                            recursive_read_only=m.recursive_read_only,
                            selinux_relabel=m.selinux_relabel,
                            uid_mappings=ids_from_proto(m.uidMappings),
                            gid_mappings=ids_from_proto(m.gidMappings),
                            image=image, image_sub_path=m.image_sub_path))
    security = SecurityContext(
        privileged=sec.privileged,
        run_as_user=sec.run_as_user.value if sec.HasField("run_as_user") else None,
        run_as_group=sec.run_as_group.value if sec.HasField("run_as_group") else None,
        run_as_username=sec.run_as_username, readonly_rootfs=sec.readonly_rootfs,
        supplemental_groups=tuple(sec.supplemental_groups),
        supplemental_groups_policy="strict" if sec.supplemental_groups_policy == 1 else "merge",
        cap_add=tuple(sec.capabilities.add_capabilities),
        cap_drop=tuple(sec.capabilities.drop_capabilities),
        cap_add_ambient=tuple(sec.capabilities.add_ambient_capabilities),
        no_new_privs=sec.no_new_privs,
        masked_paths=tuple(sec.masked_paths) if sec.masked_paths else None,
        readonly_paths=tuple(sec.readonly_paths) if sec.readonly_paths else None,
        seccomp=_profile(sec, "seccomp", "seccomp_profile_path"),
        apparmor=_profile(sec, "apparmor", "apparmor_profile"),
        selinux_options=(
            (sec.selinux_options.user, sec.selinux_options.role, sec.selinux_options.type,
             sec.selinux_options.level) if sec.HasField("selinux_options") else ()),
        pid_mode=ns.pid, target_id=ns.target_id,
    )
    return ContainerSpec(
        name=c.metadata.name, attempt=c.metadata.attempt, image=c.image.image.strip(),
        command=tuple(c.command), args=tuple(c.args), working_dir=c.working_dir,
        env=tuple((kv.key, bytes(kv.value)) for kv in c.envs),
        mounts=tuple(mounts),
        devices=tuple(Device(d.container_path, d.host_path, d.permissions or "rwm")
                      for d in c.devices),
        labels=dict(c.labels), annotations=dict(c.annotations), log_path=c.log_path,
        stdin=c.stdin, stdin_once=c.stdin_once, tty=c.tty,
        resources=container_resources(c.linux.resources),
        security=security,
        stop_signal=_signal_name(c.stop_signal),
        userns=userns_from_proto(
            ns, "config.linux.security_context.namespace_options.userns_options"),
        cdi_devices=tuple(d.name for d in c.CDI_devices),
    )


def _metadata(c: Container) -> pb.ContainerMetadata:
    return pb.ContainerMetadata(name=c.spec.name, attempt=c.spec.attempt)


def to_container(c: Container) -> pb.Container:
    return pb.Container(
        id=c.id, pod_sandbox_id=c.sandbox_id, metadata=_metadata(c),
        image=pb.ImageSpec(image=c.image.name), image_ref=c.image.ref,
        state=_STATES[c.state], created_at=c.created_at,
        labels=c.spec.labels, annotations=c.spec.annotations, image_id=c.image.id,
    )


def _mounts(c: Container) -> list[pb.Mount]:
    """The CRI mounts as asked; an image volume as CRI-O reports one: the host path
    mounted into the container, read-only, private, and the image by its id (kubelet's
    image garbage collection reads it to keep the image), also as ``image_ref``
    (KEP-5365)."""
    reverse = {v: k for k, v in _PROPAGATION.items()}
    volumes = {v.index: v for v in c.image_volumes}
    out = []
    for i, m in enumerate(c.spec.mounts):
        mount = pb.Mount(container_path=m.container_path, host_path=m.host_path,
                         readonly=m.readonly,
                         propagation=reverse[m.propagation],  # type: ignore[arg-type]
                         recursive_read_only=m.recursive_read_only,
                         selinux_relabel=m.selinux_relabel,
                         uidMappings=ids_to_proto(m.uid_mappings),
                         gidMappings=ids_to_proto(m.gid_mappings))
        volume = volumes.get(i)
        if volume is not None:
            mount.host_path = volume.source
            mount.readonly = True
            mount.propagation = pb.PROPAGATION_PRIVATE
            mount.image.image = volume.image_id
            mount.image.image_ref = volume.image_id  # KEP-5365: as the container's image_ref
            mount.image_sub_path = m.image_sub_path
        out.append(mount)
    return out


def _resources(res: ContainerResources) -> pb.ContainerResources:
    r = res.cgroup
    return pb.ContainerResources(linux=pb.LinuxContainerResources(
        cpu_period=r.cpu_period, cpu_quota=r.cpu_quota, cpu_shares=r.cpu_shares,
        memory_limit_in_bytes=r.memory_limit, oom_score_adj=res.oom_score_adj,
        cpuset_cpus=r.cpuset_cpus, cpuset_mems=r.cpuset_mems,
        hugepage_limits=[pb.HugepageLimit(page_size=k, limit=v)
                         for k, v in r.hugepage_limits.items()],
        unified=dict(r.unified), memory_swap_limit_in_bytes=r.memory_swap_limit,
    ))


def to_status(c: Container) -> pb.ContainerStatus:
    exited = c.state == State.EXITED
    user = pb.ContainerUser()
    if c.user:
        user.linux.CopyFrom(pb.LinuxContainerUser(
            uid=c.user.get("uid", 0), gid=c.user.get("gid", 0),
            supplemental_groups=c.user.get("additional_gids", [])))
    return pb.ContainerStatus(
        id=c.id, metadata=_metadata(c), state=_STATES[c.state],
        created_at=c.created_at, started_at=c.started_at,
        finished_at=c.finished_at if exited else 0,
        exit_code=c.exit_code if exited else 0,
        image=pb.ImageSpec(image=c.image.name), image_ref=c.image.ref, image_id=c.image.id,
        reason=c.reason if exited else "", message=c.message if exited else "",
        labels=c.spec.labels, annotations=c.spec.annotations, mounts=_mounts(c),
        log_path=c.log_path, resources=_resources(c.resources), user=user,
        stop_signal=_signal_enum(c.spec.stop_signal),  # type: ignore[arg-type]
    )


def _signal_name(value: int) -> str:
    """The name of a ContainerConfig.stop_signal (``""`` when unset)."""
    if not value:
        return ""
    try:
        return str(pb.Signal.Name(value))
    except ValueError as e:
        raise InvalidArgument(f"config.stop_signal: unknown signal value {value}") from e


def _signal_enum(name: str) -> int:
    try:
        return int(pb.Signal.Value(name)) if name else 0
    except ValueError:
        return 0


def _filter(f: pb.ContainerFilter | None) -> ContainerFilter | None:
    if f is None:
        return None
    state = _FROM_STATE.get(f.state.state) if f.HasField("state") else None
    flt = ContainerFilter(id=f.id, state=state, sandbox_id=f.pod_sandbox_id,
                          labels=dict(f.label_selector))
    # An empty filter (kubelet's relist sends one) selects everything.
    return None if flt == _NO_FILTER else flt


_NO_FILTER = ContainerFilter()


def exec_cmd(cmd: Sequence[str]) -> list[str]:
    """The ``cmd`` of an Exec or ExecSync: a non-empty argv without NUL characters."""
    if not cmd:
        raise InvalidArgument("cmd is required")
    for i, arg in enumerate(cmd):
        if "\0" in arg:
            raise InvalidArgument(f"cmd[{i}] contains a NUL character")
    return list(cmd)


def _required(value: str, field: str = "container_id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


class ContainerRpcs:
    containers: ContainerManager

    @functools.cached_property
    def _container_answers(self) -> Answers[Container]:
        return Answers(to_container)

    @functools.cached_property
    def _status_answers(self) -> Answers[Container]:
        return Answers(to_status)

    @unary
    async def CreateContainer(self, request: pb.CreateContainerRequest, context: Ctx
                              ) -> pb.CreateContainerResponse:
        _required(request.pod_sandbox_id, "pod_sandbox_id")
        if not request.HasField("config"):
            raise InvalidArgument("config is required")
        c = await self.containers.create(request.pod_sandbox_id, spec_from_proto(request.config))
        return pb.CreateContainerResponse(container_id=c.id)

    @unary
    async def StartContainer(self, request: pb.StartContainerRequest, context: Ctx
                             ) -> pb.StartContainerResponse:
        await self.containers.start(_required(request.container_id))
        return pb.StartContainerResponse()

    @unary
    async def StopContainer(self, request: pb.StopContainerRequest, context: Ctx
                            ) -> pb.StopContainerResponse:
        if request.timeout < 0:
            raise InvalidArgument("timeout must not be negative")
        await self.containers.stop(_required(request.container_id), int(request.timeout))
        return pb.StopContainerResponse()

    @unary
    async def RemoveContainer(self, request: pb.RemoveContainerRequest, context: Ctx
                              ) -> pb.RemoveContainerResponse:
        await self.containers.remove(_required(request.container_id))
        return pb.RemoveContainerResponse()

    @read
    async def ListContainers(self, request: pb.ListContainersRequest, context: Ctx) -> bytes:
        flt = _filter(request.filter if request.HasField("filter") else None)
        items = self.containers.published()
        if flt is None:  # kubelet's relist: the same answer while nothing changed
            return self._container_answers.listing(items, 1, select_in)
        return self._container_answers.repeated(1, select_in(items, flt))

    @read_stream
    async def StreamContainers(self, request: pb.StreamContainersRequest, context: Ctx
                               ) -> AsyncIterator[bytes]:
        flt = _filter(request.filter if request.HasField("filter") else None)
        selected = select_in(self.containers.published(), flt)
        for start in range(0, len(selected), STREAM_BATCH):
            yield self._container_answers.repeated(1, selected[start:start + STREAM_BATCH])

    @read
    async def ContainerStatus(self, request: pb.ContainerStatusRequest, context: Ctx) -> bytes:
        c = get_in(self.containers.published(), _required(request.container_id))
        answer = wire.embed(1, self._status_answers.get(c))
        if request.verbose:
            info = json.dumps(await asyncio.to_thread(self._verbose, c))
            answer += pb.ContainerStatusResponse(info={"info": info}).SerializeToString()
        return answer

    def _verbose(self, c: Container) -> dict[str, Any]:
        spec = None
        try:
            with open(self.containers.state_dir(c) / "config.json", "rb") as f:
                spec = json.load(f)
        except (OSError, ValueError):
            pass
        return {"pid": c.pid, "monitorPid": c.monitor_pid, "sandboxID": c.sandbox_id,
                "runtimeHandler": c.runtime_handler, "bundle": c.bundle,
                "runtimeSpec": spec, "user": c.user}

    @unary
    async def UpdateContainerResources(self, request: pb.UpdateContainerResourcesRequest,
                                       context: Ctx) -> pb.UpdateContainerResourcesResponse:
        if not request.HasField("linux"):
            raise InvalidArgument("linux resources are required")
        await self.containers.update_resources(_required(request.container_id),
                                               container_resources(request.linux))
        return pb.UpdateContainerResourcesResponse()

    @unary
    async def ReopenContainerLog(self, request: pb.ReopenContainerLogRequest, context: Ctx
                                 ) -> pb.ReopenContainerLogResponse:
        await self.containers.reopen_log(_required(request.container_id))
        return pb.ReopenContainerLogResponse()

    @unary
    async def ExecSync(self, request: pb.ExecSyncRequest, context: Ctx) -> pb.ExecSyncResponse:
        if request.timeout < 0:
            raise InvalidArgument("timeout must not be negative")
        result = await self.containers.exec_sync(_required(request.container_id),
                                                 exec_cmd(request.cmd), float(request.timeout))
        return pb.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr,
                                   exit_code=result.exit_code)
