"""runtime.v1.RuntimeService: runtime RPCs here, pod sandbox RPCs from ``server.sandbox``.

Every RPC not defined here answers UNIMPLEMENTED with its name.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any

from moorage import CRI_API_VERSION, __version__
from moorage.container.manager import ContainerManager
from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.errors import InvalidArgument
from moorage.events import ContainerEvent, EventBroadcaster
from moorage.sandbox.manager import SandboxManager
from moorage.server.container import ContainerRpcs
from moorage.server.rpc import Ctx, fill_unimplemented, read, unary
from moorage.server.sandbox import SandboxRpcs
from moorage.server.stats import StatsRpcs
from moorage.server.streaming import StreamingRpcs
from moorage.streaming import StreamingServer

RUNTIME_NAME = "moorage"
#: The kubelet-facing API version field of VersionResponse, fixed by the CRI.
KUBE_API_VERSION = "0.1.0"


_VERSION = pb.VersionResponse(
    version=KUBE_API_VERSION,
    runtime_name=RUNTIME_NAME,
    runtime_version=__version__,
    runtime_api_version=CRI_API_VERSION,
).SerializeToString()


class RuntimeService(StatsRpcs, SandboxRpcs, ContainerRpcs, StreamingRpcs,
                     pb_grpc.RuntimeServiceServicer):
    def __init__(
        self,
        cgroup_manager: str,
        info: Callable[[], dict[str, Any]],
        sandboxes: SandboxManager,
        containers: ContainerManager,
        handlers: list[str],
        events: EventBroadcaster[ContainerEvent],
        streaming: StreamingServer,
    ) -> None:
        self.streaming = streaming
        self.containers = containers
        self.events = events
        self.cgroup_manager = cgroup_manager
        self.info = info
        self.sandboxes = sandboxes
        self.handlers = handlers

    @read
    async def Version(self, request: pb.VersionRequest, context: Ctx) -> bytes:
        return _VERSION

    @read
    async def RuntimeConfig(self, request: pb.RuntimeConfigRequest, context: Ctx) -> bytes:
        driver = pb.SYSTEMD if self.cgroup_manager == "systemd" else pb.CGROUPFS
        return pb.RuntimeConfigResponse(
            linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver)).SerializeToString()

    @unary
    async def Status(self, request: pb.StatusRequest, context: Ctx) -> pb.StatusResponse:
        ready, reason, message = self.sandboxes.cni.status()
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(type="NetworkReady", status=ready, reason=reason,
                                message=message),
        ]
        info = {}
        if request.verbose:
            info = {key: json.dumps(value) for key, value in self.info().items()}
        # The default handler is listed under the empty name too, as kubelet looks it up so.
        # Each feature is what was probed, never assumed: user_namespaces, the node
        # (kernel, idmapped overlays, probed once at start) and the handler's runtime;
        # recursive_read_only_mounts, the kernel's mount_setattr and the runtime's "rro"
        # (the runtimes' ``features``, asked at start and on SIGHUP).
        default = self.sandboxes.default_handler
        handlers = [
            pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures(
                recursive_read_only_mounts=await self.containers.rro_supported(name or default),
                user_namespaces=await self.sandboxes.userns_supported(name or default)))
            for name in ["", *self.handlers]]
        # supplemental_groups_policy: Strict is applied and ContainerStatus reports the
        # process's user (uid, gid, supplementary groups).
        return pb.StatusResponse(status=pb.RuntimeStatus(conditions=conditions), info=info,
                                 runtime_handlers=handlers,
                                 features=pb.RuntimeFeatures(supplemental_groups_policy=True))

    @unary
    async def UpdateRuntimeConfig(self, request: pb.UpdateRuntimeConfigRequest, context: Ctx
                                  ) -> pb.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr:
            try:
                ipaddress.ip_network(cidr.split(",")[0].strip(), strict=False)
            except ValueError as e:
                raise InvalidArgument(
                    f"runtime_config.network_config.pod_cidr: {cidr!r} is not a CIDR") from e
        self.sandboxes.cni.set_pod_cidr(cidr)
        return pb.UpdateRuntimeConfigResponse()


fill_unimplemented(RuntimeService, pb.DESCRIPTOR.services_by_name["RuntimeService"])
