"""Host paths the daemon is given or makes: log paths, mount host paths, and the modes of its
socket, state and log files (as CRI-O, conmon and kubelet make them).

Runs real pods (runc, the CNI bridge in a node namespace) with the ``env`` fixture of
test_containers.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, busybox_ref, env  # noqa: F401 (fixtures)
from tests.e2e.test_images import rpc_error

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def containers(e: Env) -> list[str]:
    return [c.id for c in e.rt.ListContainers(pb.ListContainersRequest()).containers]


def log_dir(e: Env) -> Path:
    return Path(e.last_pod_config.log_directory)


@pytest.mark.parametrize(("log_path", "fragment"), [
    ("../escape.log", "leaves the pod sandbox's log_directory"),
    ("ctr/../../escape.log", "leaves the pod sandbox's log_directory"),
    ("/var/log/escape.log", "is absolute"),
    ("..", "leaves the pod sandbox's log_directory"),
])
def test_log_path_outside_the_log_directory_is_refused(
    env: Env, log_path: str, fragment: str  # noqa: F811
) -> None:
    pod = env.pod()
    e = rpc_error(env.create, pod, env.config("c", ["true"], log_path=log_path))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.log_path" in (e.details() or "") and fragment in (e.details() or "")
    assert containers(env) == []
    assert not (log_dir(env).parent / "escape.log").exists()
    assert not Path("/var/log/escape.log").exists()


def test_symlink_planted_in_the_log_directory_is_not_followed(env: Env) -> None:  # noqa: F811
    pod = env.pod()
    logs = log_dir(env)
    victim = env.tmp / "victim"
    victim.mkdir()
    target = victim / "precious"
    target.write_text("precious\n")
    # kubelet's log_path is "<container>/<restart>.log": plant the container's directory...
    (logs / "dirlink").symlink_to(victim)
    e = rpc_error(env.create, pod, env.config("dirlink", ["echo", "hi"]))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "config.log_path" in (e.details() or "") and "symlink" in (e.details() or "")
    # ... or the log file itself.
    (logs / "filelink").mkdir()
    (logs / "filelink" / "0.log").symlink_to(target)
    e = rpc_error(env.create, pod, env.config("filelink", ["echo", "hi"]))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "config.log_path" in (e.details() or "") and "symlink" in (e.details() or "")
    assert containers(env) == []
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]
    assert target.read_text() == "precious\n"


def test_reopen_log_refuses_a_symlink_planted_after_rotation(env: Env) -> None:  # noqa: F811
    pod = env.pod()
    cid = env.run(pod, "rot", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    log = Path(env.status(cid).status.log_path)
    victim = env.tmp / "victim-file"
    victim.write_text("precious\n")
    log.rename(log.with_name("0.log.20240101-000000"))
    log.symlink_to(victim)
    e = rpc_error(env.rt.ReopenContainerLog, pb.ReopenContainerLogRequest(container_id=cid))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "symlink" in (e.details() or "")
    assert victim.read_text() == "precious\n"
    # Once the symlink is gone, the log reopens as a new regular file.
    log.unlink()
    env.rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    assert stat.S_ISREG(log.lstat().st_mode) and mode(log) == 0o640


def test_mount_host_path_symlinks_are_resolved(env: Env) -> None:  # noqa: F811
    """As CRI-O (resolveSymbolicLink) and containerd do: the bind mount's source is the
    symlink's target, resolved on the host when the container is created."""
    real = env.tmp / "real-volume"
    real.mkdir()
    (real / "data").write_text("from the real directory\n")
    link = env.tmp / "volume-link"
    link.symlink_to(real)
    pod = env.pod()
    mount = pb.Mount(container_path="/mnt/vol", host_path=str(link), readonly=True)
    cid = env.run(pod, "m", ["sleep", "1000"], mounts=[mount])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    out = env.exec(cid, ["cat", "/mnt/vol/data"])
    assert out.exit_code == 0 and out.stdout == b"from the real directory\n"
    info = json.loads(env.status(cid, verbose=True).info["info"])
    sources = [m["source"] for m in info["runtimeSpec"]["mounts"]
               if m["destination"] == "/mnt/vol"]
    assert sources == [str(real)]
    # A dangling symlink is refused, naming the field.
    dangling = env.tmp / "dangling"
    dangling.symlink_to(env.tmp / "nowhere")
    bad = pb.Mount(container_path="/mnt/x", host_path=str(dangling))
    e = rpc_error(env.create, pod, env.config("bad", ["true"], mounts=[bad]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.mounts[0].host_path" in (e.details() or "")
    assert "does not exist" in (e.details() or "")
    assert containers(env) == [cid]


def test_modes_of_socket_state_and_log_files(env: Env) -> None:  # noqa: F811
    d = env.d
    # The socket: 0660, as CRI-O chmods crio.sock (kubelet runs as root).
    assert stat.S_ISSOCK(d.socket.lstat().st_mode) and mode(d.socket) == 0o660
    pod = env.pod()
    cid = env.run(pod, "modes", ["sh", "-c", "echo hi; sleep 1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    # Container state (bundle with config.json, monitor sockets, exit files): 0700, the
    # spec 0600; records of containers and images 0600 in 0700 directories.
    state = d.runroot / "containers" / cid
    assert mode(state) == 0o700 and mode(state / "config.json") == 0o600
    assert mode(d.root / "containers" / f"{cid}.json") == 0o600
    for sub in ("blobs/sha256", "ingest", "layers", "layer-meta", "records"):
        assert mode(d.root / "images" / sub) == 0o700, sub
    # The CRI log: 0640 as conmon opens it; the container's log directory 0755, as kubelet
    # makes it (we make it when kubelet has not).
    log = Path(env.status(cid).status.log_path)
    assert log == log_dir(env) / "modes" / "0.log"
    assert stat.S_ISREG(log.lstat().st_mode) and mode(log) == 0o640
    assert mode(log.parent) == 0o755 and mode(log_dir(env)) == 0o755
    # The pod's hostname, hosts and resolv.conf: 0644 in a 0755 directory (containers of
    # any user read them through bind mounts).
    files = d.runroot / "sandboxes" / pod
    assert mode(files) == 0o755
    for name in ("hostname", "hosts", "resolv.conf"):
        assert mode(files / name) == 0o644, name
