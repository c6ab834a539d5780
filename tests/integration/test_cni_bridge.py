"""CNIManager with Debian's real CNI plugins (bridge, host-local, loopback, portmap), as root.

Everything happens inside network namespaces that the tests create: the test thread enters a
fresh "host" namespace for the duration of each test (``tests.fixtures.netns.entered``), so
the bridge, the veths, portmap's iptables rules and every socket the test opens live there,
and pods are further namespaces made with ``ip netns add``. host-local keeps its allocations
in a per-test ``dataDir``. Deleting the namespaces at the end takes everything with them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moorage.network import AttachRequest, AttachResult, CNIError, CNIManager, PortMapping
from tests.fixtures.netns import (
    NetNS,
    NetNSFactory,
    current_netns_inode,
    entered,
    netns_available,
)
from tests.fixtures.netns import netns_factory as _netns_factory

PLUGIN_DIR = Path("/usr/lib/cni")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not netns_available(), reason="needs root, ip and nsenter"),
    pytest.mark.skipif(
        not (PLUGIN_DIR / "bridge").exists(),
        reason=f"{PLUGIN_DIR} has no CNI plugins (Debian package containernetworking-plugins)",
    ),
    pytest.mark.timeout(60),
]

ECHO_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.sendall(b"echo:" + c.recv(1024))
"""

ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    c.sendall(b"hi")
    print(c.recv(1024).decode())
"""

FAILING_PLUGIN = """#!/bin/sh
cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion":"1.0.0","code":100,"msg":"injected failure","details":"from the test"}'
  exit 5
fi
exit 0
"""


class Lab:
    """One test's world: a host netns, a network config, pods, and what to check."""

    def __init__(self, root: Path, nsf: NetNSFactory, host: NetNS) -> None:
        self.root = root
        self.nsf = nsf
        self.host = host
        self.conf_dir = root / "net.d"
        self.cache_dir = root / "cache"
        self.conf_dir.mkdir()
        self.octet = secrets.randbelow(200) + 20
        self.name = f"mrgnet{secrets.token_hex(3)}"
        self.bridge = f"mrgbr{secrets.token_hex(3)}"
        self.data_dir = root / "ipam"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.99.{self.octet}.0/24")

    @property
    def gateway(self) -> str:
        return f"10.99.{self.octet}.1"

    def bridge_plugin(self) -> dict[str, Any]:
        return {
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": str(self.subnet)}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.data_dir),
            },
        }

    def write_conflist(self, *extra_plugins: dict[str, Any], filename: str = "") -> Path:
        doc = {
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                self.bridge_plugin(),
                {"type": "loopback"},
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                *extra_plugins,
            ],
        }
        path = self.conf_dir / (filename or f"10-{self.name}.conflist")
        path.write_text(json.dumps(doc))
        return path

    def manager(self, plugin_dirs: tuple[Path, ...] = (PLUGIN_DIR,)) -> CNIManager:
        return CNIManager(self.conf_dir, plugin_dirs, self.cache_dir)

    def pod(self) -> NetNS:
        return self.nsf.create("mrgp")

    def request(self, pod: NetNS, sandbox_id: str = "", **kwargs: Any) -> AttachRequest:
        sid = sandbox_id or secrets.token_hex(16)
        return AttachRequest(sid, pod.path, "default", f"pod-{sid[:6]}", f"uid-{sid}", **kwargs)

    def allocations(self, name: str = "") -> list[str]:
        """host-local's reservation files (one per allocated IP)."""
        directory = self.data_dir / (name or self.name)
        if not directory.is_dir():
            return []
        found = []
        for entry in directory.iterdir():
            try:
                ipaddress.ip_address(entry.name)
            except ValueError:
                continue
            found.append(entry.name)
        return sorted(found)

    def veths(self) -> list[str]:
        return self.host.links("veth")

    def echo_server(self, pod: NetNS, port: int) -> None:
        proc = self.nsf.popen(
            pod,
            sys.executable,
            "-I",
            "-c",
            ECHO_SERVER,
            str(port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""


def link_flags(ns: NetNS, ifname: str) -> list[str]:
    """The flags of a link ("<LOOPBACK,UP,LOWER_UP>" -> [...])."""
    out = ns.ip("-o", "link", "show", ifname).stdout
    return out.split("<", 1)[1].split(">", 1)[0].split(",")


def connect(host: str, port: int) -> str:
    """A TCP round trip from the test thread (which is in the lab's host namespace)."""
    with socket.create_connection((host, port), timeout=5) as c:
        c.sendall(b"hi")
        return c.recv(1024).decode()


def connect_from(pod: NetNS, host: str, port: int) -> str:
    return pod.run(sys.executable, "-I", "-c", ECHO_CLIENT, host, str(port)).stdout.strip()


netns_factory = _netns_factory  # the shared fixture, used by ``lab``


@pytest.fixture
def lab(tmp_path: Path, netns_factory: NetNSFactory) -> Iterator[Lab]:
    host = netns_factory.create("mrgh")
    home = current_netns_inode()
    with entered(host.path):
        assert current_netns_inode() != home
        yield Lab(tmp_path, netns_factory, host)
    assert current_netns_inode() == home


def assert_attached(lab: Lab, pod: NetNS, res: AttachResult) -> str:
    assert res.network == lab.name
    assert len(res.ips) == 1
    ip = res.ips[0]
    assert ipaddress.ip_address(ip) in lab.subnet
    assert ip != lab.gateway
    assert f"{ip}/24" in pod.addresses("eth0")
    assert ip in lab.allocations()
    return ip


# -- tests ----------------------------------------------------------------------------------


async def test_add_and_del(lab: Lab) -> None:
    lab.write_conflist()
    m = lab.manager()
    assert m.status() == (True, "", "")
    pod = lab.pod()
    req = lab.request(pod)
    res = await m.attach(req)
    ip = assert_attached(lab, pod, res)
    assert len(lab.veths()) == 1
    assert "UP" in link_flags(pod, "lo")
    cached = m.cached(req.sandbox_id)
    assert cached is not None and cached["result"] == res.result
    assert cached["network"] == lab.name

    await m.detach(req.sandbox_id, pod.path)
    assert lab.veths() == []
    assert lab.allocations() == []
    assert "eth0" not in pod.links()
    assert m.cached(req.sandbox_id) is None
    # A second DEL (kubelet's StopPodSandbox is retried) is fine.
    await m.detach(req.sandbox_id, pod.path)
    assert ip not in lab.allocations()


async def test_traffic_host_to_pod_and_pod_to_pod(lab: Lab) -> None:
    lab.write_conflist()
    m = lab.manager()
    pod_a, pod_b = lab.pod(), lab.pod()
    req_a, req_b = lab.request(pod_a), lab.request(pod_b)
    ip_a = assert_attached(lab, pod_a, await m.attach(req_a))
    ip_b = assert_attached(lab, pod_b, await m.attach(req_b))
    assert ip_a != ip_b
    lab.echo_server(pod_a, 7001)
    lab.echo_server(pod_b, 7002)
    assert connect(ip_a, 7001) == "echo:hi"
    assert connect(ip_b, 7002) == "echo:hi"
    assert connect_from(pod_b, ip_a, 7001) == "echo:hi"
    assert connect_from(pod_a, ip_b, 7002) == "echo:hi"
    await m.detach(req_a.sandbox_id, pod_a.path)
    await m.detach(req_b.sandbox_id, pod_b.path)
    assert lab.veths() == [] and lab.allocations() == []


async def test_host_port_via_portmap(lab: Lab) -> None:
    lab.write_conflist()
    m = lab.manager()
    pod = lab.pod()
    req = lab.request(pod, port_mappings=(PortMapping(18080, 8080), PortMapping(0, 9090)))
    await m.attach(req)
    lab.echo_server(pod, 8080)
    # The host's own address on the bridge, at the host port: DNAT'd to the pod.
    assert connect(lab.gateway, 18080) == "echo:hi"
    nat = lab.host.run("iptables-save", "-t", "nat").stdout
    assert "18080" in nat and req.sandbox_id in nat
    await m.detach(req.sandbox_id, pod.path)
    nat = lab.host.run("iptables-save", "-t", "nat").stdout
    assert req.sandbox_id not in nat
    with pytest.raises(OSError):
        connect(lab.gateway, 18080)


async def test_del_after_config_change_uses_the_cache(lab: Lab) -> None:
    conf = lab.write_conflist()
    m = lab.manager()
    pod = lab.pod()
    req = lab.request(pod)
    ip = assert_attached(lab, pod, await m.attach(req))
    old_name = lab.name
    old_bridge = lab.bridge
    # The network is reconfigured: another name, bridge, subnet and IPAM dir.
    conf.unlink()
    lab.name, lab.bridge, lab.octet = "othernet", "mrgother0", lab.octet + 1
    lab.data_dir = lab.root / "ipam-other"
    lab.write_conflist()
    assert m.status()[0] and m.default().name == "othernet"
    # A restarted daemon (fresh manager, same cache dir) still cleans up the old attachment.
    await lab.manager().detach(req.sandbox_id, pod.path)
    assert lab.veths() == []
    lab.data_dir = lab.root / "ipam"
    assert ip not in lab.allocations(old_name)
    assert lab.allocations(old_name) == []
    assert old_bridge in lab.host.links("bridge")  # the old bridge stays, as with any CNI


async def test_del_with_the_netns_already_gone(lab: Lab) -> None:
    lab.write_conflist()
    m = lab.manager()
    pod = lab.pod()
    req = lab.request(pod, port_mappings=(PortMapping(18081, 80),))
    assert_attached(lab, pod, await m.attach(req))
    pod.delete()  # the veth pair goes with the namespace
    await m.detach(req.sandbox_id, pod.path)
    assert lab.allocations() == []
    assert lab.veths() == []
    assert req.sandbox_id not in lab.host.run("iptables-save", "-t", "nat").stdout
    await m.detach(req.sandbox_id, None)
    assert m.cached(req.sandbox_id) is None


async def test_failing_plugin_rolls_back(lab: Lab) -> None:
    bin_dir = lab.root / "bin"
    bin_dir.mkdir()
    failer = bin_dir / "failer"
    failer.write_text(FAILING_PLUGIN)
    failer.chmod(0o755)
    lab.write_conflist({"type": "failer"})
    m = lab.manager(plugin_dirs=(bin_dir, PLUGIN_DIR))
    pod = lab.pod()
    req = lab.request(pod)
    with pytest.raises(CNIError) as info:
        await m.attach(req)
    e = info.value
    assert (e.plugin, e.command, e.exit_code, e.cni_code) == ("failer", "ADD", 5, 100)
    assert "injected failure" in e.message and "from the test" in e.message
    assert "exit code 5" in e.message
    # The rollback DEL removed the bridge plugin's veth and host-local's allocation.
    assert lab.veths() == []
    assert "eth0" not in pod.links()
    assert lab.allocations() == []
    assert m.cached(req.sandbox_id) is None


async def test_missing_plugin(lab: Lab) -> None:
    lab.write_conflist({"type": "no-such-plugin"})
    m = lab.manager()
    ready, reason, message = m.status()
    assert not ready and reason == "NetworkPluginNotReady" and "no-such-plugin" in message
    pod = lab.pod()
    with pytest.raises(CNIError) as info:
        await m.attach(lab.request(pod))
    assert info.value.plugin == "no-such-plugin"
    assert str(PLUGIN_DIR) in info.value.message
    assert lab.veths() == [] and lab.allocations() == []


async def test_broken_and_late_config(lab: Lab) -> None:
    m = lab.manager()
    ready, reason, message = m.status()
    assert (ready, reason) == (False, "NetworkPluginNotReady")
    assert "no CNI network config found" in message
    (lab.conf_dir / "05-broken.conflist").write_text('{"cniVersion": "1.0.0", "name": ')
    (lab.conf_dir / "06-old.conflist").write_text(
        json.dumps({"cniVersion": "0.2.0", "name": "old", "plugins": [{"type": "bridge"}]})
    )
    ready, _, message = m.status()
    assert not ready
    assert "05-broken.conflist skipped: invalid JSON" in message
    assert "06-old.conflist skipped: cniVersion '0.2.0' is not supported" in message
    # The network provider writes its config late: picked up without a restart.
    lab.write_conflist()
    assert m.status() == (True, "", "")
    pod = lab.pod()
    req = lab.request(pod)
    assert_attached(lab, pod, await m.attach(req))
    await m.detach(req.sandbox_id, pod.path)


async def test_single_plugin_conf_and_runtime_loopback(lab: Lab) -> None:
    doc = {"cniVersion": "0.4.0", "name": lab.name, **lab.bridge_plugin()}
    (lab.conf_dir / "10-bridge.conf").write_text(json.dumps(doc))
    m = lab.manager()
    assert m.status()[0]
    pod = lab.pod()
    pod.ip("link", "set", "lo", "down")  # as a freshly pinned namespace has it
    req = lab.request(pod)
    res = await m.attach(req)
    assert_attached(lab, pod, res)
    # No loopback plugin in this network: the manager brought lo up itself.
    assert "UP" in link_flags(pod, "lo")
    await m.check(req.sandbox_id, pod.path)
    await m.detach(req.sandbox_id, pod.path)
    assert lab.veths() == [] and lab.allocations() == []


async def test_twenty_parallel_attaches(lab: Lab) -> None:
    lab.write_conflist()
    m = lab.manager()
    pods = [lab.pod() for _ in range(20)]
    reqs = [lab.request(p) for p in pods]
    results = await asyncio.gather(*(m.attach(r) for r in reqs))
    ips = [r.ips[0] for r in results]
    assert len(set(ips)) == 20
    assert all(ipaddress.ip_address(ip) in lab.subnet for ip in ips)
    assert sorted(lab.allocations()) == sorted(ips)
    assert len(lab.veths()) == 20
    for pod, ip in zip(pods[:3], ips[:3], strict=True):
        assert f"{ip}/24" in pod.addresses("eth0")
    await asyncio.gather(*(m.detach(r.sandbox_id, r.netns_path) for r in reqs))
    assert lab.allocations() == []
    assert lab.veths() == []
    assert m.cached_sandboxes() == []


def test_fixture_cleans_up(tmp_path: Path) -> None:
    """The netns helpers leave nothing behind."""
    factory = NetNSFactory()
    try:
        ns = factory.create("mrgt")
        assert ns.exists()
        assert "lo" in ns.links()
        proc = factory.popen(ns, "sleep", "30")
    finally:
        factory.close()
    assert not ns.exists()
    assert proc.poll() is not None
    assert shutil.which("ip") is not None
    assert os.path.basename(ns.path) == ns.name
