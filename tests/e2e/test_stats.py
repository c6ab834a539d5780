"""Stats, events, metrics, pod resources and checkpoints end to end: the daemon from its CLI,
real pods and runc containers, driven over the CRI socket as kubelet drives it."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moorage.cri.v1 import api_pb2 as pb
from moorage.network.netns import run_in_netns
from tests.e2e.conftest import make_daemon
from tests.e2e.test_containers import (  # noqa: F401 - busybox_ref is a fixture
    Env,
    busybox_ref,
    rpc_error,
)
from tests.e2e.test_images import insecure_conf
from tests.fixtures.daemon import OOM_SCORE_CLAMP
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
METRICS_PORT = 9090  # in the test's own node network namespace: always free
BUSY = ["sh", "-c", "while :; do :; done"]
IDLE = ["sleep", "1000"]


class StatsEnv(Env):
    #: What the daemon that pulled the image (outside the node namespace) exported.
    pull_metrics: dict[str, Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path, node_ns: str, cni_dir: Path, registry: Registry,
        busybox_ref: str) -> Iterator[StatsEnv]:  # noqa: F811 - the fixture above
    """test_containers' Env, with the metrics endpoint on (on the machine's loopback for
    the daemon that pulls, then in the node namespace)."""
    d = make_daemon(tmp_path, node_ns, cni_dir)
    d.config_text = OOM_SCORE_CLAMP
    d.registries_conf_text = insecure_conf(registry)
    node, d.netns = d.netns, None
    args = list(d.extra_args)
    pull_port = _free_port()
    d.extra_args = [*args, "--enable-metrics", "--metrics-port", str(pull_port)]
    d.start()
    try:
        image_ref = d.images.PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=busybox_ref))).image_ref
        pull_metrics = _parse(_fetch(f"http://127.0.0.1:{pull_port}/metrics"))
    finally:
        d.stop()
    d.netns = node
    d.extra_args = [*args, "--enable-metrics", "--metrics-port", str(METRICS_PORT)]
    d.start()
    e = StatsEnv(d, tmp_path, busybox_ref)
    e.image_ref = image_ref
    e.pull_metrics = pull_metrics
    try:
        yield e
    finally:
        d.remove_pods_and_stop()


def stats(env: Env, cid: str) -> pb.ContainerStats:
    response: pb.ContainerStatsResponse = env.rt.ContainerStats(
        pb.ContainerStatsRequest(container_id=cid))
    return response.stats


def list_ids(env: Env, **flt: Any) -> list[str]:
    req = pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(**flt))
    return sorted(s.attributes.id for s in env.rt.ListContainerStats(req).stats)


def test_cpu_memory_writable_layer_and_filters(env: Env) -> None:
    pod = env.pod()
    busy = env.run(pod, "busy", BUSY)
    idle = env.run(pod, "idle", IDLE)
    other_pod = env.pod()
    other = env.run(other_pod, "other", IDLE)
    for cid in (busy, idle, other):
        assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    first_busy = stats(env, busy)
    stats(env, idle)
    time.sleep(1.5)  # a new CPU sample window (not a timing assertion)
    second_busy, second_idle = stats(env, busy), stats(env, idle)

    for s in (first_busy, second_busy):
        assert s.attributes.id == busy and s.attributes.metadata.name == "busy"
        assert dict(s.attributes.labels) == {"c": "busy"}
        assert dict(s.attributes.annotations) == {"note": "verbatim"}
    assert second_busy.cpu.timestamp > first_busy.cpu.timestamp > 0
    assert second_busy.cpu.usage_core_nano_seconds.value > \
        first_busy.cpu.usage_core_nano_seconds.value > 0
    assert second_busy.cpu.HasField("usage_nano_cores")
    assert second_busy.cpu.usage_nano_cores.value > 100_000_000  # a spinning shell
    # The idle one: about nothing (well under a tenth of a core).
    assert second_idle.cpu.usage_nano_cores.value < 100_000_000
    assert second_idle.cpu.usage_nano_cores.value < second_busy.cpu.usage_nano_cores.value
    for s in (second_busy, second_idle):
        mem = s.memory
        assert mem.timestamp > 0
        assert mem.working_set_bytes.value > 0
        assert mem.usage_bytes.value >= mem.working_set_bytes.value
        assert not mem.HasField("available_bytes")  # no memory limit
        fs = s.writable_layer
        assert fs.timestamp > 0 and fs.fs_id.mountpoint == str(env.d.root / "overlay")
        assert fs.HasField("used_bytes") and fs.inodes_used.value >= 1

    everything = sorted([busy, idle, other])
    assert list_ids(env) == everything
    assert list_ids(env, id=busy) == [busy]
    assert list_ids(env, pod_sandbox_id=pod) == sorted([busy, idle])
    assert list_ids(env, pod_sandbox_id=pod, label_selector={"c": "idle"}) == [idle]
    assert list_ids(env, label_selector={"c": "other"}) == [other]
    assert list_ids(env, label_selector={"c": "nope"}) == []
    streamed = [s.attributes.id for r in env.rt.StreamContainerStats(
        pb.StreamContainerStatsRequest()) for s in r.container_stats]
    assert sorted(streamed) == everything
    e = rpc_error(lambda: stats(env, "0" * 64))
    assert e.code() == grpc.StatusCode.NOT_FOUND


def test_memory_limit_gives_available_bytes(env: Env) -> None:
    pod = env.pod()
    res = pb.LinuxContainerResources(memory_limit_in_bytes=64 << 20)
    cid = env.run(pod, "limited", IDLE, linux=pb.LinuxContainerConfig(resources=res))
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    mem = stats(env, cid).memory
    assert 0 < mem.working_set_bytes.value < 64 << 20
    assert mem.available_bytes.value == (64 << 20) - mem.working_set_bytes.value


def _pod_stats(env: Env, pod: str) -> pb.PodSandboxStats:
    response: pb.PodSandboxStatsResponse = env.rt.PodSandboxStats(
        pb.PodSandboxStatsRequest(pod_sandbox_id=pod))
    return response.stats


def test_pod_stats_with_network_traffic(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "net", IDLE)
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    before = _pod_stats(env, pod)
    # Traffic to the bridge's gateway: a TCP SYN out, a reset back.
    for _ in range(3):
        env.exec(cid, ["sh", "-c", "nc -w 1 10.99.0.1 9 </dev/null; true"])
    after = _pod_stats(env, pod)
    assert after.attributes.id == pod and after.attributes.metadata.name == "pod1"
    linux = after.linux
    assert linux.cpu.usage_core_nano_seconds.value > 0 and linux.cpu.timestamp > 0
    assert linux.memory.working_set_bytes.value > 0
    assert linux.process.process_count.value >= 1
    assert [c.attributes.id for c in linux.containers] == [cid]
    assert linux.containers[0].memory.working_set_bytes.value > 0
    net = linux.network
    assert net.timestamp > 0 and net.default_interface.name == "eth0"
    assert "lo" not in [i.name for i in net.interfaces]
    old = before.linux.network.default_interface
    new = net.default_interface
    assert new.tx_bytes.value > old.tx_bytes.value
    assert new.rx_bytes.value > old.rx_bytes.value
    assert new.HasField("rx_errors") and new.HasField("tx_errors")

    second = env.pod()
    listed = env.rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest()).stats
    assert sorted(s.attributes.id for s in listed) == sorted([pod, second])
    flt = pb.PodSandboxStatsFilter(id=second)
    listed = env.rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(filter=flt)).stats
    assert [s.attributes.id for s in listed] == [second]
    assert not listed[0].linux.containers
    streamed = [s.attributes.id for r in env.rt.StreamPodSandboxStats(
        pb.StreamPodSandboxStatsRequest()) for s in r.pod_sandbox_stats]
    assert sorted(streamed) == sorted([pod, second])


def test_pod_metrics_under_cadvisor_names(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "m", IDLE)
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    descs = {d.name: list(d.label_keys) for d in env.rt.ListMetricDescriptors(
        pb.ListMetricDescriptorsRequest()).descriptors}
    metrics = env.rt.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
    [pm] = [m for m in metrics if m.pod_sandbox_id == pod]
    pod_level = {(m.name, *m.label_values[6:]): m for m in pm.metrics}
    assert ("container_network_receive_bytes_total", "eth0") in pod_level
    [cm] = pm.container_metrics
    assert cm.container_id == cid
    by_name = {m.name: m for m in cm.metrics}
    for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                 "container_memory_rss", "container_processes", "container_fs_usage_bytes",
                 "container_last_seen", "container_start_time_seconds"):
        assert name in by_name, name
    for m in [*pm.metrics, *cm.metrics]:
        assert len(m.label_values) == len(descs[m.name]), m.name
    ws = by_name["container_memory_working_set_bytes"]
    labels = dict(zip(descs[ws.name], ws.label_values, strict=True))
    assert labels["container"] == "m" and labels["name"] == cid and labels["pod"] == "pod1"
    assert labels["namespace"] == "ns" and labels["image"] == env.image
    assert ws.value.value > 0 and ws.metric_type == pb.GAUGE
    streamed = [m.pod_sandbox_id for r in env.rt.StreamPodSandboxMetrics(
        pb.StreamPodSandboxMetricsRequest()) for m in r.pod_sandbox_metrics]
    assert pod in streamed


class EventStream:
    """One GetContainerEvents stream read by a thread into a queue."""

    def __init__(self, env: Env) -> None:
        self.call = env.rt.GetContainerEvents(pb.GetEventsRequest())
        self.events: queue.Queue[pb.ContainerEventResponse] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as e:
            self.error = e

    def until(self, cid: str, kind: int, timeout: float = 30) -> list[pb.ContainerEventResponse]:
        """The events of ``cid`` up to the first of type ``kind``."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if ev.container_id == cid:
                got.append(ev)
                if ev.container_event_type == kind:
                    return got
        raise AssertionError(f"no event {kind} for {cid}; got {got}")

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def _subscribed(env: Env, pod: str, streams: list[EventStream]) -> None:
    """Make sure every stream is subscribed: create and remove probe containers until
    each stream has seen one (a stream's first message is how a client knows)."""
    for attempt in range(50):
        cfg = env.config(f"probe{attempt}", IDLE)
        probe = env.create(pod, cfg)
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=probe))
        if all(_seen(s, probe) for s in streams):
            return
    raise AssertionError("the event streams never started")


def _seen(stream: EventStream, cid: str) -> bool:
    try:
        stream.until(cid, pb.CONTAINER_DELETED_EVENT, timeout=1)
    except AssertionError:
        return False
    return True


def test_container_events_to_two_subscribers(env: Env) -> None:
    pod = env.pod()
    streams = [EventStream(env), EventStream(env)]
    try:
        _subscribed(env, pod, streams)
        cid = env.run(pod, "life", IDLE)
        env.wait_state(cid, pb.CONTAINER_RUNNING)
        env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        for s in streams:
            got = s.until(cid, pb.CONTAINER_DELETED_EVENT)
            assert [e.container_event_type for e in got] == [
                pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT,
                pb.CONTAINER_STOPPED_EVENT, pb.CONTAINER_DELETED_EVENT]
            times = [e.created_at for e in got]
            assert times == sorted(times) and times[0] > 0
            created, started, stopped, deleted = got
            for e in got:
                assert e.pod_sandbox_status.id == pod
                assert e.pod_sandbox_status.metadata.uid == "uid-pod1"
                assert e.pod_sandbox_status.state == pb.SANDBOX_READY
            mine = {c.id: c for c in started.containers_statuses}[cid]
            assert mine.state == pb.CONTAINER_RUNNING and mine.metadata.name == "life"
            assert {c.id: c for c in created.containers_statuses}[cid].state == \
                pb.CONTAINER_CREATED
            stopped_status = {c.id: c for c in stopped.containers_statuses}[cid]
            assert stopped_status.state == pb.CONTAINER_EXITED
            assert stopped_status.exit_code == 137
            assert cid not in [c.id for c in deleted.containers_statuses]
    finally:
        for s in streams:
            s.close()
    # Events live in memory: after a restart a new stream carries the new ones.
    keep = env.run(pod, "keep", IDLE)
    env.wait_state(keep, pb.CONTAINER_RUNNING)
    env.d.restart()
    env.rt = env.d.runtime
    again = EventStream(env)
    try:
        _subscribed(env, pod, [again])
        env.rt.StopContainer(pb.StopContainerRequest(container_id=keep, timeout=0))
        got = again.until(keep, pb.CONTAINER_STOPPED_EVENT)
        assert [e.container_event_type for e in got] == [pb.CONTAINER_STOPPED_EVENT]
    finally:
        again.close()


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return str(r.read().decode())


def _parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _scrape(env: Env) -> dict[str, Any]:
    """The node namespace's daemon's metrics, fetched from inside that namespace."""
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    assert env.d.netns is not None
    return _parse(asyncio.run(run_in_netns(env.d.netns, lambda: _fetch(url))))


def _value(fams: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


def test_metrics_endpoint(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "done", ["true"])
    env.wait_state(cid, pb.CONTAINER_EXITED)
    running = env.run(pod, "up", IDLE)
    env.wait_state(running, pb.CONTAINER_RUNNING)
    rpc_error(lambda: env.status("f" * 64))
    env.rt.ListContainers(pb.ListContainersRequest())
    # The registry is on the machine's loopback, out of the node namespace's reach.
    pull = rpc_error(lambda: env.d.images.PullImage(pb.PullImageRequest(
        image=pb.ImageSpec(image=env.image)), timeout=60))
    fams = _scrape(env)
    pulls = "moorage_image_pulls"
    assert _value(fams, pulls, f"{pulls}_total", result="failure") == 1
    assert _value(fams, f"{pulls}_failures", f"{pulls}_failures_total",
                  code=pull.code().name) == 1
    ops = "moorage_operations"
    assert _value(fams, ops, f"{ops}_total", operation="RunPodSandbox", code="OK") == 1
    assert _value(fams, ops, f"{ops}_total", operation="CreateContainer", code="OK") == 2
    assert _value(fams, ops, f"{ops}_total", operation="ListContainers", code="OK") >= 1
    errs = "moorage_operations_errors"
    assert _value(fams, errs, f"{errs}_total", operation="ContainerStatus",
                  code="NOT_FOUND") == 1
    lat = "moorage_operations_latency_seconds"
    assert fams[lat].type == "histogram"
    assert _value(fams, lat, f"{lat}_count", operation="StartContainer") == 2
    assert _value(fams, "moorage_containers", "moorage_containers", state="exited") == 1
    assert _value(fams, "moorage_containers", "moorage_containers", state="running") == 1
    assert _value(fams, "moorage_monitor_processes", "moorage_monitor_processes") >= 1
    ev = "moorage_container_events"
    assert _value(fams, ev, f"{ev}_total", type="started") == 2
    assert _value(fams, "moorage_process_resident_memory_bytes",
                  "moorage_process_resident_memory_bytes") > 0


def test_image_pull_is_counted(env: StatsEnv) -> None:
    fams = env.pull_metrics
    pulls = "moorage_image_pulls"
    assert _value(fams, pulls, f"{pulls}_total", result="success") == 1
    assert _value(fams, pulls, f"{pulls}_total", result="failure") == 0
    assert _value(fams, f"{pulls}_layers", f"{pulls}_layers_total", source="downloaded") == 1
    assert _value(fams, f"{pulls}_bytes", f"{pulls}_bytes_total") > 100_000  # busybox
    ops = "moorage_operations"
    assert _value(fams, ops, f"{ops}_total", operation="PullImage", code="OK") == 1


def test_oom_kill_is_counted(env: Env) -> None:
    pod = env.pod()
    res = pb.LinuxContainerResources(memory_limit_in_bytes=32 << 20)
    cid = env.run(pod, "hog", ["sh", "-c", "tail /dev/zero"],
                  linux=pb.LinuxContainerConfig(resources=res))
    assert env.wait_state(cid, pb.CONTAINER_EXITED, timeout=60).reason == "OOMKilled"
    fams = _scrape(env)
    assert _value(fams, "moorage_containers_oom", "moorage_containers_oom_total") == 1


def _pod_cgroup(env: Env, pod: str) -> str:
    info = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod,
                                                              verbose=True)).info["info"]
    return str(json.loads(info)["cgroupPath"]).strip("/")


def test_update_pod_sandbox_resources(env: Env) -> None:
    pod = env.pod()
    rel = _pod_cgroup(env, pod)
    env.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod,
        resources=pb.LinuxContainerResources(cpu_shares=512, cpu_quota=50000,
                                             cpu_period=100000,
                                             memory_limit_in_bytes=256 << 20),
        overhead=pb.LinuxContainerResources(memory_limit_in_bytes=32 << 20),
    ))
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # cgroup v2
        d = root / rel
        assert (d / "memory.max").read_text().strip() == str(288 << 20)
        assert (d / "cpu.max").read_text().split() == ["50000", "100000"]
    else:
        assert (root / "memory" / rel / "memory.limit_in_bytes").read_text().strip() == \
            str(288 << 20)
        assert (root / "cpu" / rel / "cpu.shares").read_text().strip() == "512"
        assert (root / "cpu" / rel / "cpu.cfs_quota_us").read_text().strip() == "50000"
    e = rpc_error(lambda: env.rt.UpdatePodSandboxResources(
        pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id="0" * 64)))
    assert e.code() == grpc.StatusCode.NOT_FOUND


def _criu_works() -> bool:
    criu = shutil.which("criu", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if criu is None:
        return False
    return subprocess.run([criu, "check"], capture_output=True, timeout=60).returncode == 0


def test_checkpoint_container(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "ckpt", ["sh", "-c", "echo state > /tmp/mark; sleep 1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    location = env.tmp / "checkpoints" / "ckpt.tar"

    def call() -> None:
        env.rt.CheckpointContainer(pb.CheckpointContainerRequest(
            container_id=cid, location=str(location), timeout=120))

    from moorage.stats.checkpoint import criu_path

    if criu_path() is None:
        e = rpc_error(call)
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED and "CRIU" in (e.details() or "")
    elif not _criu_works():
        # CRIU is installed but cannot work on this kernel (criu check fails): the
        # runtime's failure comes back with CRIU's own words, and nothing is left behind.
        e = rpc_error(call)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "checkpoint" in (e.details() or "")
        assert not location.exists()
        assert [p.name for p in location.parent.iterdir()] == []
    else:
        call()
        with tarfile.open(location) as tar:
            names = tar.getnames()
        assert "spec.dump" in names and "config.dump" in names
        assert "rootfs-diff.tar" in names and "checkpoint/inventory.img" in names
    # Left running either way.
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    e = rpc_error(call)
    assert e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)
