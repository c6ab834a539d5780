"""Resource usage of containers and pods: cgroup v1/v2 readers, CPU rates, pod networks,
and cAdvisor-named metrics for ``ListPodSandboxMetrics``."""

from moorage.stats.collector import ContainerStats, NetworkStats, PodStats, StatsCollector

__all__ = ["ContainerStats", "NetworkStats", "PodStats", "StatsCollector"]
