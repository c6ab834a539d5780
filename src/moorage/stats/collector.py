"""Container and pod stats: cgroup counters, CPU rates, writable layers, pod networks.

Reads go off the event loop in one worker thread per call (all cgroups and writable layers
of the request), plus one short-lived thread that visits the pods' network namespaces. The
lists of containers and sandboxes are taken on the loop, from memory, as every List RPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moorage import log
from moorage.container.manager import ContainerFilter, ContainerManager
from moorage.container.model import Container
from moorage.errors import MoorageError
from moorage.sandbox.cgroups import Layout
from moorage.sandbox.manager import SandboxManager
from moorage.sandbox.model import Sandbox
from moorage.sandbox.model import State as SandboxState
from moorage.stats import cgroup, network
from moorage.stats.cgroup import CgroupLocation, CgroupStats
from moorage.stats.network import InterfaceStats
from moorage.stats.rate import MIN_WINDOW_NS, RateTracker

__all__ = [
    "ContainerStats",
    "FsStats",
    "NetworkStats",
    "PodStats",
    "StatsCollector",
]

_log = log.get("moorage.stats")


@dataclass(frozen=True)
class FsStats:
    timestamp_ns: int
    mountpoint: str
    used_bytes: int
    inodes_used: int


@dataclass(frozen=True)
class NetworkStats:
    timestamp_ns: int
    default: InterfaceStats | None
    interfaces: tuple[InterfaceStats, ...]  # all but lo, the default included

    @property
    def others(self) -> tuple[InterfaceStats, ...]:
        return tuple(i for i in self.interfaces if i is not self.default)


@dataclass(frozen=True)
class ContainerStats:
    container: Container
    timestamp_ns: int
    cgroup_path: str  # "" when unknown
    cgroup: CgroupStats | None
    nano_cores: int | None
    writable_layer: FsStats | None


@dataclass(frozen=True)
class PodStats:
    sandbox: Sandbox
    timestamp_ns: int
    cgroup_path: str
    cgroup: CgroupStats | None
    nano_cores: int | None
    network: NetworkStats | None
    containers: tuple[ContainerStats, ...]


@dataclass(frozen=True)
class _Target:
    """What a worker thread needs to read for one container (no live objects)."""

    id: str
    location: CgroupLocation | None
    storage: bool


def _container_key(container_id: str) -> str:
    return f"c:{container_id}"


def _pod_key(sandbox_id: str) -> str:
    return f"p:{sandbox_id}"


class StatsCollector:
    def __init__(
        self,
        containers: ContainerManager,
        sandboxes: SandboxManager,
        *,
        layout: Layout | None = None,
        min_window_ns: int = MIN_WINDOW_NS,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.containers = containers
        self.sandboxes = sandboxes
        self.layout = layout if layout is not None else sandboxes.layout
        self.rates = RateTracker(min_window_ns)
        self.clock = clock
        self.mountpoint = str(containers.storage.root)

    # -- paths --------------------------------------------------------------------------

    def container_cgroup(self, c: Container) -> str:
        path = str(c.extra.get("cgroups_path") or "")
        if not path:
            return ""
        try:
            return cgroup.container_cgroup_path(path)
        except MoorageError:
            return ""

    def _location(self, path: str) -> CgroupLocation | None:
        return cgroup.locate(self.layout, path) if path else None

    # -- reads (worker thread) ----------------------------------------------------------

    def _read_one(self, target: _Target) -> tuple[CgroupStats | None, FsStats | None]:
        stats = cgroup.read(target.location, self.clock()) if target.location else None
        fs = None
        if target.storage:
            try:
                used, inodes = self.containers.storage.usage(target.id)
            except (MoorageError, OSError):
                pass
            else:
                fs = FsStats(self.clock(), self.mountpoint, used, inodes)
        return stats, fs

    def _read_all(self, targets: Sequence[_Target]
                  ) -> list[tuple[CgroupStats | None, FsStats | None]]:
        return [self._read_one(t) for t in targets]

    # -- containers ---------------------------------------------------------------------

    def _targets(self, cs: Sequence[Container]) -> tuple[list[str], list[_Target]]:
        paths = [self.container_cgroup(c) for c in cs]
        targets = [
            _Target(c.id, self._location(p), storage=True) for c, p in zip(cs, paths, strict=True)
        ]
        return paths, targets

    def _assemble(self, cs: Sequence[Container], paths: Sequence[str],
                  read: Sequence[tuple[CgroupStats | None, FsStats | None]]
                  ) -> list[ContainerStats]:
        out = []
        for c, path, (stats, fs) in zip(cs, paths, read, strict=True):
            rate = None
            if stats is not None and stats.cpu is not None:
                rate = self.rates.update(_container_key(c.id), stats.timestamp_ns,
                                         stats.cpu.usage_ns, c.started_at or c.created_at)
            ts = stats.timestamp_ns if stats is not None else (
                fs.timestamp_ns if fs is not None else self.clock())
            out.append(ContainerStats(container=c, timestamp_ns=ts, cgroup_path=path,
                                      cgroup=stats, nano_cores=rate, writable_layer=fs))
        return out

    async def container_stats(self, cs: Sequence[Container]) -> list[ContainerStats]:
        """Stats of the containers ``cs`` (in that order)."""
        if not cs:
            return []
        paths, targets = self._targets(cs)
        read = await asyncio.to_thread(self._read_all, targets)
        result = self._assemble(cs, paths, read)
        self._prune()
        return result

    # -- pods ---------------------------------------------------------------------------

    def netns_path(self, sb: Sandbox) -> str | None:
        if sb.spec.host_network or sb.state != SandboxState.READY:
            return None
        return self.sandboxes.pinned(sb).net

    async def pod_stats(self, sbs: Sequence[Sandbox]) -> list[PodStats]:
        """Stats of the sandboxes ``sbs`` (in that order), with their containers'."""
        if not sbs:
            return []
        pods = [(sb, self.containers.select(ContainerFilter(sandbox_id=sb.id))) for sb in sbs]
        pod_paths = [sb.cgroup_path for sb in sbs]
        pod_targets = [_Target(sb.id, self._location(p), storage=False)
                       for sb, p in zip(sbs, pod_paths, strict=True)]
        all_cs = [c for _, cs in pods for c in cs]
        c_paths, c_targets = self._targets(all_cs)
        netns = {sb.id: p for sb in sbs if (p := self.netns_path(sb)) is not None}

        read, nets = await asyncio.gather(
            asyncio.to_thread(self._read_all, [*pod_targets, *c_targets]),
            network.read_namespaces(sorted(set(netns.values()))),
        )
        net_ts = self.clock()
        pod_read, c_read = read[:len(sbs)], read[len(sbs):]
        c_stats = iter(self._assemble(all_cs, c_paths, c_read))
        out = []
        for (sb, cs), path, (stats, _) in zip(pods, pod_paths, pod_read, strict=True):
            rate = None
            if stats is not None and stats.cpu is not None:
                rate = self.rates.update(_pod_key(sb.id), stats.timestamp_ns,
                                         stats.cpu.usage_ns, sb.created_at)
            net = None
            ns_path = netns.get(sb.id)
            if ns_path is not None:
                found = nets.get(ns_path)
                if isinstance(found, OSError):
                    _log.debug("stats.netns_unreadable", pod_sandbox_id=sb.id,
                               error=str(found))
                elif found is not None:
                    ifaces = tuple(i for i in found if i.name != "lo")
                    net = NetworkStats(net_ts, network.default_interface(ifaces), ifaces)
            out.append(PodStats(
                sandbox=sb, timestamp_ns=stats.timestamp_ns if stats else net_ts,
                cgroup_path=path, cgroup=stats, nano_cores=rate, network=net,
                containers=tuple(next(c_stats) for _ in cs),
            ))
        self._prune()
        return out

    def _prune(self) -> None:
        """Forget the CPU samples of containers and pods that are gone."""
        live = [_container_key(c.id) for c in self.containers.select()]
        live += [_pod_key(sb.id) for sb in self.sandboxes.select()]
        self.rates.retain(live)
