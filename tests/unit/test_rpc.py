"""RPCs a servicer lacks answer UNIMPLEMENTED naming themselves."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.errors import NotFound
from moorage.server.rpc import fill_unimplemented, unary


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code: Any = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


class _Partial(pb_grpc.RuntimeServiceServicer):
    @unary
    async def Version(self, request: pb.VersionRequest, context: Any) -> pb.VersionResponse:
        raise NotFound("version 'x' not found")


fill_unimplemented(_Partial, pb.DESCRIPTOR.services_by_name["RuntimeService"])


async def test_missing_rpc_names_itself() -> None:
    ctx = _Context()
    with pytest.raises(_Aborted):
        await _Partial().RunPodSandbox(pb.RunPodSandboxRequest(), ctx)
    assert ctx.code == grpc.StatusCode.UNIMPLEMENTED
    assert ctx.details == "RuntimeService.RunPodSandbox is not implemented by moorage yet"


async def test_domain_errors_map_to_their_code() -> None:
    ctx = _Context()
    with pytest.raises(_Aborted):
        await _Partial().Version(pb.VersionRequest(), ctx)
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "version 'x'" in ctx.details
