"""Pod and container cgroups on a cgroup v2 node, with the cgroup driver of this part of the
lane: where they are (kubelet's names; with systemd, units), the limits in the v2 files,
live updates, OOM kills. Everything goes through the CRI socket of the node's service."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.sandbox.cgroups import cpu_weight
from tests.e2e.test_containers import rpc_error
from tests.node.conftest import (
    CGROUP,
    MIB,
    Node,
    Service,
    cgroup_of,
    kube_parent,
    read,
    run,
    unit_property,
    wait_for,
)

IDLE = ["sleep", "100000"]


def pod_cgroup(node: Node, parent: str) -> str:
    """The pod cgroup's path for ``linux.cgroup_parent`` (with systemd, as systemd has it)."""
    if node.driver == "systemd":
        return unit_property(parent, "ControlGroup")
    return parent


def slice_path(parent: str) -> str:
    """kubelet's pod slice path, spelled out (not moorage's expansion)."""
    uid_part = parent.removesuffix(".slice").split("-")
    return "/" + "/".join("-".join(uid_part[:i + 1]) + ".slice" for i in range(len(uid_part)))


def test_runtime_config_reports_the_driver(service: Service, node_lane: str) -> None:
    got = service.runtime.RuntimeConfig(pb.RuntimeConfigRequest()).linux.cgroup_driver
    assert got == (pb.SYSTEMD if node_lane == "systemd" else pb.CGROUPFS)


def test_a_parent_of_the_other_driver_is_invalid_and_leaves_nothing(node: Node) -> None:
    other = "cgroupfs" if node.driver == "systemd" else "systemd"
    uid = str(uuid.uuid4())
    parent = kube_parent(other, "burstable", uid)
    e = rpc_error(lambda: node.pod("wrong", uid=uid, cgroup_parent=parent))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cgroup_parent" in (e.details() or "")
    assert not node.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    for name in (uid, uid.replace("-", "_")):
        assert not list(CGROUP.glob(f"**/*{name}*"))


def test_pods_and_containers_where_kubelet_looks(node: Node) -> None:
    pod, parent = node.kube_pod("placed", pid=pb.POD)  # with an infra process
    cid = node.run(pod, "c", IDLE)
    cgroup = cgroup_of(node.pid(cid))
    verbose = node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod,
                                                                  verbose=True))
    infra = json.loads(verbose.info["info"])["pid"]
    assert cgroup_of(infra) == f"{pod_cgroup(node, parent)}/moorage-infra"
    if node.driver == "systemd":
        # The pod slice as kubelet names it, a unit of systemd's; each container in a
        # transient scope of its own in that slice.
        expected = slice_path(parent)
        assert expected.startswith(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod")
        assert unit_property(parent, "ControlGroup") == expected
        assert unit_property(parent, "ActiveState") == "active"
        scope = f"moorage-{cid}.scope"
        assert cgroup == f"{expected}/{scope}"
        assert unit_property(scope, "ControlGroup") == cgroup
        assert unit_property(scope, "Transient") == "yes"
        assert unit_property(scope, "Slice") == parent
        assert unit_property(scope, "ActiveState") == "active"
    else:
        assert cgroup == f"{parent}/moorage-{cid}"
    node.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10))
    node.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    # moorage made the pod cgroup (no kubelet here): it is gone with the pod.
    pod_dir = CGROUP / (slice_path(parent) if node.driver == "systemd" else parent).lstrip("/")
    wait_for("the pod cgroup to go", lambda: not pod_dir.exists())
    if node.driver == "systemd":
        assert unit_property(f"moorage-{cid}.scope", "ActiveState") == "inactive"
        assert unit_property(parent, "ActiveState") == "inactive"


def kubelet_makes_pod_cgroup(driver: str, parent: str, memory: int) -> str:
    """What kubelet does before RunPodSandbox: the pod cgroup with its limits (a transient
    slice over D-Bus with the systemd driver, a directory with cgroupfs)."""
    if driver == "systemd":
        run("busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
            parent, "replace", "2", "MemoryMax", "t", str(memory), "MemoryAccounting", "b",
            "true", "0")
        wait_for("the pod slice", lambda: unit_property(parent, "ActiveState") == "active")
        return unit_property(parent, "ControlGroup")
    for level in ("/kubepods", "/kubepods/burstable", parent):
        d = CGROUP / level.lstrip("/")
        d.mkdir(exist_ok=True)
        (d.parent / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    (CGROUP / parent.lstrip("/") / "memory.max").write_text(str(memory))
    return parent


def test_a_pod_cgroup_kubelet_made_is_used_and_kept(node: Node) -> None:
    uid = str(uuid.uuid4())
    parent = kube_parent(node.driver, "burstable", uid)
    path = kubelet_makes_pod_cgroup(node.driver, parent, 200 * MIB)
    try:
        pod, _ = node.kube_pod("kubelets", uid=uid)
        cid = node.run(pod, "c", IDLE)
        assert cgroup_of(node.pid(cid)).startswith(path + "/")
        assert read(path, "memory.max") == str(200 * MIB)
        node.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
        # kubelet's: kept, limits untouched.
        assert (CGROUP / path.lstrip("/")).is_dir()
        assert read(path, "memory.max") == str(200 * MIB)
    finally:
        if node.driver == "systemd":
            run("systemctl", "stop", parent)
        else:
            (CGROUP / parent.lstrip("/")).rmdir()


LIMITS = pb.LinuxContainerResources(
    cpu_shares=512, cpu_quota=50_000, cpu_period=100_000, cpuset_cpus="0", cpuset_mems="0",
    memory_limit_in_bytes=64 * MIB, memory_swap_limit_in_bytes=96 * MIB,
    hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=4 * MIB)],
    unified={"memory.high": str(56 * MIB), "pids.max": "77"},
)


def test_container_limits_in_the_v2_files_and_updated_live(node: Node) -> None:
    pod, _ = node.kube_pod("limits")
    cid = node.run(pod, "c", IDLE, linux=pb.LinuxContainerConfig(resources=LIMITS))
    cgroup = cgroup_of(node.pid(cid))
    assert read(cgroup, "cpu.weight") == str(cpu_weight(512))
    assert read(cgroup, "cpu.max") == "50000 100000"
    assert read(cgroup, "cpuset.cpus") == "0" and read(cgroup, "cpuset.mems") == "0"
    assert read(cgroup, "memory.max") == str(64 * MIB)
    assert read(cgroup, "memory.swap.max") == str(32 * MIB)  # v2 limits swap alone
    assert read(cgroup, "memory.high") == str(56 * MIB)
    assert read(cgroup, "pids.max") == "77"
    assert read(cgroup, "hugetlb.2MB.max") == str(4 * MIB)
    # UpdateContainerResources: the runtime's update, live.
    new = pb.LinuxContainerResources()
    new.CopyFrom(LIMITS)
    new.cpu_quota, new.cpu_shares = 20_000, 1024
    new.memory_limit_in_bytes, new.memory_swap_limit_in_bytes = 80 * MIB, 80 * MIB
    node.rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=new))
    assert read(cgroup, "cpu.max") == "20000 100000"
    assert read(cgroup, "cpu.weight") == str(cpu_weight(1024))
    assert read(cgroup, "memory.max") == str(80 * MIB)
    assert read(cgroup, "memory.swap.max") == "0"
    status = node.status(cid).status
    assert status.resources.linux.memory_limit_in_bytes == 80 * MIB
    assert status.resources.linux.cpu_quota == 20_000
    if node.driver == "systemd":
        # systemd knows them too: a reload of its units keeps them.
        run("systemctl", "daemon-reload")
        assert read(cgroup, "memory.max") == str(80 * MIB)
        assert read(cgroup, "cpu.max") == "20000 100000"


def test_pod_limits_and_update_pod_sandbox_resources(node: Node) -> None:
    pod_res = pb.LinuxContainerResources(cpu_shares=256, cpu_quota=150_000, cpu_period=100_000,
                                         memory_limit_in_bytes=128 * MIB)
    pod, parent = node.kube_pod("podlimits", resources=pod_res)
    # A container starting in the pod: with systemd, the slice becomes a realized unit here.
    node.run(pod, "c", IDLE)
    path = pod_cgroup(node, parent)
    assert read(path, "memory.max") == str(128 * MIB)
    assert read(path, "cpu.max") == "150000 100000"
    assert read(path, "cpu.weight") == str(cpu_weight(256))
    node.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod,
        resources=pb.LinuxContainerResources(cpu_shares=512, cpu_quota=250_000,
                                             cpu_period=100_000,
                                             memory_limit_in_bytes=256 * MIB),
        overhead=pb.LinuxContainerResources(memory_limit_in_bytes=16 * MIB)))
    assert read(path, "memory.max") == str(272 * MIB)
    assert read(path, "cpu.max") == "250000 100000"
    assert read(path, "cpu.weight") == str(cpu_weight(512))
    if node.driver == "systemd":
        assert unit_property(parent, "MemoryMax") == str(272 * MIB)
        run("systemctl", "daemon-reload")
        node.run(pod, "d", IDLE)  # another scope in the slice
        assert read(path, "memory.max") == str(272 * MIB)
        assert read(path, "cpu.max") == "250000 100000"


def test_an_oom_kill_is_reported_as_oomkilled_137(node: Node) -> None:
    pod, _ = node.kube_pod("oom")
    res = pb.LinuxContainerResources(memory_limit_in_bytes=24 * MIB,
                                     memory_swap_limit_in_bytes=24 * MIB)
    cid = node.run(pod, "hog", ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
                   linux=pb.LinuxContainerConfig(resources=res))
    status = node.wait_state(cid, pb.CONTAINER_EXITED, timeout=120)
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 137,
                                                                "OOMKilled")


@pytest.mark.parametrize("handler", ["crun"])
def test_a_second_runtime_handler_runs_for_real(node: Node, handler: str) -> None:
    status = node.rt.Status(pb.StatusRequest())
    assert handler in {h.name for h in status.runtime_handlers}
    uid = str(uuid.uuid4())
    parent = kube_parent(node.driver, "burstable", uid)
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="crun", namespace="ns", uid=uid), hostname="crun",
        log_directory=str(node.tmp / "logs" / "crun"))
    cfg.linux.cgroup_parent = parent
    pod = node.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler),
                                timeout=120).pod_sandbox_id
    node.last_pod_config = cfg
    res = pb.LinuxContainerResources(memory_limit_in_bytes=48 * MIB, cpu_shares=256)
    cid = node.run(pod, "c", ["sh", "-c", "echo from-$0; exec sleep 100000", handler],
                   linux=pb.LinuxContainerConfig(resources=res))
    assert node.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    pid = node.pid(cid)
    assert Path(f"/proc/{pid}/exe").resolve().name == "busybox"
    cgroup = cgroup_of(pid)
    # crun may put the process in a child of the cgroup it was given: the limit is above it.
    limited = cgroup
    while limited != "/" and read(limited, "memory.max") == "max":
        limited = str(Path(limited).parent)
    assert read(limited, "memory.max") == str(48 * MIB)
    assert f"moorage-{cid}" in cgroup
    result = node.exec(cid, ["cat", "/proc/self/cgroup"])
    assert result.exit_code == 0 and result.stdout.startswith(b"0::")
    pod_status = node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod))
    assert pod_status.status.runtime_handler == handler
    node.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=5))
    assert node.wait_state(cid, pb.CONTAINER_EXITED).exit_code in (137, 143)


def test_a_pod_without_a_parent_gets_a_cgroup_of_its_own(node: Node) -> None:
    """crictl and critest send no cgroup_parent: the pod gets /moorage/<id> or the slice
    moorage-pod<id>.slice, and its containers run inside."""
    pod = node.pod("orphan")
    cid = node.run(pod, "c", IDLE)
    cgroup = cgroup_of(node.pid(cid))
    if node.driver == "systemd":
        slice_name = f"moorage-pod{pod[:16]}.slice"
        assert cgroup == f"/moorage.slice/{slice_name}/moorage-{cid}.scope"
        assert unit_property(slice_name, "ActiveState") == "active"
    else:
        assert cgroup == f"/moorage/{pod[:16]}/moorage-{cid}"
    node.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    gone = CGROUP / str(Path(cgroup).parent).lstrip("/")
    wait_for("the pod cgroup to go", lambda: not gone.exists())
