"""RuntimeService Exec, Attach and PortForward: check the request, hand out a URL of the
streaming server (``moorage.streaming``), which does the rest when the client comes."""

from __future__ import annotations

from moorage.container.manager import ContainerManager
from moorage.container.model import Container, State
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.sandbox.model import State as SandboxState
from moorage.server.container import exec_cmd
from moorage.server.rpc import Ctx, unary
from moorage.streaming import AttachRequest, ExecRequest, PortForwardRequest, StreamingServer


def _streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")


class StreamingRpcs:
    streaming: StreamingServer
    containers: ContainerManager

    def _running(self, container_id: str) -> Container:
        if not container_id:
            raise InvalidArgument("container_id is required")
        c = self.containers.get(container_id)
        if c.state != State.RUNNING:
            raise FailedPrecondition(f"container {c.id} is {c.state.value}, not running")
        return c

    @unary
    async def Exec(self, request: pb.ExecRequest, context: Ctx) -> pb.ExecResponse:
        cmd = exec_cmd(request.cmd)
        _streams(request.tty, request.stdin, request.stdout, request.stderr)
        c = self._running(request.container_id)
        url = self.streaming.get_exec(ExecRequest(
            container_id=c.id, cmd=tuple(cmd), tty=request.tty, stdin=request.stdin,
            stdout=request.stdout, stderr=request.stderr))
        return pb.ExecResponse(url=url)

    @unary
    async def Attach(self, request: pb.AttachRequest, context: Ctx) -> pb.AttachResponse:
        _streams(request.tty, request.stdin, request.stdout, request.stderr)
        c = self._running(request.container_id)
        url = self.streaming.get_attach(AttachRequest(
            container_id=c.id, tty=request.tty, stdin=request.stdin, stdout=request.stdout,
            stderr=request.stderr))
        return pb.AttachResponse(url=url)

    @unary
    async def PortForward(self, request: pb.PortForwardRequest, context: Ctx
                          ) -> pb.PortForwardResponse:
        if not request.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id is required")
        for port in request.port:
            if not 0 < port < 65536:
                raise InvalidArgument(f"port: {port} is not a TCP port")
        sb = self.containers.sandboxes.get(request.pod_sandbox_id)
        if sb.state != SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sb.id} is not ready")
        url = self.streaming.get_port_forward(PortForwardRequest(
            sandbox_id=sb.id, ports=tuple(request.port)))
        return pb.PortForwardResponse(url=url)
