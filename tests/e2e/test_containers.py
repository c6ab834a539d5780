"""Containers end to end: pulled busybox images, real pods, runc, the monitor, CRI logs."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.conftest import make_daemon
from tests.e2e.test_images import insecure_conf
from tests.fixtures.daemon import OOM_SCORE_CLAMP, Daemon
from tests.fixtures.oci import Image, push_image
from tests.fixtures.procs import wait_dead
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
LOG_LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) "
                      rb"(P|F) (.*)$")


@pytest.fixture(scope="module")
def busybox_ref(registry: Registry) -> str:
    image = Image.busybox(labels={"suite": "containers"}, stop_signal="SIGTERM")
    push_image(registry, "e2e/ctr-busybox", "1", image)
    return registry.ref("e2e/ctr-busybox", "1")


@pytest.fixture
def env(tmp_path: Path, node_ns: str, cni_dir: Path, registry: Registry,
        busybox_ref: str) -> Iterator[Env]:
    with running_env(tmp_path, node_ns, cni_dir, registry, busybox_ref) as e:
        yield e


@contextlib.contextmanager
def running_env(base: Path, node_ns: str, cni_dir: Path, registry: Registry,
                busybox_ref: str, *, config_extra: str = "",
                images: tuple[str, ...] = (),
                daemon_env: dict[str, str] | None = None) -> Iterator[Env]:
    """A daemon with state in ``base`` running in the node namespace, busybox (and
    ``images``) pulled; ``config_extra`` is TOML added to its config drop-in,
    ``daemon_env`` its environment. At the end every pod is removed and the daemon
    stopped."""
    d = make_daemon(base, node_ns, cni_dir)
    d.config_text = OOM_SCORE_CLAMP + config_extra
    d.env = dict(daemon_env or {})
    d.registries_conf_text = insecure_conf(registry)
    # The registry listens on the machine's loopback; the pods' daemon runs in the node
    # namespace. Pull first from a daemon outside it, on the same state.
    node, d.netns = d.netns, None
    d.start()
    image_ref = d.images.PullImage(pb.PullImageRequest(
        image=pb.ImageSpec(image=busybox_ref))).image_ref
    for ref in images:
        d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    d.stop()
    d.netns = node
    d.start()
    e = Env(d, base, busybox_ref)
    e.image_ref = image_ref
    try:
        yield e
    finally:
        d.remove_pods_and_stop()




class Env:
    def __init__(self, d: Daemon, tmp: Path, image: str) -> None:
        self.d = d
        self.tmp = tmp
        self.image = image
        self.image_ref = ""
        self.rt = d.runtime
        self._n = 0

    def pod(self, name: str = "", runtime_handler: str = "", *, uid: str = "",
            cgroup_parent: str = "", resources: pb.LinuxContainerResources | None = None,
            **linux: object) -> str:
        """A pod; ``linux`` are its namespace options."""
        self._n += 1
        name = name or f"pod{self._n}"
        cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="ns", uid=uid or f"uid-{name}"),
            hostname=name, log_directory=str(self.tmp / "logs" / name))
        cfg.linux.cgroup_parent = cgroup_parent
        if resources is not None:
            cfg.linux.resources.CopyFrom(resources)
        options = cfg.linux.security_context.namespace_options
        for key, value in linux.items():
            if hasattr(value, "CopyFrom"):
                getattr(options, key).CopyFrom(value)
            else:
                setattr(options, key, value)
        self.last_pod_config = cfg
        return str(self.rt.RunPodSandbox(pb.RunPodSandboxRequest(
            config=cfg, runtime_handler=runtime_handler), timeout=120).pod_sandbox_id)

    def config(self, name: str, cmd: list[str], **kw: object) -> pb.ContainerConfig:
        cfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=self.image),
            command=cmd, log_path=f"{name}/0.log", labels={"c": name},
            annotations={"note": "verbatim"})
        for key, value in kw.items():
            field = getattr(cfg, key)
            if hasattr(field, "CopyFrom"):
                field.CopyFrom(value)
            elif isinstance(value, list):
                field.extend(value)
            else:
                setattr(cfg, key, value)
        return cfg

    def create(self, pod: str, cfg: pb.ContainerConfig) -> str:
        return str(self.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=cfg, sandbox_config=self.last_pod_config),
            timeout=120).container_id)

    def run(self, pod: str, name: str, cmd: list[str], **kw: object) -> str:
        cid = self.create(pod, self.config(name, cmd, **kw))
        self.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
        return cid

    def status(self, cid: str, verbose: bool = False) -> pb.ContainerStatusResponse:
        return self.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid,
                                                                 verbose=verbose))

    def wait_state(self, cid: str, state: int, timeout: float = 20) -> pb.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(cid).status
            if st.state == state or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def exec(self, cid: str, cmd: list[str], timeout: int = 10) -> pb.ExecSyncResponse:
        return self.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout))

    def log_lines(self, cid: str) -> list[tuple[bytes, bytes, bytes]]:
        path = Path(self.status(cid).status.log_path)
        out = []
        for line in path.read_bytes().splitlines():
            m = LOG_LINE.match(line)
            assert m, line
            out.append((m.group(2), m.group(3), m.group(4)))
        return out


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def test_run_to_completion_status_and_logs(env: Env) -> None:
    pod = env.pod()
    mount_src = env.tmp / "data"
    mount_src.mkdir()
    (mount_src / "f").write_text("from the host\n")
    cid = env.run(pod, "once", ["sh", "-c", "echo hello; echo oops >&2; cat /data/f; exit 3"],
                  mounts=[pb.Mount(container_path="/data", host_path=str(mount_src),
                                   readonly=True)])
    st = env.wait_state(cid, pb.CONTAINER_EXITED)
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 3 and st.reason == "Error"
    assert st.created_at <= st.started_at <= st.finished_at
    assert st.image.image == env.image and st.image_ref == env.image_ref
    assert st.image_id == env.image_ref
    assert dict(st.labels) == {"c": "once"} and dict(st.annotations) == {"note": "verbatim"}
    assert [(m.container_path, m.host_path, m.readonly) for m in st.mounts] == [
        ("/data", str(mount_src), True)]
    assert st.log_path == str(env.tmp / "logs" / "pod1" / "once" / "0.log")
    lines = env.log_lines(cid)
    assert (b"stdout", b"F", b"hello") in lines
    assert (b"stderr", b"F", b"oops") in lines
    assert (b"stdout", b"F", b"from the host") in lines
    ok = env.run(pod, "ok", ["true"])
    st = env.wait_state(ok, pb.CONTAINER_EXITED)
    assert (st.exit_code, st.reason) == (0, "Completed")
    assert Path(st.log_path).exists() and Path(st.log_path).read_bytes() == b""
    info = json.loads(env.status(ok, verbose=True).info["info"])
    assert info["runtimeSpec"]["process"]["args"] == ["true"]
    # Lists and filters.
    listed = env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert {c.id for c in listed} == {cid, ok}
    flt = pb.ContainerFilter(label_selector={"c": "ok"})
    assert [c.id for c in env.rt.ListContainers(pb.ListContainersRequest(filter=flt)).containers
            ] == [ok]
    flt = pb.ContainerFilter(id=cid[:10], pod_sandbox_id=pod)
    assert [c.id for c in env.rt.ListContainers(pb.ListContainersRequest(filter=flt)).containers
            ] == [cid]
    flt = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
    assert not env.rt.ListContainers(pb.ListContainersRequest(filter=flt)).containers
    streamed = [c.id for r in env.rt.StreamContainers(pb.StreamContainersRequest())
                for c in r.containers]
    assert sorted(streamed) == sorted([cid, ok])
    e = rpc_error(lambda: env.rt.StartContainer(pb.StartContainerRequest(container_id=ok)))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_stop_signals_timeouts_and_idempotence(env: Env) -> None:
    pod = env.pod()
    term = env.run(pod, "term", ["sleep", "1000"])
    assert env.wait_state(term, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    env.rt.StopContainer(pb.StopContainerRequest(container_id=term, timeout=10))
    st = env.status(term).status
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 143  # SIGTERM
    # A process that ignores SIGTERM is killed after the timeout.
    stubborn = env.run(pod, "stubborn", [
        "sh", "-c", "trap '' TERM; touch /tmp/trapped; while :; do sleep 1; done"])
    env.wait_state(stubborn, pb.CONTAINER_RUNNING)
    deadline = time.monotonic() + 30
    while env.exec(stubborn, ["test", "-e", "/tmp/trapped"]).exit_code != 0:
        assert time.monotonic() < deadline, "the shell never set its trap"
        time.sleep(0.05)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=stubborn, timeout=1))
    assert env.status(stubborn).status.exit_code == 137
    now = env.run(pod, "now", ["sleep", "1000"])
    env.wait_state(now, pb.CONTAINER_RUNNING)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=now, timeout=0))
    assert env.status(now).status.exit_code == 137
    for cid in (now, "f" * 64):
        env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    e = rpc_error(lambda: env.status(now))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    # Remove kills a running container first.
    running = env.run(pod, "running", ["sleep", "1000"])
    env.wait_state(running, pb.CONTAINER_RUNNING)
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=running))
    assert running not in {c.id for c in env.rt.ListContainers(
        pb.ListContainersRequest()).containers}


def test_exec_sync(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "exec", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    r = env.exec(cid, ["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 4)
    assert env.exec(cid, ["hostname"]).stdout == b"pod1\n"
    e = rpc_error(lambda: env.exec(cid, ["sleep", "30"], timeout=1))
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ps = env.exec(cid, ["ps", "-o", "comm"]).stdout.decode()
    assert "sleep" in ps and ps.count("sleep") == 1  # the timed-out exec is gone
    e = rpc_error(lambda: env.exec(cid, []))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    e = rpc_error(lambda: env.exec(cid, ["true"]))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_two_containers_share_network_and_ipc(env: Env) -> None:
    pod = env.pod(pid=pb.CONTAINER)
    own_pid = pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
        namespace_options=pb.NamespaceOption(pid=pb.CONTAINER)))
    a = env.run(pod, "a", ["sleep", "1000"], linux=own_pid)
    b = env.run(pod, "b", ["sleep", "1000"], linux=own_pid)
    env.wait_state(a, pb.CONTAINER_RUNNING)
    env.wait_state(b, pb.CONTAINER_RUNNING)

    def ns(cid: str, kind: str) -> bytes:
        return bytes(env.exec(cid, ["sh", "-c", f"readlink /proc/self/ns/{kind}"]).stdout)

    assert ns(a, "net") == ns(b, "net") and ns(a, "ipc") == ns(b, "ipc")
    assert ns(a, "pid") != ns(b, "pid")  # CONTAINER pid mode
    server = env.run(pod, "server", ["sh", "-c", "nc -ll -p 8080 -e echo hi-from-a"],
                     linux=own_pid)
    env.wait_state(server, pb.CONTAINER_RUNNING)
    out = b""
    for _ in range(50):
        out = bytes(env.exec(b, ["sh", "-c", "nc 127.0.0.1 8080 </dev/null"]).stdout)
        if out:
            break
        time.sleep(0.1)
    assert out.strip() == b"hi-from-a"


def test_shared_pid_namespace_pod(env: Env) -> None:
    pod = env.pod("sharedpid", pid=pb.POD)
    a = env.run(pod, "a", ["sleep", "1000"])
    b = env.run(pod, "b", ["sleep", "1001"])
    env.wait_state(b, pb.CONTAINER_RUNNING)
    ps = env.exec(a, ["ps", "-o", "args"]).stdout.decode()
    assert "sleep 1001" in ps and "catatonit" in ps


def test_oom_killed(env: Env) -> None:
    pod = env.pod()
    res = pb.LinuxContainerResources(memory_limit_in_bytes=32 << 20)
    cid = env.run(pod, "hog", ["sh", "-c", "tail /dev/zero"],
                  linux=pb.LinuxContainerConfig(resources=res))
    st = env.wait_state(cid, pb.CONTAINER_EXITED, timeout=60)
    assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 137, "OOMKilled")


def test_crash_loop_create_start_remove(env: Env) -> None:
    pod = env.pod()
    for attempt in range(5):
        cfg = env.config("crash", ["sh", "-c", "echo attempt; exit 1"])
        cfg.metadata.attempt = attempt
        cfg.log_path = f"crash/{attempt}.log"
        cid = env.create(pod, cfg)
        env.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
        st = env.wait_state(cid, pb.CONTAINER_EXITED)
        assert (st.exit_code, st.reason) == (1, "Error")
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert sorted(p.name for p in (env.tmp / "logs/pod1/crash").iterdir()) == [
        f"{i}.log" for i in range(5)]


def test_reopen_log_and_update_resources(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "chatty", ["sh", "-c", "while :; do echo tick; sleep 0.1; done"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    log = Path(env.status(cid).status.log_path)
    time.sleep(0.5)
    log.rename(log.with_name("0.log.1"))
    env.rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    assert log.exists()  # reopened before the call returns, as kubelet's rotation expects
    deadline = time.monotonic() + 30
    while b"tick" not in log.read_bytes():  # the next tick goes to the new file
        assert time.monotonic() < deadline, "no output in the reopened log"
        time.sleep(0.1)
    res = pb.LinuxContainerResources(memory_limit_in_bytes=96 << 20, cpu_shares=512)
    env.rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=res))
    st = env.status(cid).status
    assert st.resources.linux.memory_limit_in_bytes == 96 << 20
    info = json.loads(env.status(cid, verbose=True).info["info"])
    cgroup = info["runtimeSpec"]["linux"]["cgroupsPath"]
    limit = Path("/sys/fs/cgroup/memory") / cgroup.lstrip("/") / "memory.limit_in_bytes"
    if limit.parent.is_dir():
        assert limit.read_text().strip() == str(96 << 20)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    log.unlink()
    e = rpc_error(lambda: env.rt.ReopenContainerLog(
        pb.ReopenContainerLogRequest(container_id=cid)))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not log.exists()


def test_tty_container_logs_as_stdout(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "tty", ["sh", "-c", "echo on-tty; echo err >&2"], tty=True)
    env.wait_state(cid, pb.CONTAINER_EXITED)
    streams = {s for s, _, _ in env.log_lines(cid)}
    assert streams == {b"stdout"}


def test_pod_stop_and_remove_take_the_containers(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "long", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert env.status(cid).status.state == pb.CONTAINER_EXITED
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert "overlay" not in "".join(
        ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(env.d.root) in ln)


def test_bad_requests_and_nothing_left_behind(env: Env) -> None:
    pod = env.pod()
    cases: list[tuple[pb.ContainerConfig, str, grpc.StatusCode]] = [
        (env.config("a", ["true"], image=pb.ImageSpec(image="absent:1")), "absent",
         grpc.StatusCode.NOT_FOUND),
        (env.config("b", ["true"], mounts=[pb.Mount(container_path="/x",
                                                    host_path="/no/such/path")]),
         "/no/such/path", grpc.StatusCode.INVALID_ARGUMENT),
        (env.config("c", ["true"], linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(run_as_username="nosuchuser"))),
         "nosuchuser", grpc.StatusCode.INVALID_ARGUMENT),
        (env.config("", ["true"]), "metadata.name", grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for cfg, word, code in cases:
        e = rpc_error(lambda cfg=cfg: env.create(pod, cfg))  # type: ignore[misc]
        assert e.code() == code, (word, e.details())
        assert word in (e.details() or ""), (word, e.details())
    e = rpc_error(lambda: env.create("0" * 64, env.config("d", ["true"])))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert list((env.d.root / "containers").iterdir()) == []
    assert not list((env.d.root / "overlay" / "containers").glob("*"))
    first = env.create(pod, env.config("dup", ["true"]))
    e = rpc_error(lambda: env.create(pod, env.config("dup", ["true"])))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and first in (e.details() or "")


def test_daemon_restart_reports_the_truth(env: Env) -> None:
    pod = env.pod()
    runner = env.run(pod, "runner", ["sleep", "1000"])
    quitter = env.run(pod, "quitter", ["sh", "-c", "sleep 2; exit 7"])
    env.wait_state(runner, pb.CONTAINER_RUNNING)
    env.d.kill9()
    time.sleep(3)  # quitter exits while the daemon is down
    before_restart = time.time_ns()
    env.d.start()
    env.rt = env.d.runtime
    st = env.status(runner).status
    assert st.state == pb.CONTAINER_RUNNING
    st = env.status(quitter).status
    assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 7)
    assert st.finished_at < before_restart
    # The monitor is still watching the runner: a stop now is seen.
    env.rt.StopContainer(pb.StopContainerRequest(container_id=runner, timeout=0))
    assert env.status(runner).status.exit_code == 137


def test_parallel_pods_with_containers(env: Env) -> None:
    def one(i: int) -> str:
        pod = env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=f"par{i}", namespace="ns", uid=f"u{i}"),
            log_directory=str(env.tmp / "logs" / f"par{i}")))).pod_sandbox_id
        cid = env.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=env.config("c", ["sleep", "100"]))).container_id
        env.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
        return str(cid)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        cids = list(pool.map(one, range(10)))
    for cid in cids:
        assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING


def test_lost_monitor_is_never_reported_running(env: Env) -> None:
    """As after a reboot: no monitor and no exit status left for a container."""
    pod = env.pod()
    cid = env.run(pod, "orphan", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    info = json.loads(env.status(cid, verbose=True).info["info"])
    env.d.kill9()
    for pid in (info["monitorPid"], info["pid"]):
        os.kill(pid, 9)
    for pid in (info["monitorPid"], info["pid"]):
        wait_dead(pid)
    env.d.start()
    env.rt = env.d.runtime
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED and st.exit_code != 0
    assert "monitor" in st.message
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_second_runtime_handler(tmp_path: Path, node_ns: str, cni_dir: Path,
                                registry: Registry, busybox_ref: str) -> None:
    """A pod naming another configured handler runs under it (its own binary and root).

    crun would be the natural second handler, but Debian 12's crun refuses cgroup v1
    hybrid hosts such as these test machines; a second runc handler proves the wiring.
    """
    runc = shutil.which("runc") or "/usr/sbin/runc"
    alt_root = tmp_path / "alt-root"
    d = make_daemon(tmp_path, node_ns, cni_dir)
    d.config_text = (OOM_SCORE_CLAMP + f'[runtimes.alt]\nruntime_path = "{runc}"\n'
                     f'runtime_root = "{alt_root}"\n')
    d.registries_conf_text = insecure_conf(registry)
    node, d.netns = d.netns, None
    d.start()
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=busybox_ref)))
    d.stop()
    d.netns = node
    d.start()
    try:
        env = Env(d, tmp_path, busybox_ref)
        handlers = {h.name for h in d.runtime.Status(pb.StatusRequest()).runtime_handlers}
        assert {"", "runc", "alt"} <= handlers
        cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name="alt", namespace="ns", uid="u-alt"),
            log_directory=str(tmp_path / "logs" / "alt"))
        pod = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(
            config=cfg, runtime_handler="alt")).pod_sandbox_id
        env.last_pod_config = cfg
        assert d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(
            pod_sandbox_id=pod)).status.runtime_handler == "alt"
        cid = env.run(pod, "c", ["sleep", "100"])
        env.wait_state(cid, pb.CONTAINER_RUNNING)
        assert (alt_root / cid).is_dir()  # the alt handler's runc state dir
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    finally:
        d.stop()


def test_status_command_and_wipe(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, "inspected", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    base = ["--listen", str(env.d.socket)]

    def moorage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "moorage", *args], capture_output=True,
                              text=True, timeout=120)

    out = moorage(*base, "status", "containers", cid[:12])
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["id"] == cid and info["state"] == "CONTAINER_RUNNING"
    assert info["pid"] > 0 and info["monitorPid"] > 0 and info["bundle"]
    assert any(m["destination"] == "/etc/hostname" for m in info["mounts"])
    out = moorage(*base, "status", "info")
    assert out.returncode == 0 and json.loads(out.stdout)["conditions"]["RuntimeReady"]["status"]
    out = moorage(*base, "status", "config")
    assert json.loads(out.stdout)["root"] == str(env.d.root)
    # wipe refuses while the daemon runs, then removes everything.
    # wipe with the daemon's own command line (in its network namespace, config, dirs).
    argv = env.d.args()

    def wipe(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv, "wipe", *extra], capture_output=True, text=True,
                              timeout=120)

    out = wipe()
    assert out.returncode == 1 and "another moorage daemon" in out.stderr
    env.d.stop()
    out = wipe("--images")
    assert out.returncode == 0, out.stderr
    assert "removed 1 pods, 1 containers, 1 images" in out.stdout
    env.d.start()
    env.rt = env.d.runtime
    assert not env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert not env.d.images.ListImages(pb.ListImagesRequest()).images
    assert str(env.d.root) not in Path("/proc/self/mountinfo").read_text()
