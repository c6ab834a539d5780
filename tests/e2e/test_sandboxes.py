"""Pod sandboxes end to end: the daemon in a test-made network namespace, real CNI plugins.

Everything network-facing happens inside a namespace these tests create (the "node"):
the daemon runs there, the CNI bridge lives there, pods hang off it. Nothing touches the
machine's own network.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.conftest import SUBNET, bridge_conflist, in_ns, make_daemon, sh
from tests.fixtures.daemon import Daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hello from pod\\n"); c.close()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(c.recv(100).decode().strip())
"""


def pod_config(name: str, **kw: object) -> pb.PodSandboxConfig:
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}",
                                       attempt=0),
        hostname=name, labels={"app": name, "tier": "test"},
        annotations={"note": "kept verbatim", "x/y": "z"},
    )
    for key, value in kw.items():
        field = getattr(cfg, key)
        if hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(cfg, key, value)
    return cfg


def run_pod(d: Daemon, cfg: pb.PodSandboxConfig, handler: str = "") -> str:
    req = pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler)
    return str(d.runtime.RunPodSandbox(req, timeout=120).pod_sandbox_id)


def pod_status(d: Daemon, pod_id: str, verbose: bool = False) -> pb.PodSandboxStatusResponse:
    return d.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose))


def netns_of(d: Daemon, pod_id: str) -> str:
    return str(json.loads(pod_status(d, pod_id, verbose=True).info["info"])["netnsPath"])


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def assert_node_clean(d: Daemon, node_ns: str, tmp_path: Path) -> None:
    """Nothing of any pod is left: pins, mounts, veths, IP allocations, records."""
    for kind in ("net", "ipc", "uts"):
        kind_dir = d.runroot / "ns" / kind
        assert not kind_dir.exists() or list(kind_dir.iterdir()) == [], kind
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(d.runroot) not in mounts
    links = in_ns(node_ns, "ip", "-o", "link")
    assert "veth" not in links, links
    ipam = tmp_path / "ipam"
    if ipam.exists():
        leftovers = [p.name for n in ipam.iterdir() for p in n.iterdir()
                     if p.name not in ("lock", "last_reserved_ip.0")]
        assert leftovers == []
    assert list((d.root / "sandboxes").iterdir()) == []


def test_pod_lifecycle_and_status(daemon: Daemon, node_ns: str, tmp_path: Path) -> None:
    cfg = pod_config("web", dns_config=pb.DNSConfig(
        servers=["10.96.0.10"], searches=["default.svc.cluster.local", "svc.cluster.local"],
        options=["ndots:5"]))
    cfg.linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "0"
    cfg.linux.sysctls["kernel.shm_rmid_forced"] = "1"
    pod = run_pod(daemon, cfg)
    st = pod_status(daemon, pod, verbose=True)
    s = st.status
    assert s.id == pod and s.state == pb.SANDBOX_READY
    assert (s.metadata.name, s.metadata.namespace, s.metadata.uid) == ("web", "default", "uid-web")
    assert dict(s.labels) == {"app": "web", "tier": "test"}
    assert dict(s.annotations) == {"note": "kept verbatim", "x/y": "z"}
    assert s.created_at > 0 and s.runtime_handler == "runc"
    assert ipaddress.ip_address(s.network.ip) in ipaddress.ip_network(SUBNET)
    assert s.linux.namespaces.options.network == pb.POD
    info = json.loads(st.info["info"])
    netns = info["netnsPath"]
    assert info["cniResult"]["ips"][0]["address"].startswith(s.network.ip)
    # Inside the pod: its IP, its hostname, its sysctls; the node's are untouched.
    assert s.network.ip in in_ns(netns, "ip", "-o", "addr")
    uts = info["namespaces"]["uts"]
    assert sh("nsenter", f"--uts={uts}", "hostname").strip() == "web"
    assert in_ns(netns, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start").strip() == "0"
    ipc = info["namespaces"]["ipc"]
    assert sh("nsenter", f"--ipc={ipc}", "cat", "/proc/sys/kernel/shm_rmid_forced").strip() \
        == "1"
    files = daemon.runroot / "sandboxes" / pod
    resolv = (files / "resolv.conf").read_text()
    assert "nameserver 10.96.0.10" in resolv
    assert "search default.svc.cluster.local svc.cluster.local" in resolv
    assert "options ndots:5" in resolv
    assert (files / "hostname").read_text() == "web\n"
    assert f"{s.network.ip}\tweb" in (files / "hosts").read_text()
    assert "shm" in Path("/proc/self/mountinfo").read_text()
    # List and filters.
    other = run_pod(daemon, pod_config("other"))
    ids = {i.id for i in daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items}
    assert ids == {pod, other}
    flt = pb.PodSandboxFilter(label_selector={"app": "web"})
    assert [i.id for i in daemon.runtime.ListPodSandbox(
        pb.ListPodSandboxRequest(filter=flt)).items] == [pod]
    flt = pb.PodSandboxFilter(id=other[:12])
    assert [i.id for i in daemon.runtime.ListPodSandbox(
        pb.ListPodSandboxRequest(filter=flt)).items] == [other]
    streamed = {i.id for r in daemon.runtime.StreamPodSandboxes(pb.StreamPodSandboxesRequest())
                for i in r.pod_sandboxes}
    assert streamed == ids
    # Stop: not ready, no IP, namespaces unpinned; idempotent.
    for _ in range(2):
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
    s = pod_status(daemon, pod[:10]).status
    assert s.state == pb.SANDBOX_NOTREADY and s.network.ip == ""
    flt = pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY))
    assert [i.id for i in daemon.runtime.ListPodSandbox(
        pb.ListPodSandboxRequest(filter=flt)).items] == [pod]
    assert not Path(netns).exists()
    # Remove (a ready pod is stopped first); idempotent; unknown ids are fine.
    for pod_id in (pod, other, pod, "0" * 64):
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id="f" * 64))
    e = rpc_error(lambda: pod_status(daemon, pod))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert_node_clean(daemon, node_ns, tmp_path)


def _serve(netns: str, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c", SERVER,
                             str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_pods_reachable_from_node_and_each_other_and_host_port(
    daemon: Daemon, node_ns: str
) -> None:
    cfg = pod_config("server")
    cfg.port_mappings.append(pb.PortMapping(protocol=pb.TCP, container_port=8080,
                                            host_port=18080))
    server = run_pod(daemon, cfg)
    client = run_pod(daemon, pod_config("client"))
    server_ip = pod_status(daemon, server).status.network.ip
    proc = _serve(netns_of(daemon, server), 8080)
    try:
        assert in_ns(node_ns, sys.executable, "-c", CLIENT, server_ip, "8080").strip() \
            == "hello from pod"
        assert in_ns(netns_of(daemon, client), sys.executable, "-c", CLIENT, server_ip,
                     "8080").strip() == "hello from pod"
        # hostPort through the portmap plugin: the node's own address on the bridge.
        gateway = str(next(ipaddress.ip_network(SUBNET).hosts()))
        assert in_ns(netns_of(daemon, client), sys.executable, "-c", CLIENT, gateway,
                     "18080").strip() == "hello from pod"
    finally:
        proc.kill()
        proc.wait()


def test_host_network_pod(daemon: Daemon, node_ns: str) -> None:
    cfg = pod_config("hostnet")
    cfg.linux.security_context.namespace_options.network = pb.NODE
    cfg.hostname = ""
    pod = run_pod(daemon, cfg)
    st = pod_status(daemon, pod, verbose=True)
    assert st.status.network.ip == "" and st.status.linux.namespaces.options.network == pb.NODE
    info = json.loads(st.info["info"])
    assert info["netnsPath"] == "" and info["namespaces"]["uts"] is None
    hostname = (daemon.runroot / "sandboxes" / pod / "hostname").read_text().strip()
    assert hostname == sh("hostname").strip()
    cfg = pod_config("hostnet-sysctl")
    cfg.linux.security_context.namespace_options.network = pb.NODE
    cfg.linux.sysctls["net.ipv4.ip_forward"] = "1"
    e = rpc_error(lambda: run_pod(daemon, cfg))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "net.ipv4.ip_forward" in (e.details() or "")


def test_shared_pid_namespace_gets_an_infra_process(daemon: Daemon) -> None:
    cfg = pod_config("shared-pid")
    cfg.linux.security_context.namespace_options.pid = pb.POD
    pod = run_pod(daemon, cfg)
    pid = json.loads(pod_status(daemon, pod, verbose=True).info["info"])["pid"]
    assert pid > 0
    status = Path(f"/proc/{pid}/status").read_text()
    assert "catatonit" in Path(f"/proc/{pid}/comm").read_text()
    nspid = next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()
    assert nspid[-1] == "1"
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns_of(daemon, pod)).st_ino
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
        f"/proc/{pid}/status").read_text()


def test_cgroup_parent_and_pod_resources(daemon: Daemon) -> None:
    parent = f"/moorage-e2e-{secrets.token_hex(3)}/pod-uid-1"
    cfg = pod_config("cg")
    cfg.linux.cgroup_parent = parent
    cfg.linux.resources.CopyFrom(pb.LinuxContainerResources(
        cpu_period=100000, cpu_quota=50000, memory_limit_in_bytes=256 << 20))
    pod = run_pod(daemon, cfg)
    cpu = Path("/sys/fs/cgroup/cpu") / parent.lstrip("/")
    memory = Path("/sys/fs/cgroup/memory") / parent.lstrip("/")
    if Path("/sys/fs/cgroup/cpu").is_dir():  # cgroup v1 (hybrid), as on these machines
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(256 << 20)
    info = json.loads(pod_status(daemon, pod, verbose=True).info["info"])
    assert info["cgroupPath"] == parent
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert not cpu.exists() and not memory.exists()
    assert not cpu.parent.exists()


def test_bad_requests_name_the_field(daemon: Daemon) -> None:
    cases: list[tuple[pb.RunPodSandboxRequest, str]] = []
    cfg = pod_config("x")
    cfg.metadata.name = ""
    cases.append((pb.RunPodSandboxRequest(config=cfg), "config.metadata.name"))
    cases.append((pb.RunPodSandboxRequest(config=pod_config("x"), runtime_handler="kata"),
                  "kata"))
    cfg = pod_config("x")
    cfg.linux.sysctls["vm.swappiness"] = "10"
    cases.append((pb.RunPodSandboxRequest(config=cfg), "vm.swappiness"))
    cfg = pod_config("x", dns_config=pb.DNSConfig(servers=["not-an-ip"]))
    cases.append((pb.RunPodSandboxRequest(config=cfg), "dns_config"))
    cfg = pod_config("x")
    cfg.hostname = "bad_host!"
    cases.append((pb.RunPodSandboxRequest(config=cfg), "hostname"))
    cfg = pod_config("x")
    cfg.linux.cgroup_parent = "relative/path"
    cases.append((pb.RunPodSandboxRequest(config=cfg), "cgroup_parent"))
    cases.append((pb.RunPodSandboxRequest(), "config"))
    for req, word in cases:
        e = rpc_error(lambda req=req: daemon.runtime.RunPodSandbox(req))  # type: ignore[misc]
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (word, e.details())
        assert word in (e.details() or ""), (word, e.details())
    assert not daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    e = rpc_error(lambda: daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest()))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_same_metadata_retry_and_clash(daemon: Daemon) -> None:
    cfg = pod_config("dup")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: run_pod(daemon, cfg), range(4)))
    assert len(set(ids)) == 1
    e = rpc_error(lambda: run_pod(daemon, cfg))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and ids[0] in (e.details() or "")
    cfg.metadata.attempt = 1
    assert run_pod(daemon, cfg) != ids[0]


def test_thirty_parallel_pods_unique_ips_and_clean_teardown(
    daemon: Daemon, node_ns: str, tmp_path: Path
) -> None:
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        pods = list(pool.map(lambda i: run_pod(daemon, pod_config(f"p{i}")), range(30)))
    ips = [pod_status(daemon, p).status.network.ip for p in pods]
    assert len(set(ips)) == 30 and all(ips)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda p: daemon.runtime.RemovePodSandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=p)), pods))
    assert not daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert_node_clean(daemon, node_ns, tmp_path)


def _failing_plugin(plugin_dir: Path) -> None:
    plugin_dir.mkdir(exist_ok=True)
    script = plugin_dir / "failer"
    script.write_text('#!/bin/sh\ncat >/dev/null\nif [ "$CNI_COMMAND" = ADD ]; then\n'
                      'echo \'{"cniVersion":"1.0.0","code":11,"msg":"injected failure"}\'\n'
                      "exit 1\nfi\nexit 0\n")
    script.chmod(0o755)


def test_cni_failures_leave_nothing(tmp_path: Path, node_ns: str, cni_dir: Path) -> None:
    plugins = tmp_path / "plugins"
    _failing_plugin(plugins)
    (cni_dir / "10-bridge.conflist").write_text(json.dumps(
        bridge_conflist(tmp_path, [{"type": "failer"}])))
    d = make_daemon(tmp_path, node_ns, cni_dir, ["--cni-plugin-dir", str(plugins)]).start()
    try:
        e = rpc_error(lambda: run_pod(d, pod_config("fails")))
        assert "injected failure" in (e.details() or "") and "failer" in (e.details() or "")
        assert_node_clean(d, node_ns, tmp_path)
        # A missing plugin.
        (cni_dir / "10-bridge.conflist").write_text(json.dumps(
            bridge_conflist(tmp_path, [{"type": "no-such-plugin"}])))
        e = rpc_error(lambda: run_pod(d, pod_config("missing")))
        assert "no-such-plugin" in (e.details() or "")
        assert_node_clean(d, node_ns, tmp_path)
    finally:
        d.stop()


def test_a_failed_del_is_retried_at_the_next_start(tmp_path: Path, node_ns: str,
                                                   cni_dir: Path) -> None:
    """RemovePodSandbox succeeds although a plugin's DEL fails (a pod never becomes
    unremovable, as in CRI-O); the next daemon DELs the attachment again and the IP is
    released."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    flag = tmp_path / "fail-del"
    script = plugins / "delfail"
    # Chained after bridge: ADD passes the previous result on; DEL fails while the flag is.
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "conf = json.load(sys.stdin)\n"
        "if os.environ['CNI_COMMAND'] == 'ADD':\n"
        "    print(json.dumps(conf['prevResult']))\n"
        f"elif os.environ['CNI_COMMAND'] == 'DEL' and os.path.exists({str(flag)!r}):\n"
        "    print(json.dumps({'cniVersion': '1.0.0', 'code': 11,\n"
        "                      'msg': 'injected DEL failure'}))\n"
        "    sys.exit(1)\n")
    script.chmod(0o755)
    (cni_dir / "10-bridge.conflist").write_text(json.dumps(
        bridge_conflist(tmp_path, [{"type": "delfail"}])))
    d = make_daemon(tmp_path, node_ns, cni_dir, ["--cni-plugin-dir", str(plugins)]).start()
    try:
        pod = run_pod(d, pod_config("leaky"))
        ip = pod_status(d, pod).status.network.ip
        assert (tmp_path / "ipam" / "moorage-test" / ip).exists()
        flag.touch()
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
        assert not d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert "injected DEL failure" in d.log_path.read_text()
        assert (tmp_path / "ipam" / "moorage-test" / ip).exists()  # still held
        flag.unlink()
        d.stop()
        d.start()
        assert "sandbox.network_released" in d.log_path.read_text()
        assert not (tmp_path / "ipam" / "moorage-test" / ip).exists()
        assert list((d.root / "network" / "cni-cache").iterdir()) == []
        assert_node_clean(d, node_ns, tmp_path)
    finally:
        d.stop()


def test_network_ready_follows_the_config_dir(tmp_path: Path, node_ns: str) -> None:
    empty = tmp_path / "late.d"
    empty.mkdir()
    d = make_daemon(tmp_path, node_ns, empty).start()
    try:
        cond = {c.type: c for c in d.runtime.Status(pb.StatusRequest()).status.conditions}
        assert not cond["NetworkReady"].status
        assert str(empty) in cond["NetworkReady"].message
        (empty / "5-broken.conflist").write_text("{not json")
        (empty / "10-bridge.conflist").write_text(json.dumps(bridge_conflist(tmp_path)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cond = {c.type: c for c in d.runtime.Status(pb.StatusRequest()).status.conditions}
            if cond["NetworkReady"].status:
                break
            time.sleep(0.2)
        assert cond["NetworkReady"].status
        st = d.runtime.Status(pb.StatusRequest())
        assert {"", "runc"} <= {h.name for h in st.runtime_handlers}
        pod = run_pod(d, pod_config("late"))
        assert pod_status(d, pod).status.network.ip
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    finally:
        d.stop()


def test_restart_keeps_pods_and_reboot_makes_them_not_ready(
    daemon: Daemon, node_ns: str, tmp_path: Path
) -> None:
    pod = run_pod(daemon, pod_config("survivor"))
    before = pod_status(daemon, pod).status
    daemon.kill9()
    daemon.start()
    after = pod_status(daemon, pod).status
    assert after == before
    # A "reboot": the pinned namespaces are gone (runroot is a tmpfs on real nodes).
    netns = netns_of(daemon, pod)
    daemon.stop()
    for kind in ("net", "ipc", "uts"):
        pin = daemon.runroot / "ns" / kind / pod
        sh("umount", "-l", str(pin), check=False)
    daemon.start()
    st = pod_status(daemon, pod).status
    assert st.state == pb.SANDBOX_NOTREADY and st.network.ip == ""
    assert not Path(netns).exists()
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert_node_clean(daemon, node_ns, tmp_path)
