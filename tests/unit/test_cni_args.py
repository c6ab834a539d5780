"""What each plugin gets: CNI_ARGS, the environment, runtimeConfig, and its stdin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moorage.network import Bandwidth, PortMapping
from moorage.network.config import parse_bytes
from moorage.network.invoke import (
    Invocation,
    build_capability_args,
    build_cni_args,
    plugin_config,
    plugin_env,
)


def test_cni_args_as_kubelet_runtimes_pass_them() -> None:
    assert build_cni_args("kube-system", "coredns-1", "abc123", "u-1") == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;"
        "K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1"
    )


@pytest.mark.parametrize("bad", ["a;b", "a=b"])
def test_cni_args_refuse_separators(bad: str) -> None:
    with pytest.raises(ValueError, match="K8S_POD_NAME"):
        build_cni_args("ns", bad, "abc", "uid")


def test_no_capability_args_by_default() -> None:
    assert build_capability_args() == {}
    assert build_capability_args(port_mappings=(PortMapping(0, 80),)) == {}


def test_port_mappings_only_with_host_port() -> None:
    caps = build_capability_args(
        port_mappings=(
            PortMapping(8080, 80),
            PortMapping(0, 81),
            PortMapping(5353, 53, "UDP", "10.0.0.1"),
            PortMapping(9000, 9000, "SCTP"),
        )
    )
    assert caps == {
        "portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "10.0.0.1"},
            {"hostPort": 9000, "containerPort": 9000, "protocol": "sctp", "hostIP": ""},
        ]
    }


def test_bandwidth_ip_ranges_and_cgroup_path() -> None:
    caps = build_capability_args(
        bandwidth=Bandwidth(1_000_000, 2_000_000, 3_000_000, 4_000_000),
        pod_cidr="10.244.1.0/24",
        cgroup_parent="/kubepods/besteffort/pod1",
    )
    assert caps == {
        "bandwidth": {
            "ingressRate": 1_000_000,
            "ingressBurst": 2_000_000,
            "egressRate": 3_000_000,
            "egressBurst": 4_000_000,
        },
        "ipRanges": [[{"subnet": "10.244.1.0/24"}]],
        "cgroupPath": "/kubepods/besteffort/pod1",
    }


def test_dual_stack_pod_cidr_gives_a_range_set_per_family() -> None:
    caps = build_capability_args(pod_cidr="10.244.1.0/24, fd00:10:244:1::/64")
    assert caps["ipRanges"] == [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]]


def test_zero_bandwidth_is_still_passed() -> None:
    assert build_capability_args(bandwidth=Bandwidth())["bandwidth"]["ingressRate"] == 0


NET = parse_bytes(
    json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "podnet",
            "plugins": [
                {"type": "bridge", "name": "ignored", "cniVersion": "0.3.1", "bridge": "cni0"},
                {
                    "type": "portmap",
                    "capabilities": {"portMappings": True, "ipRanges": False},
                    "runtimeConfig": {"stale": 1},
                },
                {"type": "bandwidth", "capabilities": {"bandwidth": True}},
            ],
        }
    ).encode(),
    "10-podnet.conflist",
)
CAPS = build_capability_args(
    port_mappings=(PortMapping(80, 8080),), pod_cidr="10.1.0.0/16", bandwidth=Bandwidth(1, 2, 3, 4)
)


def test_plugin_stdin_gets_list_name_and_version() -> None:
    conf = plugin_config(NET, NET.plugins[0], None, CAPS)
    assert conf == {"type": "bridge", "name": "podnet", "cniVersion": "1.0.0", "bridge": "cni0"}
    assert NET.plugins[0]["name"] == "ignored"  # the loaded config is not modified


def test_runtime_config_only_for_declared_capabilities() -> None:
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/16"}]}
    conf = plugin_config(NET, NET.plugins[1], prev, CAPS)
    assert conf["prevResult"] == prev
    # ipRanges is declared false; the file's own runtimeConfig is replaced (as libcni does).
    assert conf["runtimeConfig"] == {"portMappings": CAPS["portMappings"]}
    conf = plugin_config(NET, NET.plugins[2], prev, CAPS)
    assert conf["runtimeConfig"] == {"bandwidth": CAPS["bandwidth"]}


def test_no_runtime_config_when_nothing_applies() -> None:
    conf = plugin_config(NET, NET.plugins[2], None, {})
    assert "runtimeConfig" not in conf
    assert "prevResult" not in conf


def test_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNI_IFNAME", "stale")
    monkeypatch.setenv("CNI_SOMETHING", "stale")
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin")
    inv = Invocation("abc", "/run/netns/x", "eth0", "IgnoreUnknown=1", {})
    env = plugin_env("DEL", inv, [Path("/opt/cni/bin"), Path("/usr/lib/cni")])
    assert {k: v for k, v in env.items() if k.startswith("CNI_")} == {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": "abc",
        "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1",
        "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
    }
    assert env["PATH"] == "/usr/sbin:/usr/bin"  # plugins run iptables, ip, ...
