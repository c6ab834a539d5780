"""Pod and container metrics for ``ListPodSandboxMetrics``, under cAdvisor's names.

kubelet's ``/metrics/cadvisor`` (with ``PodAndContainerStatsFromCRI``) turns each
descriptor of ``ListMetricDescriptors`` into a Prometheus metric of the same name, help and
label keys, and each CRI ``Metric`` into one sample. So the names are cAdvisor's
(``container_cpu_usage_seconds_total``, ``container_memory_working_set_bytes``,
``container_network_receive_bytes_total``...), and the labels are those kubelet's own
cAdvisor gives them: ``container``, ``id`` (the cgroup path), ``image``, ``name`` (the
container or sandbox id), ``namespace`` and ``pod``, then the metric's own (``cpu``,
``interface``, ``device``, ``failure_type``/``scope``). Pod-level samples (the pod cgroup,
the pod's network) have ``container=""`` and ``image=""``, as cAdvisor's pod cgroup series.

CRI metric values are unsigned integers: seconds are whole seconds (as CRI-O reports them).
Samples are gathered live, so their timestamp is 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from moorage.stats.cgroup import CgroupStats
from moorage.stats.collector import ContainerStats, NetworkStats, PodStats

__all__ = [
    "BASE_LABELS",
    "DESCRIPTORS",
    "GROUPS",
    "Descriptor",
    "PodMetrics",
    "Sample",
    "descriptors",
    "pod_metrics",
]

Kind = Literal["counter", "gauge"]
NS_PER_S = 1_000_000_000

#: The label keys every sample starts with, in this order.
BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")


@dataclass(frozen=True)
class Descriptor:
    name: str
    help: str
    kind: Kind
    group: str
    extra_labels: tuple[str, ...] = ()

    @property
    def label_keys(self) -> tuple[str, ...]:
        return (*BASE_LABELS, *self.extra_labels)


@dataclass(frozen=True)
class Sample:
    name: str
    kind: Kind
    label_values: tuple[str, ...]
    value: int


@dataclass(frozen=True)
class PodMetrics:
    pod_sandbox_id: str
    samples: tuple[Sample, ...]
    containers: tuple[tuple[str, tuple[Sample, ...]], ...]  # (container id, samples)


def _d(group: str, kind: Kind, name: str, help_: str, *extra: str) -> Descriptor:
    return Descriptor(name, help_, kind, group, extra)


DESCRIPTORS: tuple[Descriptor, ...] = (
    # cpu
    _d("cpu", "counter", "container_cpu_usage_seconds_total",
       "Cumulative cpu time consumed in seconds.", "cpu"),
    _d("cpu", "counter", "container_cpu_user_seconds_total",
       "Cumulative user cpu time consumed in seconds."),
    _d("cpu", "counter", "container_cpu_system_seconds_total",
       "Cumulative system cpu time consumed in seconds."),
    _d("cpu", "counter", "container_cpu_cfs_periods_total",
       "Number of elapsed enforcement period intervals."),
    _d("cpu", "counter", "container_cpu_cfs_throttled_periods_total",
       "Number of throttled period intervals."),
    _d("cpu", "counter", "container_cpu_cfs_throttled_seconds_total",
       "Total time duration the container has been throttled."),
    # memory
    _d("memory", "gauge", "container_memory_usage_bytes",
       "Current memory usage in bytes, including all memory regardless of when it was "
       "accessed"),
    _d("memory", "gauge", "container_memory_working_set_bytes",
       "Current working set in bytes."),
    _d("memory", "gauge", "container_memory_rss", "Size of RSS in bytes."),
    _d("memory", "gauge", "container_memory_cache", "Number of bytes of page cache memory."),
    _d("memory", "gauge", "container_memory_mapped_file",
       "Size of memory mapped files in bytes."),
    _d("memory", "gauge", "container_memory_kernel_usage",
       "Size of kernel memory allocated in bytes."),
    _d("memory", "gauge", "container_memory_swap", "Container swap usage in bytes."),
    _d("memory", "gauge", "container_memory_max_usage_bytes",
       "Maximum memory usage recorded in bytes"),
    _d("memory", "counter", "container_memory_failcnt",
       "Number of memory usage hits limits"),
    _d("memory", "counter", "container_memory_failures_total",
       "Cumulative count of memory allocation failures.", "failure_type", "scope"),
    # network (pod level: the containers of a pod share its network namespace)
    _d("network", "counter", "container_network_receive_bytes_total",
       "Cumulative count of bytes received", "interface"),
    _d("network", "counter", "container_network_receive_packets_total",
       "Cumulative count of packets received", "interface"),
    _d("network", "counter", "container_network_receive_packets_dropped_total",
       "Cumulative count of packets dropped while receiving", "interface"),
    _d("network", "counter", "container_network_receive_errors_total",
       "Cumulative count of errors encountered while receiving", "interface"),
    _d("network", "counter", "container_network_transmit_bytes_total",
       "Cumulative count of bytes transmitted", "interface"),
    _d("network", "counter", "container_network_transmit_packets_total",
       "Cumulative count of packets transmitted", "interface"),
    _d("network", "counter", "container_network_transmit_packets_dropped_total",
       "Cumulative count of packets dropped while transmitting", "interface"),
    _d("network", "counter", "container_network_transmit_errors_total",
       "Cumulative count of errors encountered while transmitting", "interface"),
    # oom
    _d("oom", "counter", "container_oom_events_total",
       "Count of out of memory events observed for the container"),
    # process
    _d("process", "gauge", "container_processes",
       "Number of processes running inside the container."),
    _d("process", "gauge", "container_threads_max",
       "Maximum number of threads allowed inside the container, infinity if value is zero"),
    # disk: the writable layer
    _d("disk", "gauge", "container_fs_usage_bytes",
       "Number of bytes that are consumed by the container on this filesystem."),
    _d("disk", "gauge", "container_fs_inodes_usage",
       "Number of inodes that are consumed by the container on this filesystem."),
    # disk I/O
    _d("diskIO", "counter", "container_fs_reads_bytes_total",
       "Cumulative count of bytes read", "device"),
    _d("diskIO", "counter", "container_fs_writes_bytes_total",
       "Cumulative count of bytes written", "device"),
    _d("diskIO", "counter", "container_fs_reads_total",
       "Cumulative count of reads completed", "device"),
    _d("diskIO", "counter", "container_fs_writes_total",
       "Cumulative count of writes completed", "device"),
    # spec
    _d("spec", "gauge", "container_spec_cpu_period", "CPU period of the container."),
    _d("spec", "gauge", "container_spec_cpu_quota", "CPU quota of the container."),
    _d("spec", "gauge", "container_spec_cpu_shares", "CPU share of the container."),
    _d("spec", "gauge", "container_spec_memory_limit_bytes",
       "Memory limit for the container."),
    _d("spec", "gauge", "container_spec_memory_reservation_limit_bytes",
       "Memory reservation limit for the container."),
    _d("spec", "gauge", "container_spec_memory_swap_limit_bytes",
       "Memory swap limit for the container."),
    # always
    _d("", "gauge", "container_last_seen", "Last time a container was seen by the exporter"),
    _d("", "gauge", "container_start_time_seconds",
       "Start time of the container since unix epoch in seconds."),
)
GROUPS = frozenset(d.group for d in DESCRIPTORS if d.group)
_BY_NAME = {d.name: d for d in DESCRIPTORS}


def descriptors(groups: Iterable[str] | None = None) -> list[Descriptor]:
    """The descriptors of ``groups`` (None: all) plus the group-less ones."""
    wanted = GROUPS if groups is None else frozenset(groups)
    return [d for d in DESCRIPTORS if not d.group or d.group in wanted]


class _Builder:
    def __init__(self, base: tuple[str, ...], groups: frozenset[str]) -> None:
        self.base = base
        self.groups = groups
        self.samples: list[Sample] = []

    def add(self, name: str, value: int | None, *extra: str) -> None:
        desc = _BY_NAME[name]
        if value is None or (desc.group and desc.group not in self.groups):
            return
        self.samples.append(Sample(name, desc.kind, (*self.base, *extra), max(int(value), 0)))


def _seconds(ns: int | None) -> int | None:
    return None if ns is None else ns // NS_PER_S


def _cgroup_samples(b: _Builder, stats: CgroupStats | None) -> None:
    if stats is None:
        return
    cpu = stats.cpu
    if cpu is not None:
        b.add("container_cpu_usage_seconds_total", _seconds(cpu.usage_ns), "total")
        b.add("container_cpu_user_seconds_total", _seconds(cpu.user_ns))
        b.add("container_cpu_system_seconds_total", _seconds(cpu.system_ns))
        b.add("container_cpu_cfs_periods_total", cpu.periods)
        b.add("container_cpu_cfs_throttled_periods_total", cpu.throttled_periods)
        b.add("container_cpu_cfs_throttled_seconds_total", _seconds(cpu.throttled_ns))
    mem = stats.memory
    if mem is not None:
        b.add("container_memory_usage_bytes", mem.usage)
        b.add("container_memory_working_set_bytes", mem.working_set)
        b.add("container_memory_rss", mem.rss)
        b.add("container_memory_cache", mem.cache)
        b.add("container_memory_mapped_file", mem.mapped_file)
        b.add("container_memory_kernel_usage", mem.kernel)
        b.add("container_memory_swap", mem.swap_usage)
        b.add("container_memory_max_usage_bytes", mem.max_usage)
        b.add("container_memory_failcnt", mem.failcnt)
        failures = "container_memory_failures_total"
        b.add(failures, mem.own_page_faults, "pgfault", "container")
        b.add(failures, mem.own_major_page_faults, "pgmajfault", "container")
        b.add(failures, mem.page_faults, "pgfault", "hierarchy")
        b.add(failures, mem.major_page_faults, "pgmajfault", "hierarchy")
        b.add("container_oom_events_total", mem.oom_kills)
    if stats.pids is not None:
        b.add("container_processes", stats.pids.current)
        b.add("container_threads_max", stats.pids.limit or 0)


def _spec_samples(b: _Builder, stats: CgroupStats | None) -> None:
    if stats is None:
        return
    if stats.cpu is not None and stats.cpu.spec is not None:
        spec = stats.cpu.spec
        b.add("container_spec_cpu_period", spec.period_us or None)
        b.add("container_spec_cpu_quota", spec.quota_us if spec.quota_us > 0 else None)
        b.add("container_spec_cpu_shares", spec.shares or None)
    if stats.memory is not None:
        mem = stats.memory
        b.add("container_spec_memory_limit_bytes", mem.limit or 0)
        b.add("container_spec_memory_reservation_limit_bytes", mem.reservation or 0)
        b.add("container_spec_memory_swap_limit_bytes", mem.swap_limit or 0)


def _io_samples(b: _Builder, stats: CgroupStats | None) -> None:
    if stats is None or stats.io is None:
        return
    for dev in stats.io.devices:
        b.add("container_fs_reads_bytes_total", dev.read_bytes, dev.name)
        b.add("container_fs_writes_bytes_total", dev.write_bytes, dev.name)
        b.add("container_fs_reads_total", dev.reads, dev.name)
        b.add("container_fs_writes_total", dev.writes, dev.name)


def _network_samples(b: _Builder, net: NetworkStats | None) -> None:
    if net is None:
        return
    for i in net.interfaces:
        b.add("container_network_receive_bytes_total", i.rx_bytes, i.name)
        b.add("container_network_receive_packets_total", i.rx_packets, i.name)
        b.add("container_network_receive_packets_dropped_total", i.rx_dropped, i.name)
        b.add("container_network_receive_errors_total", i.rx_errors, i.name)
        b.add("container_network_transmit_bytes_total", i.tx_bytes, i.name)
        b.add("container_network_transmit_packets_total", i.tx_packets, i.name)
        b.add("container_network_transmit_packets_dropped_total", i.tx_dropped, i.name)
        b.add("container_network_transmit_errors_total", i.tx_errors, i.name)


def container_samples(s: ContainerStats, pod: PodStats, groups: frozenset[str],
                      now_s: int) -> tuple[Sample, ...]:
    c, sb = s.container, pod.sandbox
    b = _Builder((c.spec.name, s.cgroup_path, c.image.name, c.id, sb.spec.namespace,
                  sb.spec.name), groups)
    _cgroup_samples(b, s.cgroup)
    _spec_samples(b, s.cgroup)
    _io_samples(b, s.cgroup)
    if s.writable_layer is not None:
        b.add("container_fs_usage_bytes", s.writable_layer.used_bytes)
        b.add("container_fs_inodes_usage", s.writable_layer.inodes_used)
    b.add("container_last_seen", now_s)
    if c.started_at:
        b.add("container_start_time_seconds", c.started_at // NS_PER_S)
    return tuple(b.samples)


def pod_metrics(pods: Iterable[PodStats], groups: Iterable[str] | None = None,
                clock: Callable[[], float] = time.time) -> list[PodMetrics]:
    """The samples of each pod (its cgroup and network) and of each of its containers."""
    wanted = GROUPS if groups is None else frozenset(groups)
    now_s = int(clock())
    out = []
    for pod in pods:
        sb = pod.sandbox
        b = _Builder(("", pod.cgroup_path, "", sb.id, sb.spec.namespace, sb.spec.name), wanted)
        _cgroup_samples(b, pod.cgroup)
        _network_samples(b, pod.network)
        b.add("container_last_seen", now_s)
        b.add("container_start_time_seconds", sb.created_at // NS_PER_S)
        containers = tuple((s.container.id, container_samples(s, pod, wanted, now_s))
                           for s in pod.containers)
        out.append(PodMetrics(sb.id, tuple(b.samples), containers))
    return out
