"""Answers assembled from kept serialized messages (server/wire.py) are exactly what
protobuf itself serializes."""

from __future__ import annotations

from moorage.cri.v1 import api_pb2 as pb
from moorage.server import wire


def test_repeated_and_embedded_fields_match_protobuf() -> None:
    # sizes around the varint boundaries of the length prefix
    items = [pb.Container(id="x" * n, labels={"k": "v" * n}) for n in (0, 1, 120, 200, 20000)]
    payloads = [i.SerializeToString() for i in items]
    assert wire.repeated(1, payloads) == pb.ListContainersResponse(
        containers=items).SerializeToString()
    status = pb.ContainerStatus(id="c", exit_code=3, reason="Error")
    assert wire.embed(1, status.SerializeToString()) == pb.ContainerStatusResponse(
        status=status).SerializeToString()
    assert wire.repeated(1, []) == b""
    assert [wire.varint(v) for v in (0, 1, 127, 128, 300, 2**35)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x80\x80\x80\x01"]
