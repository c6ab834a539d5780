"""Load: many pods and many clients on the 2-core machine while pulls and CNI are slow.

    sudo .venv/bin/python -m bench.load [--pods 100] [--clients 32] [--steady 60]

The node of bench/soak.py (its own namespace, CNI bridge and registry), with two slow parts
in front of the real ones: every CNI ADD and DEL waits ``--cni-delay`` seconds before the
bridge plugin runs (tests/fixtures/faults.py), and image blobs come through a proxy that
sends ``--registry-rate`` bytes per second (tests/fixtures/stallproxy.py). Of the
``--clients`` client threads, ``--pod-workers`` start the pods (two containers each, as
soak) and, once ``--pods`` run, replace them one by one; ``--pullers`` pull and remove
small images through the proxy; the rest are kubelet-like readers: ListPodSandbox,
ListContainers, PodSandboxStatus and ContainerStatus of what the last list showed, and
ListContainerStats, every ``--read-period`` seconds each.

It prints, for the ramp up to ``--pods`` pods, the steady phase (``--steady`` seconds) and
the teardown, every RPC's count, p50, p99 and max in ms, and the errors. The point: List and
Status stay fast (they are served from memory) while the slow calls wait on their plugins
and downloads. Numbers only; nothing is asserted (docs/reliability.md has a run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.cribench.figures import Bench
from bench.cribench.node import Node
from bench.cribench.stats import percentile
from bench.soak import Calls, TimedRuntime, soak_node, stop_on_signals
from moorage.cri.v1 import api_pb2 as pb
from tests.fixtures.faults import slow_cni_wrapper
from tests.fixtures.netns import entered
from tests.fixtures.stallproxy import StallProxy

TIMEOUT = 300
#: The calls whose latency the load is about (served from memory).
READS = ("ListPodSandbox", "ListContainers", "PodSandboxStatus", "ContainerStatus",
         "ListContainerStats")


@dataclass
class LoadOptions:
    pods: int = 100
    clients: int = 32
    pod_workers: int = 8
    pullers: int = 4
    steady: float = 60.0
    cni_delay: float = 1.0
    registry_rate: int = 128 * 1024
    read_period: float = 0.1


@dataclass
class Phase:
    name: str
    calls: Calls = field(default_factory=Calls)
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, int, float, float, float]]:
        return [(rpc, len(v), percentile(v, 50), percentile(v, 99), max(v))
                for rpc, v in sorted(self.calls.ms.items())]


def slow_parts(opts: LoadOptions, proxies: list[StallProxy]) -> Any:
    """``prepare`` for soak_node: the slow CNI plugin and the slow registry proxy."""

    def prepare(node: Node) -> dict[str, Any]:
        plugins = node.base / "slow-plugins"
        slow_cni_wrapper(plugins, "slowbridge", node.cni_bin_dir / "bridge", opts.cni_delay)
        conf_path = node.cni_conf_dir / "10-bridge.conflist"
        conf = json.loads(conf_path.read_text())
        conf["plugins"][0]["type"] = "slowbridge"
        conf_path.write_text(json.dumps(conf))
        assert node.registry is not None
        with entered(node.ns_path):  # its listening socket and threads in the namespace
            proxy = StallProxy(node.registry, rate=opts.registry_rate).start()
        node.on_close(proxy.stop)
        proxies.append(proxy)
        return {"extra_args": ["--cni-plugin-dir", str(plugins)], "registries": (proxy,)}

    return prepare


class Load:
    def __init__(self, bench: Bench, runtime: Any, images: list[str], opts: LoadOptions,
                 log: Any = print) -> None:
        self.bench = bench
        self.runtime = runtime
        self.images = images
        self.opts = opts
        self.log = log
        self.phase = Phase("ramp")
        self.phases: list[Phase] = []
        self.pods: dict[str, list[str]] = {}  # pod id -> its containers
        self._pods_lock = threading.Lock()
        self._stop = threading.Event()
        self._k = 0

    def _rt(self, tolerate: tuple[grpc.StatusCode, ...] = ()) -> TimedRuntime:
        return TimedRuntime(self.runtime, self.phase.calls, tolerate)

    def start_pod(self) -> None:
        rt = self._rt()
        with self._pods_lock:
            self._k += 1
            k = self._k
        pod, cfg = self.bench.run_pod(rt, f"load{k}")
        cids = []
        try:
            for name in ("app", "side"):
                cid = self.bench.create(rt, pod, cfg, name)
                self.bench.start(rt, cid)
                cids.append(cid)
        except grpc.RpcError:
            self.bench.remove_pod(rt, pod)
            raise
        with self._pods_lock:
            self.pods[pod] = cids

    def stop_pod(self, pod: str) -> None:
        self.bench.remove_pod(self._rt(), pod)

    def _take_pod(self) -> str | None:
        with self._pods_lock:
            if not self.pods:
                return None
            pod = next(iter(self.pods))
            del self.pods[pod]
            return pod

    def pod_worker(self, ramp: bool) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(grpc.RpcError):
                if ramp:
                    with self._pods_lock:
                        if len(self.pods) + self._starting >= self.opts.pods:
                            return
                        self._starting += 1
                    try:
                        self.start_pod()
                    finally:
                        with self._pods_lock:
                            self._starting -= 1
                else:
                    pod = self._take_pod()
                    if pod is not None:
                        self.stop_pod(pod)
                    self.start_pod()

    def reader(self) -> None:
        rt = self._rt((grpc.StatusCode.NOT_FOUND,)).rt
        pods: list[str] = []
        ctrs: list[str] = []
        i = 0
        while not self._stop.wait(self.opts.read_period):
            rt = self._rt((grpc.StatusCode.NOT_FOUND,)).rt  # the current phase's calls
            i += 1
            with contextlib.suppress(grpc.RpcError):
                if i % 5 == 1:
                    pods = [p.id for p in rt.ListPodSandbox(pb.ListPodSandboxRequest(),
                                                           timeout=TIMEOUT).items]
                elif i % 5 == 2:
                    ctrs = [c.id for c in rt.ListContainers(pb.ListContainersRequest(),
                                                           timeout=TIMEOUT).containers]
                elif i % 5 == 3 and pods:
                    rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
                        pod_sandbox_id=random.choice(pods)), timeout=TIMEOUT)
                elif i % 5 == 4 and ctrs:
                    rt.ContainerStatus(pb.ContainerStatusRequest(
                        container_id=random.choice(ctrs)), timeout=TIMEOUT)
                elif i % 50 == 0:
                    rt.ListContainerStats(pb.ListContainerStatsRequest(), timeout=TIMEOUT)

    def puller(self, n: int) -> None:
        while not self._stop.is_set():
            ref = self.images[n % len(self.images)]
            img = self._rt().img
            with contextlib.suppress(grpc.RpcError):
                img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)),
                              timeout=TIMEOUT)
                img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)),
                                timeout=TIMEOUT)
            n += 1

    def _run(self, name: str, workers: list[threading.Thread], side: list[threading.Thread],
             seconds: float | None) -> None:
        self.phase = Phase(name)
        self.phases.append(self.phase)
        self._stop.clear()
        t0 = time.monotonic()
        for t in workers + side:
            t.start()
        if seconds is None:
            for t in workers:
                t.join()
        else:
            self._stop.wait(seconds)
        self._stop.set()
        for t in workers + side:
            t.join()
        self.phase.seconds = time.monotonic() - t0
        self.log(self.table(self.phase))

    def run(self) -> list[Phase]:
        o = self.opts
        readers = o.clients - o.pod_workers - o.pullers

        def side() -> list[threading.Thread]:
            return ([threading.Thread(target=self.reader) for _ in range(readers)] +
                    [threading.Thread(target=self.puller, args=(i,)) for i in range(o.pullers)])

        self._starting = 0
        self._run("ramp", [threading.Thread(target=self.pod_worker, args=(True,))
                           for _ in range(o.pod_workers)], side(), None)
        self._run("steady", [threading.Thread(target=self.pod_worker, args=(False,))
                             for _ in range(o.pod_workers)], side(), o.steady)

        def drain() -> None:
            while (pod := self._take_pod()) is not None:
                with contextlib.suppress(grpc.RpcError):
                    self.stop_pod(pod)

        self._run("teardown", [threading.Thread(target=drain) for _ in range(o.pod_workers)],
                  side()[:readers], None)
        return self.phases

    def table(self, phase: Phase) -> str:
        lines = [f"{phase.name}: {phase.seconds:.0f} s, {phase.calls.total} calls, "
                 f"{len(phase.calls.errors)} errors, {phase.calls.gone} NOT_FOUND races",
                 f"  {'RPC':<22} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
        for rpc, n, p50, p99, mx in phase.rows():
            mark = " *" if rpc in READS else ""
            lines.append(f"  {rpc:<22} {n:>6} {p50:>8.1f} {p99:>8.1f} {mx:>8.1f}{mark}")
        lines += [f"  error: {e}" for e in phase.calls.errors[:5]]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    d = LoadOptions()
    p = argparse.ArgumentParser(prog="python -m bench.load",
                                description=(__doc__ or "").split("\n\n")[0])
    for name in ("pods", "clients", "pod_workers", "pullers", "registry_rate"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("steady", "cni_delay", "read_period"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (runc, namespaces, mounts)", file=sys.stderr)
        return 2
    opts = LoadOptions(**{k: getattr(args, k) for k in vars(d)})
    stop_on_signals()
    print(f"load: {opts.pods} pods x 2 containers, {opts.clients} clients, CNI +"
          f"{opts.cni_delay:g} s, registry {opts.registry_rate // 1024} KiB/s, load "
          f"{os.getloadavg()[0]:.1f}, {os.cpu_count()} cpus (* = served from memory)",
          flush=True)
    proxies: list[StallProxy] = []
    with soak_node(small_images=opts.pullers, prepare=slow_parts(opts, proxies)) as (
            node, moorage, bench, _target):
        images = [ref.replace(node.registry.host, proxies[0].host)  # type: ignore[union-attr]
                  for ref in node.images.small]
        phases = Load(bench, moorage, images, opts, lambda s: print(s, flush=True)).run()
    errors = sum(len(ph.calls.errors) for ph in phases)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
