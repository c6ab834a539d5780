"""Stats and metrics from cgroup v2 on the node, for containers and pods: CPU, memory
working set, swap, pids, IO and PSI (the CRI 1.36 fields), through the node's socket."""

from __future__ import annotations

from pathlib import Path

from moorage.cri.v1 import api_pb2 as pb
from tests.node.conftest import MIB, Node, cgroup_of, read, wait_for

BUSY = ["sh", "-c", "while :; do :; done"]
#: Holds 40 MiB in a shell variable under a 24 MiB limit: the rest goes to swap. Then
#: writes 8 MiB to its writable layer, synced (disk IO in io.stat).
SWAPPER = ["sh", "-c", "x=$(dd if=/dev/zero bs=1M count=40 2>/dev/null | tr '\\0' a); "
           "dd if=/dev/zero of=/written bs=1M count=8 conv=fsync 2>/dev/null; echo ready; "
           "while :; do sleep 1000; done"]


def test_container_and_pod_stats_and_metrics_from_v2(node: Node) -> None:
    pod, _ = node.kube_pod("stats")
    busy = node.run(pod, "busy", BUSY)
    swapper = node.run(pod, "swapper", SWAPPER, linux=pb.LinuxContainerConfig(
        resources=pb.LinuxContainerResources(memory_limit_in_bytes=24 * MIB,
                                             memory_swap_limit_in_bytes=120 * MIB)))
    wait_for("the swapper to fill its memory", lambda: any(
        b"ready" in line[2] for line in node.log_lines(swapper)), timeout=180)
    psi = Path("/proc/pressure/cpu").exists()

    def stats(cid: str) -> pb.ContainerStats:
        return node.rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats

    wait_for("CPU use", lambda: stats(busy).cpu.usage_core_nano_seconds.value > 0)
    s = stats(busy)
    assert s.memory.working_set_bytes.value > 0 and s.memory.usage_bytes.value > 0
    assert s.memory.rss_bytes.value > 0 and s.memory.page_faults.value > 0
    if psi:
        assert s.cpu.HasField("psi") and s.memory.HasField("psi") and s.io.HasField("psi")
    wait_for("a second sample's rate", lambda: stats(busy).cpu.usage_nano_cores.value > 0)

    # Swap: usage from memory.swap.current, available from memory.swap.max.
    s = stats(swapper)
    assert s.swap.swap_usage_bytes.value > 0
    limit = int(read(cgroup_of(node.pid(swapper)), "memory.swap.max"))
    assert limit == 96 * MIB
    assert s.swap.swap_available_bytes.value == limit - s.swap.swap_usage_bytes.value
    assert s.memory.available_bytes.value <= 24 * MIB
    assert s.writable_layer.used_bytes.value >= 8 * MIB

    pod_stats = node.rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod)).stats
    linux = pod_stats.linux
    assert linux.cpu.usage_core_nano_seconds.value >= s.cpu.usage_core_nano_seconds.value
    assert linux.memory.working_set_bytes.value > 0
    assert linux.process.process_count.value >= 3  # two shells and a sleep, at least
    assert {c.attributes.id for c in linux.containers} == {busy, swapper}
    assert linux.network.default_interface.name == "eth0"
    if psi:
        assert linux.cpu.HasField("psi")

    # Metrics (kubelet's /metrics/cadvisor from CRI): IO by device from io.stat.
    [pm] = [m for m in node.rt.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest())
            .pod_metrics if m.pod_sandbox_id == pod]
    [swapper_cm] = [cm for cm in pm.container_metrics if cm.container_id == swapper]
    swapper_metrics = {m.name: m for m in swapper_cm.metrics}
    for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                 "container_memory_swap", "container_processes",
                 "container_fs_writes_bytes_total", "container_spec_memory_limit_bytes"):
        assert name in swapper_metrics, name
    written = sum(m.value.value for m in swapper_cm.metrics
                  if m.name == "container_fs_writes_bytes_total")
    assert written >= 8 * MIB
    assert swapper_metrics["container_memory_swap"].value.value > 0
    assert swapper_metrics["container_spec_memory_limit_bytes"].value.value == 24 * MIB
