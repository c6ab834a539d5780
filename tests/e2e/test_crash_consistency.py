"""kill -9 of the daemon while pods and containers are being built: the next daemon
reconciles everything, and removing what it reports leaves the node clean."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.sandbox import cgroups
from tests.e2e.test_containers import Env, busybox_ref, running_env  # noqa: F401
from tests.e2e.test_sandboxes import assert_node_clean
from tests.fixtures.daemon import Daemon
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PODS = 6


def _build_pod(env: Env, rt: pb_grpc.RuntimeServiceStub, k: int, stop: threading.Event
               ) -> None:
    """RunPodSandbox, then two containers created and started, as kubelet would; any call
    may fail once the daemon is gone."""
    name = f"crash{k}"
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="ns", uid=f"uid-{name}"),
        hostname=name, log_directory=str(env.tmp / "logs" / name))
    with contextlib.suppress(grpc.RpcError):
        pod = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60)
        for c in ("app", "side"):
            if stop.is_set():
                return
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod.pod_sandbox_id, sandbox_config=cfg,
                config=env.config(c, ["sleep", "1000"])), timeout=60).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)


def _mounts_under(*paths: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if any(f" {p}/" in line for p in paths)]


def _entries(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.is_dir() else []


def _default_parent_children() -> set[str]:
    """The pod cgroups under moorage's default parent (pods that name no parent get one
    there), in every hierarchy."""
    parent = cgroups.PodCgroup(cgroups.Layout.detect(), cgroups.pod_cgroup_path("", "cgroupfs"))
    return {f"{d}/{n}" for d in parent.dirs() for n in _entries(d) if (d / n).is_dir()}


def remove_everything(rt: pb_grpc.RuntimeServiceStub) -> None:
    """Stop and remove every pod and container the daemon reports, as kubelet's cleanup
    would; then it reports none."""
    for item in rt.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=item.id))
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=item.id))
    for c in rt.ListContainers(pb.ListContainersRequest()).containers:
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id))
    assert not rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert not rt.ListContainers(pb.ListContainersRequest()).containers


def _pod_cgroups_of(d: Daemon) -> set[str]:
    """The pod cgroups under moorage's default parent that this daemon's pods had (the
    parent is shared with every other daemon of the machine: only ours are looked at)."""
    ids = set(re.findall(r"pod_sandbox_id=([0-9a-f]{64})", d.log_path.read_text()))
    return {p for p in _default_parent_children() if p.rsplit("/", 1)[1] in
            {i[:16] for i in ids}}


def assert_nothing_left(d: Daemon, node_ns: str, tmp_path: Path,
                        handlers: tuple[str, ...] = ("runc",)) -> None:
    """Once every pod and container is removed: nothing of them is left on the node (pins,
    mounts, veths, IPs, records, writable layers, CNI cache, the runtimes' containers,
    pod cgroups and the infra processes they would keep)."""
    assert_node_clean(d, node_ns, tmp_path)
    assert _mounts_under(d.root) == []
    assert _entries(d.root / "containers") == []
    assert [n for n in _entries(d.root / "overlay" / "containers")
            if not n.startswith(".")] == []
    assert _entries(d.root / "network" / "cni-cache") == []
    for handler in handlers:
        runc = subprocess.run(["runc", "--root", str(d.runroot / "runtimes" / handler),
                               "list", "-q"], capture_output=True, text=True, check=False)
        assert runc.stdout.split() == [], handler
    assert _pod_cgroups_of(d) == set()


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.6])
def test_kill9_while_pods_and_containers_are_built(
        tmp_path: Path, node_ns: str, cni_dir: Path, registry: Registry,
        busybox_ref: str, delay: float) -> None:  # noqa: F811
    with running_env(tmp_path, node_ns, cni_dir, registry, busybox_ref) as env:
        stop = threading.Event()
        # A channel of the builders' own: the fixture closes its channel when it kills
        # the daemon, and grpc must not see a channel closed under calls in flight.
        with grpc.insecure_channel(f"unix:{env.d.socket}") as channel, \
                concurrent.futures.ThreadPoolExecutor(PODS) as pool:
            rt = pb_grpc.RuntimeServiceStub(channel)
            jobs = [pool.submit(_build_pod, env, rt, k, stop) for k in range(PODS)]
            time.sleep(delay)
            env.d.kill9()
            stop.set()
            for job in jobs:
                job.result()
        env.d.start()
        env.rt = env.d.runtime
        # Whatever the new daemon reports can be removed, and then nothing is left.
        remove_everything(env.rt)
        assert_nothing_left(env.d, node_ns, tmp_path)
