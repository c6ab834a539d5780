"""kubelet's relist against a real daemon: ListContainers / ListPodSandbox with an empty
filter, as kubelet sends it every second, follow every change (the answers are cached
between changes: server/msgcache.py)."""

from __future__ import annotations

import os

import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, busybox_ref, env  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def relist(e: Env) -> dict[str, int]:
    """id -> state of every container, as kubelet's PLEG relist asks (empty filter)."""
    plain = e.rt.ListContainers(pb.ListContainersRequest()).containers
    empty = e.rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter())).containers
    assert list(plain) == list(empty)
    return {c.id: c.state for c in plain}


def pods(e: Env) -> dict[str, int]:
    plain = e.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    empty = e.rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter())).items
    assert list(plain) == list(empty)
    return {p.id: p.state for p in plain}


def test_relist_follows_the_lifecycle(env: Env) -> None:  # noqa: F811 (fixture)
    pod = env.pod()
    assert pods(env) == {pod: pb.SANDBOX_READY}
    assert relist(env) == {}
    cid = env.create(pod, env.config("c", ["sleep", "1000"]))
    assert relist(env) == {cid: pb.CONTAINER_CREATED}
    assert relist(env) == {cid: pb.CONTAINER_CREATED}  # unchanged: the same answer
    env.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    assert relist(env) == {cid: pb.CONTAINER_RUNNING}
    done = env.run(pod, "done", ["true"])
    env.wait_state(done, pb.CONTAINER_EXITED)
    # An exit the daemon learnt by itself (no RPC changed it) shows too.
    assert relist(env) == {cid: pb.CONTAINER_RUNNING, done: pb.CONTAINER_EXITED}
    [listed] = [c for c in env.rt.ListContainers(pb.ListContainersRequest()).containers
                if c.id == cid]
    assert (listed.pod_sandbox_id, listed.metadata.name, dict(listed.labels),
            dict(listed.annotations), listed.image.image, listed.image_ref) == (
        pod, "c", {"c": "c"}, {"note": "verbatim"}, env.image, env.image_ref)
    assert listed.created_at == env.status(cid).status.created_at
    flt = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
    assert [c.id for c in env.rt.ListContainers(
        pb.ListContainersRequest(filter=flt)).containers] == [cid]
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    assert relist(env) == {cid: pb.CONTAINER_EXITED, done: pb.CONTAINER_EXITED}
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=done))
    assert relist(env) == {cid: pb.CONTAINER_EXITED}
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert pods(env) == {pod: pb.SANDBOX_NOTREADY}
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert pods(env) == {} and relist(env) == {}
