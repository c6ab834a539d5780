"""kill -9 of the daemon at each named step of RunPodSandbox, StopPodSandbox,
RemovePodSandbox, CreateContainer, StartContainer, StopContainer, RemoveContainer, PullImage
and RemoveImage (``MOORAGE_CRASHPOINT``, src/moorage/util/crash.py): after the restart the
state is consistent (nothing reported running that does not run), the same call, retried
as kubelet does with the same names, succeeds, and once everything is removed the leak
check finds nothing."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.util.crash import ENV, FILE_PREFIX, NAMES
from tests.e2e.test_containers import Env, running_env
from tests.e2e.test_crash_consistency import assert_nothing_left, remove_everything
from tests.e2e.test_images import insecure_conf
from tests.fixtures.daemon import Daemon
from tests.fixtures.oci import Image, Layer, busybox_layer_builder, push_image
from tests.fixtures.procs import alive
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


class Crasher:
    """Arms one crash point at a time in a running daemon (``file:`` mode of
    MOORAGE_CRASHPOINT), so a crash costs one restart."""

    def __init__(self, d: Daemon, path: Path) -> None:
        self.d = d
        self.path = path
        path.write_text("")

    @contextlib.contextmanager
    def armed(self, step: str) -> Iterator[None]:
        """The block's call must kill the daemon at ``step``; it is then started again."""
        self.path.write_text(step)
        try:
            yield
        finally:
            self.path.write_text("")
            assert self.d.proc is not None
            code = self.d.proc.wait(60)
            assert code == -9, f"the daemon did not crash at {step} (exit {code})"
            self.d.kill9()  # forget the dead process and its channel
            self.d.start()


def _crashes(call: Callable[[], object]) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()


def _consistent(env: Env) -> None:
    """What the restarted daemon reports is true: a running container runs, a ready pod
    has its network namespace."""
    for c in env.rt.ListContainers(pb.ListContainersRequest()).containers:
        if c.state == pb.CONTAINER_RUNNING:
            info = json.loads(env.status(c.id, verbose=True).info["info"])
            assert alive(info["pid"]), f"container {c.id} reported running, not running"
    for p in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        if p.state == pb.SANDBOX_READY:
            st = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
                pod_sandbox_id=p.id, verbose=True))
            assert Path(json.loads(st.info["info"])["netnsPath"]).exists()


def _pod_config(env: Env, name: str) -> pb.PodSandboxConfig:
    """A pod whose containers share its PID namespace: the infra process is made too."""
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="ns", uid=f"uid-{name}"),
        hostname=name, log_directory=str(env.tmp / "logs" / name))
    cfg.linux.security_context.namespace_options.pid = pb.POD
    env.last_pod_config = cfg
    return cfg


#: The steps of each call, in the order a test walks them.
CALLS = {
    "RunPodSandbox": [n for n in NAMES if n.startswith("sandbox.run.")],
    "StopPodSandbox": [n for n in NAMES if n.startswith("sandbox.stop.")],
    "RemovePodSandbox": [n for n in NAMES if n.startswith("sandbox.remove.")],
    "CreateContainer": [n for n in NAMES if n.startswith("container.create.")],
    "StartContainer": [n for n in NAMES if n.startswith("container.start.")],
    "StopContainer": ["container.stop.signalled", "container.exit.recorded",
                      "container.release.runtime_deleted"],
    "RemoveContainer": [n for n in NAMES if n.startswith("container.remove.")],
    "PullImage": [n for n in NAMES if n.startswith("image.pull.")],
    "RemoveImage": [n for n in NAMES if n.startswith("image.remove.")],
}


def test_every_crash_point_is_tested() -> None:
    assert sorted(n for steps in CALLS.values() for n in steps) == sorted(NAMES)


@pytest.fixture
def crash_env(tmp_path: Path, node_ns: str, cni_dir: Path, registry: Registry,
              busybox_ref: str) -> Iterator[tuple[Env, Crasher]]:
    armed = tmp_path / "crashpoint"
    armed.write_text("")
    with running_env(tmp_path, node_ns, cni_dir, registry, busybox_ref,
                     daemon_env={ENV: f"{FILE_PREFIX}{armed}"}) as env:
        yield env, Crasher(env.d, armed)


@pytest.mark.parametrize("call", [c for c in CALLS if not c.endswith("Image")])
def test_crash_at_each_step_then_retry(crash_env: tuple[Env, Crasher], node_ns: str,
                                       tmp_path: Path, call: str) -> None:
    env, crasher = crash_env
    for step in CALLS[call]:
        _crash_then_retry(env, crasher, step)
        env.rt = env.d.runtime
        _consistent(env)
        remove_everything(env.rt)
        assert_nothing_left(env.d, node_ns, tmp_path)


def _crash_and_retry(env: Env, crasher: Crasher, step: str, rpc: str, request: Any) -> Any:
    """``rpc`` killed at ``step``; the restarted daemon's state is consistent; the same call
    again (its answer)."""
    with crasher.armed(step):
        _crashes(lambda: getattr(env.d.runtime, rpc)(request))
    env.rt = env.d.runtime
    _consistent(env)
    return getattr(env.d.runtime, rpc)(request)


def _crash_then_retry(env: Env, crasher: Crasher, step: str) -> None:
    rt = lambda: env.d.runtime  # noqa: E731 - a new stub after each restart
    cfg = _pod_config(env, "crash")
    app = env.config("app", ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"])
    if step.startswith("sandbox.run."):
        pod = _crash_and_retry(env, crasher, step, "RunPodSandbox",
                               pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
        st = rt().PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
        assert st.state == pb.SANDBOX_READY and st.network.ip, step
        return
    pod = rt().RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    create = pb.CreateContainerRequest(pod_sandbox_id=pod, config=app, sandbox_config=cfg)
    if step.startswith("container.create."):
        cid = _crash_and_retry(env, crasher, step, "CreateContainer", create).container_id
        rt().StartContainer(pb.StartContainerRequest(container_id=cid))
        assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING, step
        return
    cid = rt().CreateContainer(create).container_id
    start = pb.StartContainerRequest(container_id=cid)
    if step.startswith("container.start."):
        _crash_and_retry(env, crasher, step, "StartContainer", start)
        assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING, step
        return
    rt().StartContainer(start)
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    _retry_later_step(env, crasher, step, pod, cid)


def _retry_later_step(env: Env, crasher: Crasher, step: str, pod: str, cid: str) -> None:
    """The steps of StopContainer, RemoveContainer, StopPodSandbox and RemovePodSandbox,
    with the pod ready and its container running."""
    rt = lambda: env.d.runtime  # noqa: E731
    stop = pb.StopContainerRequest(container_id=cid, timeout=10)
    remove = pb.RemoveContainerRequest(container_id=cid)
    if step in ("container.stop.signalled", "container.exit.recorded",
                "container.release.runtime_deleted"):
        _crash_and_retry(env, crasher, step, "StopContainer", stop)
        assert env.status(cid).status.state == pb.CONTAINER_EXITED
    elif step.startswith("container.remove."):
        rt().StopContainer(stop)
        _crash_and_retry(env, crasher, step, "RemoveContainer", remove)
        assert not rt().ListContainers(pb.ListContainersRequest()).containers
    elif step.startswith("sandbox.stop."):
        stop_pod = pb.StopPodSandboxRequest(pod_sandbox_id=pod)
        _crash_and_retry(env, crasher, step, "StopPodSandbox", stop_pod)
        st = rt().PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod))
        assert st.status.state == pb.SANDBOX_NOTREADY
        assert env.status(cid).status.state == pb.CONTAINER_EXITED
    elif step.startswith("sandbox.remove."):
        remove_pod = pb.RemovePodSandboxRequest(pod_sandbox_id=pod)
        _crash_and_retry(env, crasher, step, "RemovePodSandbox", remove_pod)
        assert not rt().ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert not rt().ListContainers(pb.ListContainersRequest()).containers
    else:
        raise AssertionError(f"no scenario for {step}")


# ---------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def layered_ref(registry: Registry) -> str:
    extra = Layer().add_dir("data").add_file("data/blob", os.urandom(200_000))
    image = Image(layers=[busybox_layer_builder().build("gzip"), extra.build("gzip")],
                  labels={"suite": "crashpoints"})
    push_image(registry, "stress/crash-layers", "1", image)
    return registry.ref("stress/crash-layers", "1")


def _image_files(d: Daemon) -> dict[str, list[str]]:
    images = d.root / "images"
    return {sub: sorted(p.name for p in (images / sub).iterdir())
            for sub in ("layers", "layer-meta", "records", "blobs/sha256", "ingest")
            if (images / sub).is_dir()}


@pytest.mark.parametrize("call", ["PullImage", "RemoveImage"])
def test_image_crash_at_each_step_then_retry(tmp_path: Path, registry: Registry,
                                             layered_ref: str, call: str) -> None:
    armed = tmp_path / "crashpoint"
    d = Daemon(tmp_path / "d", registries_conf_text=insecure_conf(registry),
               env={ENV: f"{FILE_PREFIX}{armed}"})
    crasher = Crasher(d, armed)
    d.start()
    spec = pb.ImageSpec(image=layered_ref)
    try:
        for step in CALLS[call]:
            if call == "PullImage":
                with crasher.armed(step):
                    _crashes(lambda: d.images.PullImage(pb.PullImageRequest(image=spec)))
                left = _image_files(d)
                assert not [n for n in left["layers"] if n.startswith(".tmp")], (step, left)
                d.images.PullImage(pb.PullImageRequest(image=spec))
                st = d.images.ImageStatus(pb.ImageStatusRequest(image=spec)).image
                assert st.id and layered_ref in st.repo_tags, step
            else:
                d.images.PullImage(pb.PullImageRequest(image=spec))
                with crasher.armed(step):
                    _crashes(lambda: d.images.RemoveImage(pb.RemoveImageRequest(image=spec)))
                assert not d.images.ImageStatus(pb.ImageStatusRequest(image=spec)).image.id
            d.images.RemoveImage(pb.RemoveImageRequest(image=spec))
            d.restart()  # what a removal leaves is collected at the latest by the next start
            assert not d.images.ListImages(pb.ListImagesRequest()).images, step
            left = _image_files(d)
            assert all(v == [] for v in left.values()), (step, left)
    finally:
        d.stop()
