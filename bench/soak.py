"""Soak: hours of kubelet-like churn against one daemon; nothing may fail, nothing may leak.

    sudo .venv/bin/python -m bench.soak [--cycles 2000] [--workers 8] [--markdown FILE]

The driver acts as kubelet does on a busy node:

- **pod workers** (``--workers`` threads), each doing pod cycles: RunPodSandbox, two
  containers created and started, exec probes (ExecSync ``true``) right away and again
  every ``--probe-period`` seconds while the pod lives (``--probes`` rounds), then
  StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox, and the pod's log
  directory removed (as kubelet does);
- a **relist** every second: ListPodSandbox and ListContainers, then PodSandboxStatus and
  ContainerStatus of every item (a NOT_FOUND for an item removed since the list is a race
  kubelet ignores too: counted as ``gone``, not as an error), and every 10 s
  ListContainerStats and ListPodSandboxStats;
- **image churn**: the small images pulled, looked at and removed, one after the other,
  while the pods run.

After a warm-up (two cycles per worker with the relist and the churn, so that thread
pools, connections and caches have grown), the node's counts are taken: the daemon's RSS,
open fds and threads, the monitors, mounts under root and runroot, pinned network
namespaces, veths on the node, IPAM allocations, cgroups under the pods' parent, and files
under root and runroot. A row is printed every ``--report-every`` cycles with the calls,
the errors, those counts and p50/p99 of each RPC. Pass: no call failed; once the last pod
is removed, every count is back at its value after the warm-up (fds and threads, which
pools hold, may be fewer: an idle connection closed; the daemon's thread pool, bounded,
may reach its size only by the first report, and its end is compared with that); and
(``--rss-tolerance``, the long mode) the daemon's RSS after the last cycle is within 5 % of
its RSS after the first report.

The short mode in CI (tests/stress/test_soak.py) runs the same driver with a few dozen
cycles and without the RSS criterion. docs/reliability.md has the long run's table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from bench.cribench.figures import Bench, Sizes
from bench.cribench.node import Node, mounts_under
from bench.cribench.runtimes import Moorage, Runtime
from bench.cribench.stats import Report, percentile
from moorage.cri.v1 import api_pb2 as pb

TIMEOUT = 120
#: What pools hold (threads, kept-alive connections): at the end, never more than after
#: the warm-up, and maybe fewer.
POOLED = ("fds", "threads")
#: The counts that must come back to their value after the warm-up.
COUNTS = ("fds", "threads", "monitors", "mounts", "netns", "veths", "ipam", "cgroups",
          "root_files", "runroot_files")


# ---------------------------------------------------------------------------- timed calls


@dataclass
class Calls:
    """Every call's duration and outcome, by RPC; thread-safe."""

    ms: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    gone: int = 0
    total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, rpc: str, ms: float, error: str | None = None) -> None:
        with self.lock:
            self.total += 1
            self.ms.setdefault(rpc, []).append(ms)
            if error is not None:
                self.errors.append(f"{rpc}: {error}")

    def window(self) -> Calls:
        """What was recorded since the last call (and start afresh)."""
        with self.lock:
            out = Calls(ms=self.ms, errors=self.errors, gone=self.gone, total=self.total)
            self.ms, self.errors, self.gone, self.total = {}, [], 0, 0
            return out


class TimedStub:
    """A CRI stub whose unary calls are timed into ``calls``; a status code in
    ``tolerate`` is counted as ``gone`` instead of an error (and still raised)."""

    def __init__(self, stub: Any, calls: Calls,
                 tolerate: tuple[grpc.StatusCode, ...] = ()) -> None:
        self._stub = stub
        self._calls = calls
        self._tolerate = tolerate

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        fn = getattr(self._stub, rpc)

        def call(request: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                resp = fn(request, **kwargs)
            except grpc.RpcError as e:
                ms = (time.perf_counter() - t0) * 1000
                if e.code() in self._tolerate:
                    with self._calls.lock:
                        self._calls.gone += 1
                    self._calls.add(rpc, ms)
                else:
                    self._calls.add(rpc, ms, f"{e.code().name}: {e.details()}")
                raise
            self._calls.add(rpc, (time.perf_counter() - t0) * 1000)
            return resp

        return call


class TimedRuntime(Runtime):
    """The runtime under test, its stubs timed (Bench's helpers call through it)."""

    def __init__(self, inner: Runtime, calls: Calls,
                 tolerate: tuple[grpc.StatusCode, ...] = ()) -> None:
        super().__init__(inner.node)
        self.name = inner.name
        self.rt = TimedStub(inner.rt, calls, tolerate)
        self.img = TimedStub(inner.img, calls, tolerate)


# ---------------------------------------------------------------------------- the node's counts


@dataclass(frozen=True)
class Target:
    """What the counts look at: the daemon and the node it runs pods on."""

    pid: int
    root: Path
    runroot: Path
    node_ns: str
    ipam_dir: Path
    cgroup_parent: str


def _proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _files(path: Path) -> int:
    n = 0
    for _dirpath, dirs, files in os.walk(path):
        n += len(dirs) + len(files)
    return n


def _monitors(runroot: Path) -> int:
    """Processes working in a container's state dir: the per-container monitors."""
    prefix = str(runroot / "containers") + "/"
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/cwd").startswith(prefix):
                    n += 1
    return n


def _cgroups(parent: str) -> int:
    """Cgroup directories below ``parent`` in every hierarchy (v1 and v2)."""
    tops = [Path("/sys/fs/cgroup") / parent.lstrip("/")]
    tops += [c / parent.lstrip("/") for c in Path("/sys/fs/cgroup").iterdir() if c.is_dir()]
    seen: set[str] = set()
    n = 0
    for top in tops:
        if not top.is_dir() or str(top.resolve()) in seen:
            continue
        seen.add(str(top.resolve()))
        # os.walk, not rglob: cgroups come and go while they are counted.
        n += sum(len(dirs) for _path, dirs, _files in os.walk(top))
    return n


def _ipam(ipam_dir: Path) -> int:
    if not ipam_dir.is_dir():
        return 0
    return sum(1 for net in ipam_dir.iterdir() if net.is_dir() for f in net.iterdir()
               if f.name != "lock" and not f.name.startswith("last_reserved_ip"))


def _veths(node_ns: str) -> int:
    out = subprocess.run(["nsenter", f"--net={node_ns}", "ip", "-o", "link", "show",
                          "type", "veth"], capture_output=True, text=True, timeout=30)
    return len(out.stdout.splitlines())


def counts(t: Target) -> dict[str, float]:
    status = _proc_status(t.pid)
    netns_dir = t.runroot / "ns" / "net"
    return {
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{t.pid}/fd")),
        "threads": int(status["Threads"]),
        "monitors": _monitors(t.runroot),
        "mounts": len(mounts_under(t.root)) + len(mounts_under(t.runroot)),
        "netns": len(os.listdir(netns_dir)) if netns_dir.is_dir() else 0,
        "veths": _veths(t.node_ns),
        "ipam": _ipam(t.ipam_dir),
        "cgroups": _cgroups(t.cgroup_parent),
        "root_files": _files(t.root),
        "runroot_files": _files(t.runroot),
    }


# ---------------------------------------------------------------------------- the driver


@dataclass
class Options:
    cycles: int = 2000
    workers: int = 8
    report_every: int = 100
    probe_period: float = 2.0
    probes: int = 2  # probe rounds per pod: at once, then every probe_period
    relist_period: float = 1.0
    stats_period: float = 10.0
    churn_pause: float = 2.0
    #: Largest RSS growth from the first report to the last (0.05); None: not checked.
    rss_tolerance: float | None = None
    settle_timeout: float = 60.0


@dataclass
class Row:
    cycles: int
    calls: int
    errors: int
    gone: int
    counts: dict[str, float]
    latency: dict[str, tuple[float, float, int]]  # rpc -> (p50, p99, n)


@dataclass
class Result:
    baseline: dict[str, float]
    end: dict[str, float]
    rows: list[Row]
    errors: list[str]
    failures: list[str]
    seconds: float
    pulls: int

    @property
    def ok(self) -> bool:
        return not self.failures


class Soak:
    def __init__(self, bench: Bench, runtime: Runtime, target: Target, images: list[str],
                 opts: Options, log: Callable[[str], None] = print) -> None:
        self.bench = bench
        self.calls = Calls()
        self.rt = TimedRuntime(runtime, self.calls)
        self.relister = TimedRuntime(runtime, self.calls, (grpc.StatusCode.NOT_FOUND,))
        self.target = target
        self.images = images
        self.opts = opts
        self.log = log
        self.rows: list[Row] = []
        self.all_errors: list[str] = []
        self.pulls = 0
        self._next = 0
        self._done = 0
        self._limit = 0
        self._reporting = False
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- kubelet's parts ---------------------------------------------------------------------

    def pod_cycle(self, k: int) -> None:
        b, rt = self.bench, self.rt
        pod, cfg = b.run_pod(rt, f"soak{k}")
        try:
            cids = [b.create(rt, pod, cfg, name) for name in ("app", "side")]
            for cid in cids:
                b.start(rt, cid)
            for cid in cids:
                b.wait_running(rt, cid)
            for i in range(self.opts.probes):
                if i:
                    time.sleep(self.opts.probe_period)
                for cid in cids:
                    rt.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["true"],
                                                      timeout=10), timeout=TIMEOUT)
            for cid in cids:
                rt.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10),
                                    timeout=TIMEOUT)
            for cid in cids:
                rt.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid),
                                      timeout=TIMEOUT)
        finally:
            b.remove_pod(rt, pod)
            shutil.rmtree(cfg.log_directory, ignore_errors=True)

    def worker(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._next >= self._limit:
                    return
                self._next += 1
                k = self._next
            try:
                self.pod_cycle(k)
            except grpc.RpcError:
                pass  # recorded by the timed stub; the cycle is abandoned (kubelet retries)
            except Exception as e:  # a driver-side failure (a container never ran...)
                self.calls.add("driver", 0.0, repr(e))
            with self._lock:
                self._done += 1
                done = self._done
            if self._reporting and done % self.opts.report_every == 0:
                try:
                    self.report(done)
                except Exception as e:  # the driver's own failure: counted, never silent
                    self.calls.add("report", 0.0, repr(e))

    def relist(self) -> None:
        rt = self.relister.rt
        last_stats = 0.0
        while not self._stop.wait(self.opts.relist_period):
            with contextlib.suppress(grpc.RpcError):
                pods = rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=TIMEOUT).items
                ctrs = rt.ListContainers(pb.ListContainersRequest(), timeout=TIMEOUT).containers
                for p in pods:
                    with contextlib.suppress(grpc.RpcError):
                        rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=p.id),
                                            timeout=TIMEOUT)
                for c in ctrs:
                    with contextlib.suppress(grpc.RpcError):
                        rt.ContainerStatus(pb.ContainerStatusRequest(container_id=c.id),
                                           timeout=TIMEOUT)
                if time.monotonic() - last_stats >= self.opts.stats_period:
                    last_stats = time.monotonic()
                    rt.ListContainerStats(pb.ListContainerStatsRequest(), timeout=TIMEOUT)
                    rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), timeout=TIMEOUT)

    def churn(self) -> None:
        img = self.rt.img
        while self.images and not self._stop.is_set():
            for ref in self.images:
                if self._stop.wait(self.opts.churn_pause):
                    return
                with contextlib.suppress(grpc.RpcError):
                    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)),
                                  timeout=TIMEOUT)
                    self.pulls += 1
                    img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)),
                                    timeout=TIMEOUT)
                    img.ListImages(pb.ListImagesRequest(), timeout=TIMEOUT)
                    img.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=TIMEOUT)
                    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)),
                                    timeout=TIMEOUT)

    # -- running it ----------------------------------------------------------------------------

    def _cycles(self, n: int, report: bool = False) -> None:
        with self._lock:
            self._next, self._done, self._limit = 0, 0, n
            self._reporting = report
        threads = [threading.Thread(target=self.worker, name=f"pod-worker-{i}")
                   for i in range(self.opts.workers)]
        threads += [threading.Thread(target=self.relist, name="relist"),
                    threading.Thread(target=self.churn, name="churn")]
        self._stop.clear()
        for t in threads:
            t.start()
        try:
            for t in threads[:self.opts.workers]:
                t.join()
        finally:
            self._stop.set()
            for t in threads:
                t.join()

    def report(self, done: int) -> None:
        w = self.calls.window()
        self.all_errors += w.errors
        lat = {rpc: (percentile(v, 50), percentile(v, 99), len(v)) for rpc, v in w.ms.items()}
        row = Row(done, w.total, len(w.errors), w.gone, counts(self.target), lat)
        self.rows.append(row)
        self.log(format_row(row, header=len(self.rows) == 1))
        for e in w.errors[:5]:
            self.log(f"    error: {e}")

    def settled(self, want: dict[str, float]) -> dict[str, float]:
        """The counts once they equal ``want`` (trash emptied, exits released...), or as
        they are when the settle timeout passes."""
        deadline = time.monotonic() + self.opts.settle_timeout
        while True:
            now = counts(self.target)
            if not _grown(want, now) or time.monotonic() > deadline:
                return now
            time.sleep(0.5)

    def run(self) -> Result:
        t0 = time.monotonic()
        self.log(f"warm-up: {2 * self.opts.workers} cycles")
        self._cycles(2 * self.opts.workers)
        warm_errors = self.calls.window().errors
        time.sleep(1)
        baseline = self.settled(counts(self.target))
        self.log("after the warm-up: " + format_counts(baseline))
        t1 = time.monotonic()
        self._cycles(self.opts.cycles, report=True)
        seconds = time.monotonic() - t1
        if self.opts.cycles % self.opts.report_every:
            self.report(self.opts.cycles)
        want = dict(baseline)
        if self.rows:  # a bounded pool may reach its size only under the full load
            want["threads"] = max(want["threads"], self.rows[0].counts["threads"])
        end = self.settled(want)
        self.log("at the end:        " + format_counts(end))
        failures = []
        errors = warm_errors + self.all_errors
        if errors:
            failures.append(f"{len(errors)} calls failed, first: {errors[0]}")
        for k in _grown(want, end):
            failures.append(f"{k}: {want[k]:g} after the warm-up, {end[k]:g} at the end")
        tol = self.opts.rss_tolerance
        if tol is not None and self.rows:
            first, last = self.rows[0].counts["rss_mib"], self.rows[-1].counts["rss_mib"]
            if last > first * (1 + tol):
                failures.append(f"daemon RSS grew from {first:.1f} MiB after the first report to "
                                f"{last:.1f} MiB after the last (over {tol:.0%})")
        self.log(f"{self.opts.cycles} cycles in {seconds:.0f} s "
                 f"({time.monotonic() - t0:.0f} s with the warm-up), {self.pulls} image pulls")
        return Result(baseline, end, self.rows, errors, failures, seconds, self.pulls)


def _grown(want: dict[str, float], now: dict[str, float]) -> list[str]:
    """The counts of ``now`` that are not back at ``want`` (pooled ones: above it)."""
    return [k for k in COUNTS if (now[k] > want[k] if k in POOLED else now[k] != want[k])]


# ---------------------------------------------------------------------------- output

#: Short column names of the RPCs, in the order a pod's life calls them.
RPCS = {
    "RunPodSandbox": "RunPod", "CreateContainer": "Create", "StartContainer": "Start",
    "ExecSync": "Exec", "StopContainer": "Stop", "RemoveContainer": "RmCtr",
    "StopPodSandbox": "StopPod", "RemovePodSandbox": "RmPod", "ListPodSandbox": "ListPod",
    "ListContainers": "ListCtr", "PodSandboxStatus": "PodStat", "ContainerStatus": "CtrStat",
    "ListContainerStats": "CtrStats", "ListPodSandboxStats": "PodStats", "PullImage": "Pull",
    "ImageStatus": "ImgStat", "ListImages": "ListImg", "ImageFsInfo": "FsInfo",
    "RemoveImage": "RmImg",
}


def format_counts(c: dict[str, float]) -> str:
    return ", ".join(f"{k} {c[k]:.1f}" if k == "rss_mib" else f"{k} {c[k]:g}"
                     for k in ("rss_mib", *COUNTS))


def format_row(row: Row, header: bool = False) -> str:
    cols = ["cycles", "calls", "errors", "rss_mib", *COUNTS]
    line = ""
    if header:
        line = " ".join(f"{c:>9}" for c in cols) + "\n"
    vals = [row.cycles, row.calls, row.errors, row.counts["rss_mib"],
            *[row.counts[k] for k in COUNTS]]
    line += " ".join(f"{v:>9.1f}" if isinstance(v, float) and not v.is_integer()
                     else f"{int(v):>9d}" for v in vals)
    lat = "  ".join(f"{RPCS.get(rpc, rpc)} {p50:.0f}/{p99:.0f}"
                    for rpc, (p50, p99, _n) in sorted(row.latency.items(),
                                                      key=lambda kv: _order(kv[0])))
    return f"{line}\n    ms p50/p99: {lat}"


def _order(rpc: str) -> int:
    names = list(RPCS)
    return names.index(rpc) if rpc in names else len(names)


def markdown(result: Result) -> str:
    """The two tables for docs/: counts per report, and p50/p99 of each RPC per report."""
    cols = ["cycles", "calls", "errors", "RSS MiB", *COUNTS]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def num(v: float) -> str:
        return f"{v:.1f}" if not float(v).is_integer() else f"{int(v)}"

    out.append("| warm-up | | | " + " | ".join(
        num(result.baseline[k]) for k in ("rss_mib", *COUNTS)) + " |")
    for r in result.rows:
        out.append(f"| {r.cycles} | {r.calls} | {r.errors} | " + " | ".join(
            num(r.counts[k]) for k in ("rss_mib", *COUNTS)) + " |")
    out.append("| settled | | | " + " | ".join(
        num(result.end[k]) for k in ("rss_mib", *COUNTS)) + " |")
    rpcs = sorted({rpc for r in result.rows for rpc in r.latency}, key=_order)
    out += ["", "| cycles | " + " | ".join(RPCS.get(r, r) for r in rpcs) + " |",
            "|" + "---|" * (len(rpcs) + 1)]
    for r in result.rows:
        cells = [f"{r.latency[rpc][0]:.0f}/{r.latency[rpc][1]:.0f}" if rpc in r.latency else ""
                 for rpc in rpcs]
        out.append(f"| {r.cycles} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- long mode


@contextlib.contextmanager
def soak_node(base: Path | None = None, small_images: int = 2,
              prepare: Callable[[Node], dict[str, Any]] | None = None) -> Iterator[
        tuple[Node, Moorage, Bench, Target]]:
    """The bench's node (namespace, CNI bridge, registry with busybox and small images) and
    moorage started on it, busybox pulled; everything removed at the end. ``prepare``
    changes the node before the daemon starts and returns more arguments of ``Moorage``."""
    node = (Node(big_mib=0, small_images=small_images) if base is None
            else Node(big_mib=0, small_images=small_images, base=base))
    node.base.mkdir(parents=True, exist_ok=True)
    moorage: Moorage | None = None
    try:
        node.setup()
        moorage = Moorage(node, **(prepare(node) if prepare is not None else {}))
        moorage.start()
        bench = Bench(node, [moorage], Sizes(), Report(), print)
        bench.pull_images()
        assert moorage.daemon is not None
        target = Target(moorage.pid, moorage.daemon.root, moorage.daemon.runroot,
                        node.ns_path, node.base / "ipam", node.cgroup_parent)
        yield node, moorage, bench, target
    finally:
        if moorage is not None:
            try:
                moorage.remove_all()
            finally:
                moorage.stop()
        node.close()


def stop_on_signals() -> None:
    """SIGINT and SIGTERM end a run cleanly (pods removed, node torn down), also when a
    shell started it in the background with SIGINT ignored."""

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=2000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--report-every", type=int, default=100)
    p.add_argument("--rss-tolerance", type=float, default=0.05,
                   help="largest RSS growth from the first report to the last (0.05)")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (runc, namespaces, mounts)", file=sys.stderr)
        return 2
    opts = Options(cycles=args.cycles, workers=args.workers, report_every=args.report_every,
                   rss_tolerance=args.rss_tolerance)
    stop_on_signals()
    print(f"soak: {opts.cycles} pod cycles, {opts.workers} pod workers, load "
          f"{os.getloadavg()[0]:.1f}, {os.cpu_count()} cpus", flush=True)
    with soak_node() as (node, moorage, bench, target):
        result = Soak(bench, moorage, target, node.images.small, opts,
                      lambda s: print(s, flush=True)).run()
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other work on the machine "
          "slows the calls)")
    if args.markdown:
        args.markdown.write_text(markdown(result))
    for f in result.failures:
        print(f"FAIL: {f}")
    print("PASS" if result.ok else "FAIL")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
