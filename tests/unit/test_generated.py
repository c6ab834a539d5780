"""The committed CRI stubs are exactly what scripts/gen-proto.sh makes from proto/ with the
locked grpcio-tools; the lock's daemon part is the lock's own pins."""

import hashlib
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_SHA256 = "6d130c2651d335bfc755d25efc63072a1cd1eba3591ead6422dc0a27f20167f3"


def test_proto_is_upstream_v0_36_3() -> None:
    data = (ROOT / "proto/moorage/cri/v1/api.proto").read_bytes()
    assert hashlib.sha256(data).hexdigest() == UPSTREAM_SHA256
    assert (ROOT / "proto/LICENSE").read_text().startswith("\n") or "Apache License" in (
        ROOT / "proto/LICENSE"
    ).read_text()


def _locked(path: Path) -> dict[str, str]:
    """``name: the whole entry`` (pin, markers and hashes) of a requirements lock."""
    entries: dict[str, str] = {}
    name = ""
    for line in path.read_text().splitlines():
        if m := re.match(r"([A-Za-z0-9_.-]+)==", line):
            name = m.group(1).lower()
            entries[name] = ""
        if name and not line.lstrip().startswith("#"):
            entries[name] += line.strip() + "\n"
    return entries


def _version(entry: str) -> str:
    return entry.split("==", 1)[1].split()[0]


def test_tools_are_the_locked_ones() -> None:
    lock = _locked(ROOT / "requirements.lock")
    for name in ("grpcio-tools", "grpcio", "protobuf"):
        assert metadata.version(name) == _version(lock[name]), (
            f"{name} {metadata.version(name)} is installed, the lock says "
            f"{_version(lock[name])}: install from requirements.lock (tests/run.sh does)"
        )


def test_daemon_lock_is_part_of_the_lock() -> None:
    lock = _locked(ROOT / "requirements.lock")
    daemon = _locked(ROOT / "requirements-daemon.lock")
    assert daemon and "grpcio" in daemon and "pytest" not in daemon
    for name, entry in daemon.items():
        assert lock.get(name) == entry, f"requirements-daemon.lock's {name}: run scripts/lock.sh"


def test_floors_admit_no_runtime_older_than_the_stubs() -> None:
    """The generated code refuses a grpcio or protobuf older than the one that made it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    gen = ROOT / "src/moorage/cri/v1"
    for package, pattern, source in (
        ("grpcio", r"GRPC_GENERATED_VERSION = '([0-9.]+)'", "api_pb2_grpc.py"),
        ("protobuf", r"# Protobuf Python Version: ([0-9.]+)", "api_pb2.py"),
    ):
        made_with = re.search(pattern, (gen / source).read_text())
        floor = re.search(rf'"{package}>=([0-9.]+)"', pyproject)
        assert made_with and floor
        assert floor.group(1) == made_with.group(1), (
            f"the stubs need {package}>={made_with.group(1)}: set pyproject.toml's floor, "
            "then scripts/lock.sh"
        )


def test_stubs_are_current(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts/gen-proto.sh"), str(tmp_path)], check=True, env=env)
    generated = tmp_path / "moorage/cri/v1"
    committed = ROOT / "src/moorage/cri/v1"
    names = ["api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"]
    for name in names:
        assert (generated / name).read_bytes() == (committed / name).read_bytes(), (
            f"src/moorage/cri/v1/{name} is stale: run scripts/lock.sh"
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
