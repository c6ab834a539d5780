"""Image volumes (KEP-4639) end to end: a CRI mount naming an image, mounted read-only
into the container (whole and by sub path), the image kept while a container uses it,
nothing left behind by a failure, a removal, a daemon restart or a kill -9 mid-create."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from tests.e2e.test_containers import Env, rpc_error, running_env
from tests.e2e.test_userns import pod_userns, run_pod
from tests.fixtures.oci import Image, Layer, push_image
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

RUNC = shutil.which("runc") or "/usr/sbin/runc"


def _volume_image() -> Image:
    """An artifact-like image of two layers (no busybox): the upper one shadows a file of
    the lower, adds links that lead inside the image and one that tries to leave it."""
    lower = (Layer().add_dir("dir").add_file("dir/file", "1\n").add_dir("dir/sub")
             .add_file("dir/sub/deep", "deep\n").add_file("over", "old\n")
             .add_file("run.sh", "#!/bin/sh\necho ran\n", mode=0o755))
    upper = (Layer().add_file("file", "2\n").add_file("over", "new\n")
             .add_symlink("link", "/dir").add_symlink("up", "../../../../..")
             .add_symlink("loop", "loop"))
    return Image(layers=[lower.build("gzip"), upper.build("gzip")], cmd=None)


@pytest.fixture(scope="module")
def busybox_ref(registry: Registry) -> str:
    push_image(registry, "e2e/iv-busybox", "1", Image.busybox())
    return registry.ref("e2e/iv-busybox", "1")


@pytest.fixture(scope="module")
def volume_ref(registry: Registry) -> str:
    push_image(registry, "e2e/iv-data", "1", _volume_image())
    return registry.ref("e2e/iv-data", "1")


def _slow_runtime(base: Path) -> Path:
    """A runc whose ``create`` waits for ``<base>/go`` after saying it started (so a test
    can kill -9 the daemon mid-create), then fails."""
    script = base / "slow-runtime"
    script.write_text(
        "#!/bin/sh\n"
        "for arg in \"$@\"; do\n"
        "  if [ \"$arg\" = create ]; then\n"
        f"    touch {base}/creating\n"
        f"    while [ ! -e {base}/go ]; do sleep 0.05; done\n"
        "    echo 'time=\"x\" level=error msg=\"told to fail\"' >&2\n"
        "    exit 1\n"
        "  fi\n"
        "done\n"
        f"exec {RUNC} \"$@\"\n")
    script.chmod(0o755)
    return script


def _env(base: Path, node_ns: str, cni_dir: Path, registry: Registry, busybox_ref: str,
         volume_ref: str) -> Iterator[Env]:
    extra = (f'[runtimes.slow]\nruntime_path = "{_slow_runtime(base)}"\n'
             f'runtime_root = "{base / "slow-root"}"\n')
    with running_env(base, node_ns, cni_dir, registry, busybox_ref, config_extra=extra,
                     images=(volume_ref,)) as e:
        yield e


@pytest.fixture
def env(tmp_path: Path, node_ns: str, cni_dir: Path, registry: Registry, busybox_ref: str,
        volume_ref: str) -> Iterator[Env]:
    yield from _env(tmp_path, node_ns, cni_dir, registry, busybox_ref, volume_ref)


def _image_id(env: Env, ref: str) -> str:
    image = env.d.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)))
    return str(image.image.id)


def _volume(image: str, path: str, sub: str = "", **kw: object) -> pb.Mount:
    return pb.Mount(container_path=path, image=pb.ImageSpec(image=image), image_sub_path=sub,
                    readonly=True, **kw)  # type: ignore[arg-type]


def _image_mounts(env: Env) -> list[str]:
    """The image volume mounts of this daemon on the host."""
    base = f" {env.d.root}/overlay/containers/"
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if base in line and "/image-mounts/" in line]


def _out(env: Env, cid: str, *cmd: str) -> bytes:
    r = env.exec(cid, list(cmd))
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return bytes(r.stdout)


def test_image_volume_whole_and_sub_path(env: Env, volume_ref: str) -> None:
    image_id = _image_id(env, volume_ref)  # kubelet sends PullImage's image_ref: the id
    pod = env.pod()
    mounts = [_volume(image_id, "/volume"), _volume(image_id, "/sub", "dir"),
              _volume(image_id, "/via-link", "link/sub"),
              _volume(image_id, "/one-file", "dir/file"),
              _volume(image_id, "/clamped", "up/dir")]
    cid = env.run(pod, "reader", ["sleep", "1000"], mounts=mounts)
    assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    # The layers merged, the upper one winning.
    assert _out(env, cid, "cat", "/volume/dir/file") == b"1\n"
    assert _out(env, cid, "cat", "/volume/file") == b"2\n"
    assert _out(env, cid, "cat", "/volume/over") == b"new\n"
    # Sub paths: a directory, one reached through the image's own absolute link, a file,
    # and a relative link that climbs out: it stops at the image's root.
    assert _out(env, cid, "cat", "/sub/file") == b"1\n"
    assert _out(env, cid, "cat", "/via-link/deep") == b"deep\n"
    assert _out(env, cid, "cat", "/one-file") == b"1\n"
    assert _out(env, cid, "cat", "/clamped/file") == b"1\n"
    # Read-only, nosuid, nodev: what the kernel says inside the container. Its programs
    # run (critest checks it: CRI-O's and containerd's image volumes are not noexec).
    r = env.exec(cid, ["touch", "/volume/new"])
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr
    assert _out(env, cid, "/volume/run.sh") == b"ran\n"
    options = {line.split()[4]: line.split()[5]
               for line in _out(env, cid, "cat", "/proc/self/mountinfo").decode().splitlines()}
    for path in ("/volume", "/sub", "/one-file"):
        assert {"ro", "nosuid", "nodev"} <= set(options[path].split(",")), path
        assert "noexec" not in options[path].split(","), path
    # ContainerStatus: as CRI-O reports it, the image by id (kubelet's image GC reads it).
    status = env.status(cid).status
    reported = {m.container_path: m for m in status.mounts}
    assert set(reported) == {"/volume", "/sub", "/via-link", "/one-file", "/clamped"}
    for m in reported.values():
        assert m.image.image == image_id and m.image.image_ref == image_id
        assert m.readonly and m.host_path
        assert Path(m.host_path).exists()
    assert reported["/sub"].image_sub_path == "dir"
    assert reported["/via-link"].host_path.endswith("/dir/sub")
    assert len(_image_mounts(env)) == 5
    # The image stays while a container uses it: by id and by its tag.
    for name in (image_id, volume_ref):
        e = rpc_error(lambda name=name: env.d.images.RemoveImage(
            pb.RemoveImageRequest(image=pb.ImageSpec(image=name))))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert cid in str(e.details())
    assert _image_id(env, volume_ref) == image_id
    # Stopped, the container still holds it; removed, it lets go of mounts and image.
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    assert _image_mounts(env) == []
    e = rpc_error(lambda: env.d.images.RemoveImage(
        pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id))))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    env.d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))
    assert _image_id(env, volume_ref) == ""


def test_bad_image_volumes_are_refused_and_leave_nothing(env: Env, volume_ref: str) -> None:
    image_id = _image_id(env, volume_ref)
    pod = env.pod()
    cases: list[tuple[pb.Mount, grpc.StatusCode, str]] = [
        (_volume(image_id, "/v", "nope"), grpc.StatusCode.INVALID_ARGUMENT,
         "config.mounts[0].image_sub_path: 'nope' does not exist in the image"),
        # The link climbs to the image's root, whose /etc does not exist: never the host's.
        (_volume(image_id, "/v", "up/etc"), grpc.StatusCode.INVALID_ARGUMENT,
         "config.mounts[0].image_sub_path: 'up/etc' does not exist"),
        (_volume(image_id, "/v", "../dir"), grpc.StatusCode.INVALID_ARGUMENT,
         "config.mounts[0].image_sub_path: '../dir' must not contain '..'"),
        (_volume(image_id, "/v", "/dir"), grpc.StatusCode.INVALID_ARGUMENT,
         "config.mounts[0].image_sub_path: '/dir' is not a relative path"),
        (_volume(image_id, "/v", "loop"), grpc.StatusCode.INVALID_ARGUMENT,
         "config.mounts[0].image_sub_path: 'loop': Too many levels of symbolic links"),
        (_volume("sha256:" + "0" * 64, "/v"), grpc.StatusCode.NOT_FOUND,
         "config.mounts[0].image: image 'sha256:" + "0" * 64 + "' is not present"),
        (pb.Mount(container_path="/v", host_path="/tmp", image=pb.ImageSpec(image=image_id)),
         grpc.StatusCode.INVALID_ARGUMENT, "config.mounts[0]: both host_path"),
        (pb.Mount(container_path="/v", host_path="/tmp", image_sub_path="dir"),
         grpc.StatusCode.INVALID_ARGUMENT, "config.mounts[0].image_sub_path: set without"),
        # What critest's "should reject Image Volume with Readonly set to false" sends.
        (pb.Mount(container_path="/v", image=pb.ImageSpec(image=image_id), readonly=False),
         grpc.StatusCode.INVALID_ARGUMENT, "config.mounts[0].readonly: an image volume"),
    ]
    for mount, code, message in cases:
        e = rpc_error(lambda mount=mount: env.create(
            pod, env.config("bad", ["true"], mounts=[mount])))
        assert e.code() == code and message in str(e.details()), (e.code(), e.details())
    # Half-way: the image volume mounted, then a later step (the device) fails.
    dev = pb.Device(container_path="/dev/x", host_path="/dev/no-such-device",
                    permissions="rw")
    e = rpc_error(lambda: env.create(pod, env.config(
        "half", ["true"], mounts=[_volume(image_id, "/v")], devices=[dev])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.devices[0]" in str(
        e.details())
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert _image_mounts(env) == []
    deadline = time.monotonic() + 10
    while os.listdir(env.d.root / "overlay" / "containers"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Nothing holds the image any more.
    env.d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))


def test_image_volume_across_restarts_and_a_kill9_mid_create(env: Env, volume_ref: str,
                                                             tmp_path: Path) -> None:
    image_id = _image_id(env, volume_ref)
    pod = env.pod()
    cid = env.run(pod, "keeps", ["sleep", "1000"], mounts=[_volume(image_id, "/v", "dir")])
    assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    env.d.kill9()
    env.d.start()
    env.rt = env.d.runtime
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    assert _out(env, cid, "cat", "/v/file") == b"1\n"
    assert env.status(cid).status.mounts[0].image.image == image_id
    e = rpc_error(lambda: env.d.images.RemoveImage(
        pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id))))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    assert _image_mounts(env) == []
    # kill -9 while the runtime creates a container whose image volume is mounted.
    slow = env.pod("slow", runtime_handler="slow")
    cfg = env.last_pod_config
    channel = grpc.insecure_channel(f"unix:{env.d.socket}")
    try:
        future = pb_grpc.RuntimeServiceStub(channel).CreateContainer.future(
            pb.CreateContainerRequest(pod_sandbox_id=slow, sandbox_config=cfg, config=env.config(
                "mid", ["sleep", "1000"], mounts=[_volume(image_id, "/v")])), timeout=60)
        deadline = time.monotonic() + 30
        while not (tmp_path / "creating").exists():
            assert time.monotonic() < deadline, "the runtime's create never started"
            time.sleep(0.05)
        assert len(_image_mounts(env)) == 1
        env.d.kill9()
        with pytest.raises(grpc.RpcError):
            future.result()
    finally:
        channel.close()
    (tmp_path / "go").touch()
    env.d.start()
    env.rt = env.d.runtime
    assert not env.rt.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=slow))).containers
    assert _image_mounts(env) == []
    env.d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))


@pytest.fixture
def uenv(node_ns: str, cni_dir: Path, registry: Registry, busybox_ref: str,
         volume_ref: str) -> Iterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="moorage-iv-"))
    base.chmod(0o711)  # runc in the pod's user namespace must reach the state (test_userns)
    try:
        yield from _env(base, node_ns, cni_dir, registry, busybox_ref, volume_ref)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_image_volume_in_a_pod_with_a_user_namespace(uenv: Env, volume_ref: str) -> None:
    env = uenv
    if not all(h.features.user_namespaces
               for h in env.rt.Status(pb.StatusRequest()).runtime_handlers if h.name == ""):
        pytest.skip("this node cannot run pods with a user namespace")
    image_id = _image_id(env, volume_ref)
    userns = pod_userns()
    pod = run_pod(env, "upod", userns)
    cfg = env.config("reader", ["sleep", "1000"], mounts=[
        _volume(image_id, "/v", uidMappings=list(userns.uids), gidMappings=list(userns.gids))])
    cfg.linux.security_context.namespace_options.userns_options.CopyFrom(userns)
    cid = env.create(pod, cfg)
    env.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    assert _out(env, cid, "cat", "/v/dir/file") == b"1\n"
    # Files of host root in the layers are the pod's root's (idmapped layers).
    assert _out(env, cid, "stat", "-c", "%u:%g", "/v/file") == b"0:0\n"
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert _image_mounts(env) == []
