"""The committed CRI stubs are exactly what scripts/gen-proto.sh makes from proto/."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_SHA256 = "6d130c2651d335bfc755d25efc63072a1cd1eba3591ead6422dc0a27f20167f3"


def test_proto_is_upstream_v0_36_3() -> None:
    data = (ROOT / "proto/moorage/cri/v1/api.proto").read_bytes()
    assert hashlib.sha256(data).hexdigest() == UPSTREAM_SHA256
    assert (ROOT / "proto/LICENSE").read_text().startswith("\n") or "Apache License" in (
        ROOT / "proto/LICENSE"
    ).read_text()


def test_stubs_are_current(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts/gen-proto.sh"), str(tmp_path)], check=True, env=env)
    generated = tmp_path / "moorage/cri/v1"
    committed = ROOT / "src/moorage/cri/v1"
    names = ["api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"]
    for name in names:
        assert (generated / name).read_bytes() == (committed / name).read_bytes(), (
            f"src/moorage/cri/v1/{name} is stale: run scripts/gen-proto.sh"
        )


def test_every_rpc_is_served() -> None:
    from moorage.cri.v1 import api_pb2 as pb
    from moorage.server.image import ImageService
    from moorage.server.runtime import RuntimeService

    for cls, name in ((RuntimeService, "RuntimeService"), (ImageService, "ImageService")):
        service = pb.DESCRIPTOR.services_by_name[name]
        for method in service.methods:
            handler = getattr(cls, method.name)
            assert not handler.__module__.endswith("_pb2_grpc"), f"{name}.{method.name}"
