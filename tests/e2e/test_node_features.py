"""What Status advertises, and that it holds: recursive read-only mounts per runtime handler
(probed at start and on SIGHUP), and SupplementalGroupsPolicy with the container's user in
ContainerStatus (what critest's specs of both check, driven over the socket)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, rpc_error, running_env
from tests.fixtures.oci import Image, Layer, busybox_layer, push_image
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

RUNC = shutil.which("runc") or "/usr/sbin/runc"
#: A runtime that predates ``runc features`` (runc 1.0): everything else is runc's.
OLD_RUNTIME = f"""#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = features ]; then
    echo 'time="x" level=error msg="No help topic for '"'"'features'"'"'"' >&2
    exit 3
  fi
done
exec {RUNC} "$@"
"""
PASSTHROUGH = f"#!/bin/sh\nexec {RUNC} \"$@\"\n"
#: critest's test-image-predefined-group: default-user (1000) is listed in a group of the
#: image's /etc/group (50000).
PREDEFINED_UID, PREDEFINED_GID = 1000, 50000


def _kernel_has_mount_setattr() -> bool:
    """Independently of moorage's probe: mount_setattr came with Linux 5.12."""
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (5, 12)


def _runc_has_rro() -> bool:
    out = subprocess.run([RUNC, "features"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and "rro" in json.loads(out.stdout).get("mountOptions", [])


@pytest.fixture(scope="module")
def predefined_group_ref(registry: Registry) -> str:
    top = Layer()
    top.add_file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                 "default-user:x:1000:1000::/home/default-user:/bin/sh\n")
    top.add_file("etc/group", "root:x:0:\ndefault-user:x:1000:\n"
                 "group-defined-in-image:x:50000:default-user\n")
    image = Image(layers=[busybox_layer(), top.build("gzip")], user="default-user")
    push_image(registry, "e2e/predefined-group", "1", image)
    return registry.ref("e2e/predefined-group", "1")


@pytest.fixture(scope="module")
def busybox_ref(registry: Registry) -> str:
    push_image(registry, "e2e/features-busybox", "1", Image.busybox())
    return registry.ref("e2e/features-busybox", "1")


@pytest.fixture
def env(tmp_path: Path, node_ns: str, cni_dir: Path, registry: Registry, busybox_ref: str,
        predefined_group_ref: str) -> Iterator[Env]:
    old = tmp_path / "old-runtime"
    old.write_text(OLD_RUNTIME)
    old.chmod(0o755)
    extra = (f'[runtimes.old]\nruntime_path = "{old}"\n'
             f'runtime_root = "{tmp_path / "old-root"}"\n')
    with running_env(tmp_path, node_ns, cni_dir, registry, busybox_ref, config_extra=extra,
                     images=(predefined_group_ref,)) as e:
        yield e


def _handlers(env: Env) -> dict[str, pb.RuntimeHandlerFeatures]:
    status = env.rt.Status(pb.StatusRequest())
    return {h.name: h.features for h in status.runtime_handlers}


def test_status_features_are_probed_per_handler(env: Env, tmp_path: Path) -> None:
    status = env.rt.Status(pb.StatusRequest())
    assert status.features.supplemental_groups_policy
    expected = _kernel_has_mount_setattr() and _runc_has_rro()
    handlers = _handlers(env)
    assert set(handlers) == {"", "runc", "old"}
    assert handlers[""].recursive_read_only_mounts is expected
    assert handlers["runc"].recursive_read_only_mounts is expected
    # A runtime without a features command has no rro, and no user namespaces either.
    assert not handlers["old"].recursive_read_only_mounts
    assert not handlers["old"].user_namespaces
    # Upgraded in place: a SIGHUP asks every handler's binary again.
    (tmp_path / "old-runtime").write_text(PASSTHROUGH)
    assert env.d.proc is not None
    env.d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while _handlers(env)["old"].recursive_read_only_mounts is not expected:
        assert time.monotonic() < deadline, "the SIGHUP did not probe the runtime again"
        time.sleep(0.1)
    assert _handlers(env)["old"].user_namespaces is handlers["runc"].user_namespaces


def _tree_with_tmpfs(base: Path) -> Path:
    """A host dir holding a tmpfs submount (what critest's RRO specs mount)."""
    tree = base / "rro-src"
    (tree / "tmpfs").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tree / "tmpfs")], check=True)
    return tree


def test_recursive_read_only_mount_with_runc(env: Env, tmp_path: Path) -> None:
    if not (_kernel_has_mount_setattr() and _runc_has_rro()):
        pytest.skip("this node has no recursive read-only mounts")
    tree = _tree_with_tmpfs(tmp_path)
    try:
        pod = env.pod()
        mounts = [
            pb.Mount(container_path="/rro", host_path=str(tree), readonly=True,
                     recursive_read_only=True),
            pb.Mount(container_path="/ro", host_path=str(tree), readonly=True),
        ]
        cid = env.run(pod, "rro", ["sleep", "1000"], mounts=mounts)
        assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
        # Recursive: the submount is read-only too.
        r = env.exec(cid, ["touch", "/rro/tmpfs/f"])
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr
        r = env.exec(cid, ["touch", "/rro/f"])
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr
        # Plain read-only: the submount stays writable (the non-recursive spec).
        assert env.exec(cid, ["touch", "/ro/tmpfs/g"]).exit_code == 0
        assert (tree / "tmpfs" / "g").exists()
        r = env.exec(cid, ["touch", "/ro/f"])
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr
        reported = {m.container_path: m for m in env.status(cid).status.mounts}
        assert reported["/rro"].recursive_read_only and reported["/rro"].readonly
        assert not reported["/ro"].recursive_read_only
        # What critest's rejection specs send.
        for bad in (
            pb.Mount(container_path="/m", host_path=str(tree), readonly=False,
                     recursive_read_only=True),
            pb.Mount(container_path="/m", host_path=str(tree), readonly=True,
                     recursive_read_only=True, propagation=pb.PROPAGATION_HOST_TO_CONTAINER),
            pb.Mount(container_path="/m", host_path=str(tree), readonly=True,
                     recursive_read_only=True, propagation=pb.PROPAGATION_BIDIRECTIONAL),
        ):
            e = rpc_error(lambda bad=bad: env.create(pod, env.config("bad", ["true"],
                                                                      mounts=[bad])))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "config.mounts[0].recursive_read_only" in str(e.details())
        env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    finally:
        subprocess.run(["umount", "-l", str(tree / "tmpfs")], check=False)


def test_recursive_read_only_refused_where_the_handler_lacks_it(env: Env,
                                                                tmp_path: Path) -> None:
    tree = tmp_path / "plain"
    tree.mkdir()
    pod = env.pod("old", runtime_handler="old")
    rro = pb.Mount(container_path="/m", host_path=str(tree), readonly=True,
                   recursive_read_only=True)
    e = rpc_error(lambda: env.create(pod, env.config("c", ["true"], mounts=[rro])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.mounts[0].recursive_read_only" in str(e.details())
    assert "not supported by this runtime handler" in str(e.details())
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert not list((env.d.root / "overlay" / "containers").iterdir())
    # The same container without rro runs under that handler.
    plain = pb.Mount(container_path="/m", host_path=str(tree), readonly=True)
    cid = env.run(pod, "c", ["sleep", "1000"], mounts=[plain])
    assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING


@pytest.mark.parametrize("strict", [False, True], ids=["merge", "strict"])
def test_supplemental_groups_policy(env: Env, predefined_group_ref: str, strict: bool) -> None:
    """critest's two SupplementalGroupsPolicy specs: the groups of the image's /etc/group
    are added under Merge and not under Strict, for the first process and for an exec,
    and ContainerStatus reports the process's user."""
    pod = env.pod()
    cfg = env.config("groups", ["sh", "-c", "id -G; sleep 1000"])
    cfg.image.image = predefined_group_ref
    sc = cfg.linux.security_context
    sc.run_as_user.value = PREDEFINED_UID
    sc.supplemental_groups.append(1234)
    if strict:
        sc.supplemental_groups_policy = pb.Strict
    cid = env.create(pod, cfg)
    env.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    st = env.wait_state(cid, pb.CONTAINER_RUNNING)
    assert st.state == pb.CONTAINER_RUNNING
    groups = [PREDEFINED_UID, 1234] + ([] if strict else [PREDEFINED_GID])
    user = st.user.linux
    assert (user.uid, user.gid) == (PREDEFINED_UID, PREDEFINED_UID)
    assert sorted(user.supplemental_groups) == groups
    expected = " ".join(str(g) for g in groups).encode()
    deadline = time.monotonic() + 20
    while not env.log_lines(cid):
        assert time.monotonic() < deadline, "the container printed nothing"
        time.sleep(0.05)
    assert env.log_lines(cid)[0] == (b"stdout", b"F", expected)
    assert env.exec(cid, ["id", "-G"]).stdout == expected + b"\n"
