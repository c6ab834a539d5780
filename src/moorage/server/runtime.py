"""runtime.v1.RuntimeService: what exists so far (Version, Status, RuntimeConfig).

Every RPC not defined here answers UNIMPLEMENTED with its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from moorage import CRI_API_VERSION, __version__
from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.server.rpc import Ctx, fill_unimplemented, unary

RUNTIME_NAME = "moorage"
#: The kubelet-facing API version field of VersionResponse, fixed by the CRI.
KUBE_API_VERSION = "0.1.0"


class RuntimeService(pb_grpc.RuntimeServiceServicer):
    def __init__(self, cgroup_manager: str, info: Callable[[], dict[str, Any]]) -> None:
        self.cgroup_manager = cgroup_manager
        self.info = info

    @unary
    async def Version(self, request: pb.VersionRequest, context: Ctx) -> pb.VersionResponse:
        return pb.VersionResponse(
            version=KUBE_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=CRI_API_VERSION,
        )

    @unary
    async def Status(self, request: pb.StatusRequest, context: Ctx) -> pb.StatusResponse:
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(
                type="NetworkReady",
                status=False,
                reason="NetworkPluginNotReady",
                message="moorage: pod networking (CNI) is not available in this version",
            ),
        ]
        info = {}
        if request.verbose:
            info = {key: json.dumps(value) for key, value in self.info().items()}
        return pb.StatusResponse(status=pb.RuntimeStatus(conditions=conditions), info=info)

    @unary
    async def RuntimeConfig(self, request: pb.RuntimeConfigRequest, context: Ctx
                            ) -> pb.RuntimeConfigResponse:
        driver = pb.SYSTEMD if self.cgroup_manager == "systemd" else pb.CGROUPFS
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))


fill_unimplemented(RuntimeService, pb.DESCRIPTOR.services_by_name["RuntimeService"])
