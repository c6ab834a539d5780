"""Bugs the RPC fuzzer (tests/fuzz) found, each pinned by the smallest request that hit it."""

from __future__ import annotations

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import InvalidArgument
from moorage.server.container import exec_cmd, spec_from_proto
from moorage.server.rpc import MAX_MESSAGE, bounded, unary
from moorage.server.sandbox import spec_from_proto as pod_spec
from tests.unit.test_rpc import _Aborted, _Context


class _Echo:
    @unary
    async def Version(self, request: pb.VersionRequest, context: object) -> pb.VersionResponse:
        raise InvalidArgument(f"config.hostname: {'x' * 1_000_000!r} is not a hostname")


async def test_a_huge_value_quoted_in_an_error_is_cut() -> None:
    # A 1 MiB hostname echoed in the status message overflowed the client's metadata
    # limit: kubelet saw RESOURCE_EXHAUSTED "Stream removed" instead of INVALID_ARGUMENT.
    ctx = _Context()
    with pytest.raises(_Aborted):
        await _Echo().Version(pb.VersionRequest(), ctx)  # type: ignore[arg-type]
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details.startswith("config.hostname: 'xxx")
    assert ctx.details.endswith("is not a hostname")
    assert len(ctx.details) < MAX_MESSAGE + 100
    assert bounded("short") == "short"


def test_unknown_stop_signal_is_invalid_argument() -> None:
    # Was INTERNAL: ValueError('Enum Signal has no name defined for value 66').
    with pytest.raises(InvalidArgument, match="config.stop_signal"):
        spec_from_proto(pb.ContainerConfig(stop_signal=66))  # type: ignore[arg-type]
    assert spec_from_proto(pb.ContainerConfig(stop_signal=pb.SIGUSR1)).stop_signal == "SIGUSR1"
    assert spec_from_proto(pb.ContainerConfig()).stop_signal == ""


def test_exec_cmd_with_nul_is_invalid_argument() -> None:
    # Was INTERNAL: ValueError('embedded null byte') from ExecSync cmd ["\0"].
    with pytest.raises(InvalidArgument, match=r"cmd\[1\] contains a NUL"):
        exec_cmd(["sh", "a\0b"])
    with pytest.raises(InvalidArgument, match="cmd is required"):
        exec_cmd([])
    assert exec_cmd(["true"]) == ["true"]


@pytest.mark.parametrize("field", ["network", "pid", "ipc"])
def test_unknown_namespace_mode_of_a_pod_is_invalid_argument(field: str) -> None:
    # Was INTERNAL: ValueError('4 is not a valid Mode').
    config = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="p", namespace="n",
                                                                uid="u"))
    setattr(config.linux.security_context.namespace_options, field, 4)
    with pytest.raises(InvalidArgument, match=f"namespace_options.{field}: unknown"):
        pod_spec(pb.RunPodSandboxRequest(config=config))
