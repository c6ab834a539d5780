"""A CNI plugin failing: hanging on ADD or DEL (bounded by ``network.cni_timeout``), or
crashing half way, after the real bridge plugin made the veth and took the IP. The caller
gets a clear error in bounded time, the pod fails cleanly, nothing leaks, and the same
RunPodSandbox succeeds once the plugin works again."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.conftest import bridge_conflist, in_ns, make_daemon
from tests.e2e.test_sandboxes import assert_node_clean, pod_config, pod_status, rpc_error, run_pod
from tests.fixtures.daemon import CNI_PLUGIN_DIR, Daemon
from tests.fixtures.faults import cni_wrapper, hung_commands, set_rules

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

CNI_TIMEOUT = 3


class Node:
    def __init__(self, d: Daemon, rules: Path, node_ns: str, tmp: Path) -> None:
        self.d, self.rules, self.node_ns, self.tmp = d, rules, node_ns, tmp

    def ipam(self) -> list[str]:
        net = self.tmp / "ipam" / "moorage-test"
        return sorted(p.name for p in net.iterdir()
                      if p.name not in ("lock", "last_reserved_ip.0")) if net.is_dir() else []

    def veths(self) -> list[str]:
        return in_ns(self.node_ns, "ip", "-o", "link", "show", "type", "veth").splitlines()


@pytest.fixture
def node(tmp_path: Path, node_ns: str, cni_dir: Path) -> Iterator[Node]:
    rules = tmp_path / "cni-rules"
    bridge = CNI_PLUGIN_DIR / "bridge"
    plugins = tmp_path / "plugins"
    cni_wrapper(plugins, "flaky", bridge, rules)
    conf = bridge_conflist(tmp_path)
    conf["plugins"][0]["type"] = "flaky"  # type: ignore[index]
    (cni_dir / "10-bridge.conflist").write_text(json.dumps(conf))
    d = make_daemon(tmp_path, node_ns, cni_dir, ["--cni-plugin-dir", str(plugins)])
    d.config_text = f"[network]\ncni_timeout = {CNI_TIMEOUT}\n"
    d.start()
    try:
        yield Node(d, rules, node_ns, tmp_path)
    finally:
        set_rules(rules)
        d.remove_pods_and_stop()


def test_add_hangs_then_is_killed_and_rolled_back(node: Node) -> None:
    set_rules(node.rules, ADD="hang")
    t0 = time.monotonic()
    e = rpc_error(lambda: run_pod(node.d, pod_config("hangs")))
    assert time.monotonic() - t0 < CNI_TIMEOUT + 30
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
    assert f"timed out after {CNI_TIMEOUT}s" in (e.details() or "")
    assert '"flaky" ADD' in (e.details() or "")
    assert hung_commands(node.rules) == []
    assert not node.d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert_node_clean(node.d, node.node_ns, node.tmp)
    assert list((node.d.root / "network" / "cni-cache").iterdir()) == []
    # kubelet retries with the same name: it works once the plugin does.
    set_rules(node.rules)
    pod = run_pod(node.d, pod_config("hangs"))
    assert pod_status(node.d, pod).status.network.ip
    node.d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert_node_clean(node.d, node.node_ns, node.tmp)


def test_add_crashes_half_way(node: Node) -> None:
    """The real bridge ADD ran (veth made, IP taken), then the plugin died by SIGKILL."""
    set_rules(node.rules, ADD="crash-after")
    e = rpc_error(lambda: run_pod(node.d, pod_config("crashes")))
    assert e.code() == grpc.StatusCode.INTERNAL
    assert '"flaky" ADD' in (e.details() or "") and "signal 9" in (e.details() or "")
    # The rollback DEL took the veth and the IP back.
    assert node.veths() == [] and node.ipam() == []
    assert_node_clean(node.d, node.node_ns, node.tmp)
    assert list((node.d.root / "network" / "cni-cache").iterdir()) == []
    set_rules(node.rules)
    pod = run_pod(node.d, pod_config("crashes"))
    assert len(node.ipam()) == 1
    node.d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert_node_clean(node.d, node.node_ns, node.tmp)


def test_del_hangs_on_stop_then_remove_releases(node: Node) -> None:
    pod = run_pod(node.d, pod_config("stuck"))
    assert len(node.ipam()) == 1
    set_rules(node.rules, DEL="hang")
    t0 = time.monotonic()
    # Bounded: the stop is not held up for longer than the plugin timeout (and the DEL is
    # owed to the next stop or remove).
    node.d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert time.monotonic() - t0 < CNI_TIMEOUT + 30
    assert hung_commands(node.rules) == []
    st = pod_status(node.d, pod).status
    assert st.state == pb.SANDBOX_NOTREADY
    set_rules(node.rules)
    node.d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert node.ipam() == [] and node.veths() == []
    assert_node_clean(node.d, node.node_ns, node.tmp)
    assert list((node.d.root / "network" / "cni-cache").iterdir()) == []


def test_del_crashes_half_way_and_the_next_start_releases(node: Node) -> None:
    pod = run_pod(node.d, pod_config("halfdel"))
    set_rules(node.rules, DEL="crash-after")
    # The pod never becomes unremovable: its DEL is owed to the next start.
    node.d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert not node.d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert list((node.d.root / "network" / "cni-cache").iterdir()) != []
    set_rules(node.rules)
    node.d.restart()
    # The next start DELs again (a DEL of what is gone must succeed) and drops the cache.
    assert list((node.d.root / "network" / "cni-cache").iterdir()) == []
    assert node.ipam() == [] and node.veths() == []
    assert_node_clean(node.d, node.node_ns, node.tmp)
