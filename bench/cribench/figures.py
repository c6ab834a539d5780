"""The measurements. Every figure runs the same requests against every runtime, interleaved
(A B, then B A, ...), and discards warm-up iterations."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.cribench.node import Node
from bench.cribench.runtimes import RUNC, Containerd, Runtime, channel_to
from bench.cribench.stats import Report
from bench.monitor_memory import ConmonMode, rollup, run_mode
from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.image.unpacker import unpack_layer

T = TypeVar("T")
TIMEOUT = 300  # seconds: generous, the machine may be busy
#: A container that runs until stopped and exits at once on SIGTERM (busybox ash runs the
#: trap as soon as the signal interrupts ``wait``; a bare ``sleep`` as PID 1 ignores TERM).
SERVE = ["sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"]


@dataclass
class Sizes:
    """Iterations and sizes of one run (``--quick`` or full)."""

    warmup: int = 2
    lifecycle: int = 20
    exec_sync: int = 100
    list_levels: tuple[int, ...] = (10, 100, 500)
    list_samples: int = 300
    parallel_pods: int = 50
    parallel_rounds: int = 3
    relist_pods: int = 10
    relist_rounds: int = 4
    relist_period: float = 0.1
    pulls: int = 3
    memory_pods: int = 50  # two containers each
    settle: float = 3.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(warmup=1, lifecycle=5, exec_sync=20, list_levels=(10, 50), list_samples=40,
                   parallel_pods=10, parallel_rounds=1, relist_pods=5, relist_rounds=1,
                   pulls=1, memory_pods=5, settle=1.0)


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``fn(*args, **kwargs)`` and the milliseconds it took."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, ms(t0)


def interleaved(runtimes: list[Runtime], i: int) -> list[Runtime]:
    """A B on even iterations, B A on odd ones, so neither always follows the other."""
    return runtimes if i % 2 == 0 else list(reversed(runtimes))


class Bench:
    def __init__(self, node: Node, runtimes: list[Runtime], sizes: Sizes, report: Report,
                 log: Callable[[str], None]) -> None:
        self.node = node
        self.runtimes = runtimes
        self.sizes = sizes
        self.report = report
        self.log = log
        self.image_ref: dict[str, str] = {}
        self._n = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests

    def uid(self) -> str:
        with self._lock:
            self._n += 1
            return f"{self._n:05d}-{secrets.token_hex(3)}"

    def pod_config(self, name: str) -> pb.PodSandboxConfig:
        """What kubelet sends for a plain pod (cgroupfs driver, pod-level network and IPC,
        a PID namespace per container, no seccomp profile)."""
        uid = self.uid()
        ns = pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=f"{name}-{uid}", uid=uid, namespace="bench"),
            hostname=f"{name}-{uid}"[:63],
            log_directory=str(self.node.base / "logs" / uid),
            dns_config=pb.DNSConfig(servers=["10.99.0.1"], searches=["bench.svc"],
                                    options=["ndots:5"]),
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.uid": uid},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"{self.node.cgroup_parent}/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=ns,
                    seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined))),
        )

    def container_config(self, rt: Runtime, name: str, cmd: list[str],
                         pod: pb.PodSandboxConfig | None = None) -> pb.ContainerConfig:
        ns = pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)
        labels = {"io.kubernetes.container.name": name}
        if pod is not None:  # kubelet labels a container with its pod's name and uid
            labels.update(pod.labels)
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=self.image_ref[rt.name]),
            command=cmd, log_path=f"{name}/0.log",
            labels=labels,
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(cpu_period=100000, cpu_shares=2,
                                                     oom_score_adj=1000),
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=ns,
                    seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined))),
        )

    def run_pod(self, rt: Runtime, name: str) -> tuple[str, pb.PodSandboxConfig]:
        cfg = self.pod_config(name)
        pod = rt.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=TIMEOUT)
        return pod.pod_sandbox_id, cfg

    def create(self, rt: Runtime, pod: str, cfg: pb.PodSandboxConfig, name: str,
               cmd: list[str] = SERVE) -> str:
        req = pb.CreateContainerRequest(pod_sandbox_id=pod, sandbox_config=cfg,
                                        config=self.container_config(rt, name, cmd, cfg))
        return str(rt.rt.CreateContainer(req, timeout=TIMEOUT).container_id)

    def start(self, rt: Runtime, cid: str) -> None:
        rt.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=TIMEOUT)

    def wait_running(self, rt: Runtime, cid: str, deadline: float = 60) -> None:
        end = time.monotonic() + deadline
        while True:
            st = rt.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid),
                                       timeout=TIMEOUT).status
            if st.state == pb.CONTAINER_RUNNING:
                return
            if st.state == pb.CONTAINER_EXITED or time.monotonic() > end:
                raise RuntimeError(f"{rt.name}: container {cid} is {st.state}, not running")
            time.sleep(0.001)

    def remove_pod(self, rt: Runtime, pod: str) -> None:
        rt.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=TIMEOUT)
        rt.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=TIMEOUT)

    def remove_pods(self, rt: Runtime, pods: list[str], workers: int = 4) -> None:
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            list(ex.map(lambda p: self.remove_pod(rt, p), pods))

    def verbose_info(self, rt: Runtime, cid: str) -> dict[str, Any]:
        resp = rt.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid, verbose=True),
                                     timeout=TIMEOUT)
        return dict(json.loads(resp.info["info"]))

    # ------------------------------------------------------------------ setup

    def pull_images(self) -> None:
        for rt in self.runtimes:
            for ref in (self.node.images.busybox, self.node.images.pause):
                resp = rt.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)),
                                        timeout=TIMEOUT)
                if ref == self.node.images.busybox:
                    self.image_ref[rt.name] = resp.image_ref

    # ------------------------------------------------------------------ figures

    def pod_lifecycle(self) -> None:
        g = "pod lifecycle (CNI bridge)"
        figs = {k: self.report.figure(g, k) for k in
                ("RunPodSandbox", "StopPodSandbox", "RemovePodSandbox")}
        s = self.sizes
        for i in range(s.warmup + s.lifecycle):
            for rt in interleaved(self.runtimes, i):
                cfg = self.pod_config("lc")
                resp, t_run = timed(rt.rt.RunPodSandbox, pb.RunPodSandboxRequest(config=cfg),
                                    timeout=TIMEOUT)
                pod = resp.pod_sandbox_id
                _, t_stop = timed(rt.rt.StopPodSandbox,
                                  pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=TIMEOUT)
                _, t_rm = timed(rt.rt.RemovePodSandbox,
                                pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=TIMEOUT)
                if i >= s.warmup:
                    figs["RunPodSandbox"].add(rt.name, t_run)
                    figs["StopPodSandbox"].add(rt.name, t_stop)
                    figs["RemovePodSandbox"].add(rt.name, t_rm)

    def container_lifecycle(self) -> None:
        g = "container lifecycle"
        names = ("CreateContainer", "StartContainer", "create->running", "StopContainer",
                 "RemoveContainer")
        figs = {k: self.report.figure(g, k) for k in names}
        s = self.sizes
        pods = {rt.name: self.run_pod(rt, "ctr") for rt in self.runtimes}
        floors: dict[str, Floor] = {}
        try:
            for rt in self.runtimes:  # the spec each runtime generates, for the runc floor
                pod, cfg = pods[rt.name]
                cid = self.create(rt, pod, cfg, "specsrc")
                self.start(rt, cid)
                spec = self.verbose_info(rt, cid).get("runtimeSpec")
                if spec:
                    floors[rt.name] = Floor(self.node, spec)
                rt.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10),
                                    timeout=TIMEOUT)
                rt.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid),
                                      timeout=TIMEOUT)
            for i in range(s.warmup + s.lifecycle):
                for rt in interleaved(self.runtimes, i):
                    pod, cfg = pods[rt.name]
                    t0 = time.perf_counter()
                    cid, t_create = timed(self.create, rt, pod, cfg, f"c{i}")
                    _, t_start = timed(self.start, rt, cid)
                    self.wait_running(rt, cid)
                    t_running = ms(t0)
                    # Not timed: let the shell install its TERM trap before it is stopped.
                    _wait_trap(int(self.verbose_info(rt, cid)["pid"]))
                    _, t_stop = timed(rt.rt.StopContainer, pb.StopContainerRequest(
                        container_id=cid, timeout=10), timeout=TIMEOUT)
                    _, t_rm = timed(rt.rt.RemoveContainer, pb.RemoveContainerRequest(
                        container_id=cid), timeout=TIMEOUT)
                    floor_times = floors[rt.name].run() if rt.name in floors else None
                    if i < s.warmup:
                        continue
                    for k, v in zip(names, (t_create, t_start, t_running, t_stop, t_rm),
                                    strict=True):
                        figs[k].add(rt.name, v)
                    if floor_times is not None:
                        key = "floor" if rt.name == "moorage" else f"floor:{rt.name}"
                        figs["create->running"].add(key, floor_times[0])
                        figs["StopContainer"].add(key, floor_times[1])
                        figs["RemoveContainer"].add(key, floor_times[2])
        finally:
            for floor in floors.values():
                floor.close()
            for rt in self.runtimes:
                self.remove_pod(rt, pods[rt.name][0])

    def exec_sync(self) -> None:
        fig = self.report.figure("exec", "ExecSync `true`")
        targets = {}
        for rt in self.runtimes:
            pod, cfg = self.run_pod(rt, "exec")
            cid = self.create(rt, pod, cfg, "target")
            self.start(rt, cid)
            targets[rt.name] = (pod, cid)
        try:
            for i in range(self.sizes.warmup + self.sizes.exec_sync):
                for rt in interleaved(self.runtimes, i):
                    cid = targets[rt.name][1]
                    resp, t = timed(rt.rt.ExecSync, pb.ExecSyncRequest(
                        container_id=cid, cmd=["true"], timeout=10), timeout=TIMEOUT)
                    if resp.exit_code != 0:
                        raise RuntimeError(f"{rt.name}: exec true exited {resp.exit_code}: "
                                           f"{resp.stderr!r}")
                    if i >= self.sizes.warmup:
                        fig.add(rt.name, t)
        finally:
            for rt in self.runtimes:
                self.remove_pod(rt, targets[rt.name][0])

    def _grow(self, rt: Runtime, pods: list[tuple[str, pb.PodSandboxConfig]],
              containers: list[str], total: int, per_pod: int = 10) -> None:
        """Run containers (``per_pod`` to a pod) until there are ``total``."""
        def one(k: int) -> str:
            pod, cfg = pods[k // per_pod]
            cid = self.create(rt, pod, cfg, f"c{k % per_pod}")
            self.start(rt, cid)
            return cid

        have = len(containers)
        while len(pods) * per_pod < total:
            pods.append(self.run_pod(rt, "list"))
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            containers.extend(ex.map(one, range(have, total)))

    def _sample_lists(self, rt: Runtime, containers: list[str], group: str, suffix: str = ""
                      ) -> None:
        calls: dict[str, Callable[[], object]] = {
            "ListContainers": lambda: rt.rt.ListContainers(pb.ListContainersRequest(),
                                                           timeout=TIMEOUT),
            "ListPodSandbox": lambda: rt.rt.ListPodSandbox(pb.ListPodSandboxRequest(),
                                                           timeout=TIMEOUT),
            "ContainerStatus": lambda: rt.rt.ContainerStatus(pb.ContainerStatusRequest(
                container_id=random.choice(containers)), timeout=TIMEOUT),
        }
        for name, call in calls.items():
            _, t = timed(call)
            self.report.figure(group, name + suffix).add(rt.name, t)

    def list_status(self, with_pull: bool = True) -> None:
        state: dict[str, tuple[list[tuple[str, pb.PodSandboxConfig]], list[str]]] = {
            rt.name: ([], []) for rt in self.runtimes}
        try:
            for level in self.sizes.list_levels:
                for rt in self.runtimes:
                    self.log(f"  {rt.name}: {level} running containers")
                    self._grow(rt, *state[rt.name], level)
                group = f"list/status with {level} containers"
                for i in range(self.sizes.list_samples + 5):
                    for rt in interleaved(self.runtimes, i):
                        if i < 5:  # warm-up
                            continue
                        self._sample_lists(rt, state[rt.name][1], group)
            if with_pull:
                level = self.sizes.list_levels[-1]
                group = f"list/status with {level} containers, during a cold pull"
                for rt in self.runtimes:
                    self._remove_image(rt, self.node.images.big)
                    done = threading.Event()
                    errors: list[BaseException] = []

                    def pull(rt: Runtime = rt, done: threading.Event = done,
                             errors: list[BaseException] = errors) -> None:
                        try:
                            rt.img.PullImage(pb.PullImageRequest(
                                image=pb.ImageSpec(image=self.node.images.big)), timeout=TIMEOUT)
                        except BaseException as e:
                            errors.append(e)
                        finally:
                            done.set()

                    th = threading.Thread(target=pull, daemon=True)
                    th.start()
                    while not done.is_set():
                        self._sample_lists(rt, state[rt.name][1], group)
                        time.sleep(0.01)
                    th.join()
                    if errors:
                        raise errors[0]
                    self._remove_image(rt, self.node.images.big)
        finally:
            for rt in self.runtimes:
                self.remove_pods(rt, [p for p, _ in state[rt.name][0]])

    def parallel_pods(self) -> None:
        n = self.sizes.parallel_pods
        g = f"{n} pods x 2 containers started in parallel"
        total = self.report.figure(g, "time to all running")
        per_pod = self.report.figure(g, "per pod: RunPodSandbox to 2nd StartContainer")

        def pod_start(rt: Runtime, k: int, t0: float) -> tuple[str, float]:
            pod, cfg = self.run_pod(rt, f"par{k}")
            for name in ("app", "sidecar"):
                self.start(rt, self.create(rt, pod, cfg, name))
            return pod, ms(t0)

        for r in range(self.sizes.parallel_rounds):
            for rt in interleaved(self.runtimes, r):
                with concurrent.futures.ThreadPoolExecutor(n) as ex:
                    t0 = time.perf_counter()
                    results = list(ex.map(lambda k, rt=rt, t0=t0: pod_start(rt, k, t0),
                                          range(n)))
                    t_all = ms(t0)
                total.add(rt.name, t_all)
                for _, t in results:
                    per_pod.add(rt.name, t)
                self.remove_pods(rt, [p for p, _ in results])

    def relist_under_load(self) -> None:
        """kubelet's PLEG relist (its exact calls) while ``relist_pods`` pods start at once
        and a cold pull of the big image runs; and each pod's sync as a pod worker sees it."""
        s = self.sizes
        g = (f"relist while {s.relist_pods} pods x 2 containers start and the big image "
             "is pulled")
        relists = self.report.figure(
            g, "relist (kubelet's sequence)",
            note=f"every {s.relist_period:g} s: ListPodSandbox, ListContainers, then for "
            "each pod that changed ListPodSandbox (uid label), PodSandboxStatus, "
            "ListContainers (uid label), ContainerStatus of each container")
        sync = self.report.figure(g, "pod sync: RunPodSandbox to 2nd StartContainer")
        for r in range(s.relist_rounds):
            for rt in interleaved(self.runtimes, r):
                self._remove_image(rt, self.node.images.big)
                errors: list[BaseException] = []
                # kubelet is a process of its own: so is the relist here (in a thread of
                # this process it would wait for this process's interpreter lock, held by
                # the pod workers' threads).
                ctx = multiprocessing.get_context("spawn")
                stop = ctx.Event()
                results, sender = ctx.Pipe(duplex=False)
                lister = ctx.Process(target=_relister, daemon=True, args=(
                    str(rt.address), s.relist_period, stop, sender))

                def pod_sync(k: int, rt: Runtime = rt) -> tuple[str, float]:
                    t0 = time.perf_counter()
                    pod, cfg = self.run_pod(rt, f"relist{k}")
                    for name in ("app", "sidecar"):
                        rt.img.ImageStatus(pb.ImageStatusRequest(
                            image=pb.ImageSpec(image=self.image_ref[rt.name])), timeout=TIMEOUT)
                        self.start(rt, self.create(rt, pod, cfg, name))
                    return pod, ms(t0)

                puller = threading.Thread(target=self._pull_big, args=(rt, errors), daemon=True)
                lister.start()
                first = results.recv()  # the relister is connected and has relisted once
                if isinstance(first, str):
                    lister.join()
                    raise RuntimeError(f"{rt.name}: the relist failed: {first}")
                puller.start()
                with concurrent.futures.ThreadPoolExecutor(s.relist_pods) as ex:
                    started = list(ex.map(pod_sync, range(s.relist_pods)))
                puller.join()
                stop.set()
                samples = results.recv()
                lister.join()
                try:
                    if errors:
                        raise errors[0]
                    if isinstance(samples, str):
                        raise RuntimeError(f"{rt.name}: the relist failed: {samples}")
                    for v in [first, *samples]:
                        relists.add(rt.name, v)
                    for _, t in started:
                        sync.add(rt.name, t)
                finally:
                    self.remove_pods(rt, [p for p, _ in started])
                    self._remove_image(rt, self.node.images.big)

    def _pull_big(self, rt: Runtime, errors: list[BaseException]) -> None:
        try:
            rt.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=self.node.images.big)),
                             timeout=TIMEOUT)
        except BaseException as e:
            errors.append(e)

    # ------------------------------------------------------------------ images

    def _remove_image(self, rt: Runtime, ref: str) -> None:
        st = rt.img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)),
                                timeout=TIMEOUT)
        if st.image.id:
            rt.img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=st.image.id)),
                               timeout=TIMEOUT)

    def _blobs_left(self, rt: Runtime) -> int:
        """How many of the big image's layer blobs are still on the runtime's disk."""
        wanted = {b.digest.split(":", 1)[1] for b in self.node.images.big_layers[1:]}
        left = 0
        for _dirpath, _dirs, files in os.walk(rt.base):
            left += sum(1 for f in files if f in wanted)
        return left

    def pull(self) -> None:
        size_mb = self.node.images.big_bytes / 1e6
        g = f"pull {size_mb:.0f} MB gzip, {len(self.node.images.big_layers)} layers"
        t_fig = self.report.figure(g, "cold pull + unpack", unit="s")
        mbps = self.report.figure(g, "pull throughput", unit="MB/s", better="higher")
        unpack = self.report.figure(g, "unpack alone", unit="s",
                                    note="moorage: its unpack helper over the blobs, "
                                    "parallel like a pull; containerd: `ctr images mount` "
                                    "after `ctr content fetch`")
        blobs = self.node.write_blobs(self.node.base / "blobs")
        for i in range(self.sizes.pulls):
            for rt in interleaved(self.runtimes, i):
                self._remove_image(rt, self.node.images.big)
                left = self._blobs_left(rt)
                if left:
                    self.log(f"  warning: {rt.name} still holds {left} blobs: not cold")
                _, t = timed(rt.img.PullImage, pb.PullImageRequest(
                    image=pb.ImageSpec(image=self.node.images.big)), timeout=TIMEOUT)
                t_fig.add(rt.name, t / 1000)
                mbps.add(rt.name, size_mb / (t / 1000))
                self._remove_image(rt, self.node.images.big)
                u = self._unpack_alone(rt, blobs)
                if u is not None:
                    unpack.add(rt.name, u)

    def _unpack_alone(self, rt: Runtime, blobs: list[tuple[Path, Any]]) -> float | None:
        if isinstance(rt, Containerd):
            return _ctr_unpack(rt, self.node.images.big, self.log)
        if rt.name != "moorage":
            return None
        dest = Path(tempfile.mkdtemp(dir=self.node.base, prefix="unpack-"))
        try:
            async def all_layers() -> None:
                sem = asyncio.Semaphore(max(1, os.cpu_count() or 1))

                async def one(k: int, path: Path) -> None:
                    async with sem:
                        await unpack_layer(path, dest / str(k), "gzip")

                await asyncio.gather(*(one(k, p) for k, (p, _) in enumerate(blobs)))

            t0 = time.perf_counter()
            asyncio.run(all_layers())
            return time.perf_counter() - t0
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    # ------------------------------------------------------------------ memory

    def memory_idle(self) -> None:
        g = "memory, idle (images pulled, no pods)"
        for rt in self.runtimes:
            r = rollup(rt.pid)
            self.report.figure(g, "daemon RSS idle", unit="MiB").add(rt.name, r["Rss"] / 1024)
            self.report.figure(g, "daemon PSS idle", unit="MiB").add(rt.name, r["Pss"] / 1024)

    def memory_loaded(self) -> None:
        n_pods = self.sizes.memory_pods
        n = 2 * n_pods
        g = f"memory, {n_pods} pods x 2 containers running"
        for rt in self.runtimes:
            pods: list[str] = []
            cids: list[str] = []
            try:
                def one(k: int, rt: Runtime = rt) -> tuple[str, list[str]]:
                    pod, cfg = self.run_pod(rt, f"mem{k}")
                    out = []
                    for name in ("app", "sidecar"):
                        cid = self.create(rt, pod, cfg, name, SERVE)
                        self.start(rt, cid)
                        out.append(cid)
                    return pod, out

                with concurrent.futures.ThreadPoolExecutor(4) as ex:
                    for pod, out in ex.map(one, range(n_pods)):
                        pods.append(pod)
                        cids.extend(out)
                time.sleep(self.sizes.settle)
                r = rollup(rt.pid)
                self.report.figure(g, "daemon RSS", unit="MiB").add(
                    rt.name, r["Rss"] / 1024)
                self.report.figure(g, "daemon PSS", unit="MiB").add(
                    rt.name, r["Pss"] / 1024)
                self._monitor_memory(rt, pods, cids)
            finally:
                self.remove_pods(rt, pods)
        self.log("  conmon, for comparison (bench/monitor_memory.py's method)")
        with asyncio.Runner() as runner:
            c = run_mode(ConmonMode, min(n, 20), self.sizes.settle, runner)
        self.report.figure(g, "monitor PSS per container", unit="KiB").add(
            "conmon", c["pss_kib"])
        self.report.figure(g, "monitor RSS per container", unit="KiB").add(
            "conmon", c["rss_kib"])

    def _monitor_memory(self, rt: Runtime, pods: list[str], cids: list[str]) -> None:
        g = f"memory, {len(pods)} pods x 2 containers running"
        monitors: dict[int, int] = {}  # monitor pid -> containers it serves
        for cid in cids:
            pid = int(self.verbose_info(rt, cid)["pid"])
            parent = _ppid(pid)
            monitors[parent] = monitors.get(parent, 0) + 1
        stats = {pid: rollup(pid) for pid in monitors}
        total_pss = sum(s["Pss"] for s in stats.values())
        total_rss = sum(s["Rss"] for s in stats.values())
        n = len(cids)
        # Per container: every monitor's PSS (which already splits shared pages) summed
        # and divided by the containers they serve.
        self.report.figure(g, "monitor PSS per container", unit="KiB").add(
            rt.name, total_pss / n)
        self.report.figure(g, "monitor RSS per container", unit="KiB").add(
            rt.name, total_rss / n)
        self.report.figure(g, "monitor processes per pod", unit="count").add(
            rt.name, len(monitors) / len(pods))
        infra = []
        for pod in pods:
            resp = rt.rt.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=TIMEOUT)
            info = json.loads(resp.info.get("info", "{}") or "{}")
            pid = int(info.get("pid") or 0)
            if pid:
                with contextlib.suppress(OSError):
                    infra.append(rollup(pid)["Pss"])
        self.report.figure(g, "infra (pause) PSS per pod", unit="KiB").add(
            rt.name, sum(infra) / len(pods))
        self.log(f"  {rt.name}: {len(monitors)} monitor processes for {n} containers, "
                 f"{total_pss} KiB PSS, {total_rss} KiB RSS; {len(infra)} infra processes")


def _relist(stub: pb_grpc.RuntimeServiceStub, seen: dict[str, tuple[int, ...]]
            ) -> dict[str, tuple[int, ...]]:
    """One relist of kubelet's generic PLEG: both lists unfiltered, then, for each pod whose
    sandbox or containers changed since ``seen``, what kubelet's GetPodStatus asks (its pod
    sandboxes by uid label, their status, its containers by uid label, each one's status).
    Returns the states seen, for the next relist."""
    uid_label = "io.kubernetes.pod.uid"
    pods = stub.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=TIMEOUT).items
    ctrs = stub.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter()),
                                timeout=TIMEOUT).containers
    now: dict[str, tuple[int, ...]] = {}
    for p in pods:
        now[p.labels.get(uid_label, p.id)] = (p.state, *sorted(
            c.state for c in ctrs if c.pod_sandbox_id == p.id))
    for uid, states in now.items():
        if seen.get(uid) == states:
            continue
        selector = {uid_label: uid}
        for p in stub.ListPodSandbox(pb.ListPodSandboxRequest(
                filter=pb.PodSandboxFilter(label_selector=selector)), timeout=TIMEOUT).items:
            stub.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=p.id),
                                   timeout=TIMEOUT)
        for c in stub.ListContainers(pb.ListContainersRequest(
                filter=pb.ContainerFilter(label_selector=selector)), timeout=TIMEOUT).containers:
            stub.ContainerStatus(pb.ContainerStatusRequest(container_id=c.id), timeout=TIMEOUT)
    return now


def _relister(address: str, period: float, stop: Any, results: Any) -> None:
    """A process (as kubelet is one) that relists every ``period`` seconds until ``stop``
    is set, then sends the durations (ms), or what went wrong, through ``results``; the
    first relist's duration is sent at once."""
    channel = channel_to(Path(address))
    stub = pb_grpc.RuntimeServiceStub(channel)
    try:
        t0 = time.perf_counter()
        seen = _relist(stub, {})
        results.send(ms(t0))
        samples: list[float] = []
        while not stop.is_set():
            t0 = time.perf_counter()
            seen = _relist(stub, seen)
            samples.append(ms(t0))
            stop.wait(max(0.0, period - (time.perf_counter() - t0)))
        results.send(samples)
    except Exception as e:
        results.send(repr(e))
    finally:
        channel.close()


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _ctr_unpack(rt: Containerd, ref: str, log: Callable[[str], None]) -> float | None:
    """containerd's unpack alone: fetch the content first, then time ``ctr images mount``
    (which unpacks into the overlayfs snapshotter, then mounts)."""
    fetched = rt.ctr("content", "fetch", "--plain-http", ref)
    if fetched.returncode != 0:
        log(f"  ctr content fetch failed: {fetched.stderr.strip()[:300]}")
        return None
    target = rt.base / "ctr-mnt"
    target.mkdir(exist_ok=True)
    try:
        t0 = time.perf_counter()
        mounted = rt.ctr("images", "mount", ref, str(target))
        elapsed = time.perf_counter() - t0
        if mounted.returncode != 0:
            log(f"  ctr images mount failed: {mounted.stderr.strip()[:300]}")
            return None
        return elapsed
    finally:
        rt.ctr("images", "unmount", "--rm", str(target))
        rt.ctr("images", "rm", "--sync", ref)


class Floor:
    """``runc`` run directly with the spec the runtime generated (rootfs swapped for a plain
    busybox directory, our own cgroup and runc root): what the runtime adds is the rest."""

    def __init__(self, node: Node, spec: dict[str, Any]) -> None:
        self.node = node
        self.root = Path(tempfile.mkdtemp(dir=node.base, prefix="floor-"))
        self.runc_root = self.root / "runc"
        spec = json.loads(json.dumps(spec))
        spec["root"] = {"path": str(node.rootfs), "readonly": False}
        spec.pop("hooks", None)
        spec["process"]["terminal"] = False
        spec["process"]["args"] = SERVE
        spec["linux"]["cgroupsPath"] = f"{node.cgroup_parent}/floor"
        self.spec = spec
        self.n = 0

    def _runc(self, *args: str) -> None:
        with tempfile.TemporaryFile() as err:
            done = subprocess.run([RUNC, "--root", str(self.runc_root), *args],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=err, timeout=TIMEOUT)
            if done.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"runc {' '.join(args)}: {err.read().decode()}")

    def run(self) -> tuple[float, float, float]:
        """create+start, stop (TERM until the process is gone), delete: milliseconds."""
        self.n += 1
        cid = f"floor-{os.getpid()}-{self.n}"
        bundle = self.root / cid
        bundle.mkdir()
        spec = dict(self.spec)
        spec["linux"] = {**spec["linux"], "cgroupsPath": f"{self.node.cgroup_parent}/floor/{cid}"}
        (bundle / "config.json").write_text(json.dumps(spec))
        pidfile = bundle / "pid"
        t0 = time.perf_counter()
        self._runc("create", "--bundle", str(bundle), "--pid-file", str(pidfile), cid)
        self._runc("start", cid)
        t_run = ms(t0)
        pid = int(pidfile.read_text())
        _wait_trap(pid)
        t0 = time.perf_counter()
        self._runc("kill", cid, "TERM")
        _wait_gone(pid)
        t_stop = ms(t0)
        t0 = time.perf_counter()
        self._runc("delete", cid)
        t_rm = ms(t0)
        shutil.rmtree(bundle, ignore_errors=True)
        return t_run, t_stop, t_rm

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for entry in (self.runc_root.iterdir() if self.runc_root.exists() else []):
                subprocess.run([RUNC, "--root", str(self.runc_root), "delete", "-f",
                                entry.name], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_trap(pid: int, deadline: float = 30) -> None:
    """Until the SERVE shell ``pid`` catches SIGTERM, has forked its ``sleep`` and sleeps in
    ``wait`` (a TERM that lands between the trap and ``wait`` can be lost by ash)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        caught = int(fields["SigCgt"].strip(), 16) & (1 << (15 - 1))
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if caught and children and fields["State"].strip().startswith("S"):
            return
        time.sleep(0.001)
    raise RuntimeError(f"process {pid} never got ready for SIGTERM")


def _wait_gone(pid: int, deadline: float = 30) -> None:
    """Until ``pid`` has exited (gone, or a zombie waiting for its reaper)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.0005)
    raise RuntimeError(f"process {pid} did not exit")


@contextlib.contextmanager
def stage(log: Callable[[str], None], name: str) -> Iterator[None]:
    log(f"== {name}")
    t0 = time.perf_counter()
    yield
    log(f"   {name}: {time.perf_counter() - t0:.1f} s")
