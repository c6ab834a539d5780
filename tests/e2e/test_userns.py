"""Pods with their own user namespace, end to end: the daemon from its CLI, real runc, the
pinner, idmapped overlay layers and idmapped volumes, a daemon restart.

runc, inside the pod's user namespace, is "others" for every host-owned directory on the
way to a root filesystem: the daemon's state must live below directories that others may
search (pytest's own temp dirs are 0700), so these tests keep it in a 0711 directory of
their own. The plain ``daemon`` fixture (state below pytest's 0700 dir) is the node that
cannot run such pods.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, busybox_ref, rpc_error, running_env
from tests.fixtures.daemon import Daemon
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
__all__ = ["busybox_ref"]  # the module-scoped image fixture, shared with test_containers

#: The pod's root on the host: kubelet hands out multiples of 65536.
HOST_ID = 65536 * 37
USERNS = "config.linux.security_context.namespace_options.userns_options"


def _mapping(host_id: int = HOST_ID, container_id: int = 0, length: int = 65536
             ) -> pb.IDMapping:
    return pb.IDMapping(host_id=host_id, container_id=container_id, length=length)


def pod_userns(host_id: int = HOST_ID) -> pb.UserNamespace:
    return pb.UserNamespace(mode=pb.POD, uids=[_mapping(host_id)], gids=[_mapping(host_id)])


@pytest.fixture
def searchable_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="moorage-userns-"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def uenv(searchable_tmp: Path, node_ns: str, cni_dir: Path, registry: Registry,
         busybox_ref: str) -> Iterator[Env]:
    with running_env(searchable_tmp, node_ns, cni_dir, registry, busybox_ref) as e:
        yield e


def run_pod(env: Env, name: str, userns: pb.UserNamespace | None, **ns: int) -> str:
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="ns", uid=f"uid-{name}"),
        hostname=name, log_directory=str(env.tmp / "logs" / name))
    opts = cfg.linux.security_context.namespace_options
    for key, value in ns.items():
        setattr(opts, key, value)
    if userns is not None:
        opts.userns_options.CopyFrom(userns)
    env.last_pod_config = cfg
    return str(env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                    timeout=120).pod_sandbox_id)


def ctr_config(env: Env, name: str, cmd: list[str], userns: pb.UserNamespace | None = None,
               **kw: object) -> pb.ContainerConfig:
    cfg = env.config(name, cmd, **kw)
    if userns is not None:
        cfg.linux.security_context.namespace_options.userns_options.CopyFrom(userns)
    return cfg


def sh_out(env: Env, cid: str, script: str) -> str:
    r = env.exec(cid, ["sh", "-c", script], timeout=20)
    assert r.exit_code == 0, (script, r.stdout, r.stderr)
    return r.stdout.decode()


def proc_ids(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["Uid"][0]), int(fields["Gid"][0])


def test_pod_root_is_an_unprivileged_host_uid(uenv: Env) -> None:
    env = uenv
    handlers = env.rt.Status(pb.StatusRequest()).runtime_handlers
    assert handlers and all(h.features.user_namespaces for h in handlers)
    userns = pod_userns()
    pod = run_pod(env, "upod", userns, pid=pb.POD)
    st = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    got = st.linux.namespaces.options.userns_options
    assert (got.mode, list(got.uids), list(got.gids)) == (pb.POD, [_mapping()], [_mapping()])

    volume = env.tmp / "vol"
    volume.mkdir(mode=0o755)
    (volume / "data").write_text("host\n")
    idmapped = pb.Mount(container_path="/vol", host_path=str(volume),
                        uidMappings=[_mapping()], gidMappings=[_mapping()])
    a = env.create(pod, ctr_config(env, "a", ["sleep", "1000"], userns, mounts=[idmapped]))
    env.rt.StartContainer(pb.StartContainerRequest(container_id=a))
    b = env.create(pod, ctr_config(
        env, "b", ["sleep", "1000"], userns,
        linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(pid=pb.POD, userns_options=userns),
            capabilities=pb.Capability(add_capabilities=["NET_ADMIN"])))))
    env.rt.StartContainer(pb.StartContainerRequest(container_id=b))
    assert env.wait_state(a, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING

    # Inside: the mapping, root, and root owns the root filesystem and can write it.
    assert sh_out(env, a, "cat /proc/self/uid_map").split() == ["0", str(HOST_ID), "65536"]
    assert sh_out(env, a, "cat /proc/self/gid_map").split() == ["0", str(HOST_ID), "65536"]
    assert sh_out(env, a, "id -u; id -g").split() == ["0", "0"]
    assert sh_out(env, a, "stat -c '%u:%g' / /bin /etc/passwd").split() == ["0:0"] * 3
    sh_out(env, a, "echo written > /written && mkdir /newdir && echo x > /etc/passwd-extra")
    # The pod's files and /dev/shm are root's in the pod.
    assert sh_out(env, a, "stat -c '%u:%g' /dev/shm /etc/hosts").split() == ["0:0"] * 2
    sh_out(env, a, "echo s > /dev/shm/s && cat /etc/hosts /etc/resolv.conf >/dev/null")
    assert sh_out(env, a, "hostname").strip() == "upod"
    # The idmapped volume: host root's files are the pod root's, and its writes are host
    # root's on disk.
    assert sh_out(env, a, "stat -c '%u:%g' /vol /vol/data").split() == ["0:0"] * 2
    sh_out(env, a, "echo pod > /vol/data && echo new > /vol/made")
    assert (volume / "data").read_text() == "pod\n"
    made = (volume / "made").stat()
    assert (made.st_uid, made.st_gid) == (0, 0)

    # From the host: the process runs as the unprivileged host uid; writes land as it.
    info = json.loads(env.status(a, verbose=True).info["info"])
    assert proc_ids(info["pid"]) == (HOST_ID, HOST_ID)
    spec = info["runtimeSpec"]["linux"]
    assert {"containerID": 0, "hostID": HOST_ID, "size": 65536} in spec["uidMappings"]
    assert any(n["type"] == "user" and n.get("path") for n in spec["namespaces"])
    upper = env.d.root / "overlay" / "containers" / a / "upper"
    for name in ("written", "newdir"):
        st_ = (upper / name).stat()
        assert (st_.st_uid, st_.st_gid) == (HOST_ID, HOST_ID)

    # Both containers share the pod's user namespace; root there has CAP_NET_ADMIN over the
    # pod's own network namespace (owned by the user namespace), not over the host's.
    user_ns = sh_out(env, a, "readlink /proc/self/ns/user").strip()
    assert sh_out(env, b, "readlink /proc/self/ns/user").strip() == user_ns
    assert user_ns != os.readlink("/proc/self/ns/user")
    assert os.stat(env.d.runroot / "ns" / "user" / pod).st_ino == int(user_ns[6:-1])
    sh_out(env, b, "ip link set lo down && ip link set lo up")
    # The infra process (pid POD) is the pod's root too.
    sandbox_info = json.loads(env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
        pod_sandbox_id=pod, verbose=True)).info["info"])
    assert proc_ids(sandbox_info["pid"]) == (HOST_ID, HOST_ID)

    # A daemon restart keeps it all.
    env.d.restart()
    env.rt = env.d.runtime
    assert env.status(a).status.state == pb.CONTAINER_RUNNING
    assert sh_out(env, a, "id -u; cat /written").split() == ["0", "written"]
    assert sh_out(env, b, "readlink /proc/self/ns/user").strip() == user_ns
    assert env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
        pod_sandbox_id=pod)).status.state == pb.SANDBOX_READY

    # Removal leaves no pin, no idmapped mount and no rootfs mount behind.
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(env.d.runroot) not in mounts and str(env.d.root) not in mounts
    assert not (env.d.runroot / "ns" / "user" / pod).exists()
    assert (volume / "made").read_text() == "new\n"  # the volume itself is untouched


def test_bad_user_namespace_requests_are_refused(uenv: Env) -> None:
    env = uenv

    def refused(userns: pb.UserNamespace, **ns: int) -> grpc.RpcError:
        return rpc_error(lambda: run_pod(env, "bad", userns, **ns))

    e = refused(pb.UserNamespace(mode=pb.CONTAINER))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and f"{USERNS}.mode" in str(e.details())
    e = refused(pb.UserNamespace(mode=pb.POD))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "uids" in str(e.details())
    e = refused(pb.UserNamespace(mode=pb.POD, uids=[_mapping(length=0)], gids=[_mapping()]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "uids[0].length" in str(e.details())
    overlap = [_mapping(), _mapping(host_id=HOST_ID + 100, container_id=65536)]
    e = refused(pb.UserNamespace(mode=pb.POD, uids=[_mapping()], gids=overlap))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "gids[1].host_id" in str(e.details())
    no_root = [_mapping(container_id=1)]
    e = refused(pb.UserNamespace(mode=pb.POD, uids=no_root, gids=[_mapping()]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "container id 0" in str(e.details())
    too_far = [_mapping(host_id=2**32 - 10)]
    e = refused(pb.UserNamespace(mode=pb.POD, uids=[_mapping()], gids=too_far))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "gids[0]" in str(e.details())
    e = refused(pod_userns(), network=pb.NODE)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "host's network" in str(e.details())
    e = refused(pod_userns(), pid=pb.NODE)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "host's pid" in str(e.details())
    assert not env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert not list((env.d.runroot / "ns" / "user").iterdir())

    # A container must say what its pod says; a volume's mappings must be the pod's.
    plain = run_pod(env, "plain", pb.UserNamespace(mode=pb.NODE))
    e = rpc_error(lambda: env.create(plain, ctr_config(env, "c", ["true"], pod_userns())))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and USERNS in str(e.details())
    upod = run_pod(env, "upod", pod_userns())
    e = rpc_error(lambda: env.create(upod, ctr_config(env, "c", ["true"], pod_userns(
        HOST_ID + 65536))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and USERNS in str(e.details())
    vol = env.tmp / "v"
    vol.mkdir()
    other = pb.Mount(container_path="/v", host_path=str(vol),
                     uidMappings=[_mapping(HOST_ID * 2)], gidMappings=[_mapping(HOST_ID * 2)])
    e = rpc_error(lambda: env.create(upod, ctr_config(env, "c", ["true"], pod_userns(),
                                                       mounts=[other])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.mounts[0]" in str(e.details())
    on_plain = pb.Mount(container_path="/v", host_path=str(vol),
                        uidMappings=[_mapping()], gidMappings=[_mapping()])
    e = rpc_error(lambda: env.create(plain, ctr_config(env, "c", ["true"],
                                                        mounts=[on_plain])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.mounts[0]" in str(e.details())
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert str(vol) not in Path("/proc/self/mountinfo").read_text()


def test_a_node_that_cannot_is_honest(daemon: Daemon) -> None:
    # This daemon's state is below pytest's 0700 temp dir: runc in a user namespace could
    # not reach the root filesystems, so the feature is off and such pods are refused.
    handlers = daemon.runtime.Status(pb.StatusRequest()).runtime_handlers
    assert handlers and not any(h.features.user_namespaces for h in handlers)
    cfg = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="p", namespace="n", uid="u"))
    cfg.linux.security_context.namespace_options.userns_options.CopyFrom(pod_userns())
    e = rpc_error(lambda: daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert USERNS in str(e.details()) and "searched by others" in str(e.details())
    assert not daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
