"""Pod network counters: /proc/net/dev parsing and reading inside a network namespace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moorage.stats import network
from moorage.stats.network import InterfaceStats

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1200      12    0    0    0     0          0         0     1200      12    0    0    0     0       0          0
  eth0: 1296543    1016    2    1    0     0          0         0   110234     913    3    4    0     0       0          0
 net1:      10       1    0    0    0     0          0         0       20       2    0    0    0     0       0          0
"""  # noqa: E501


def test_parse_net_dev() -> None:
    ifaces = network.parse_net_dev(NET_DEV)
    assert [i.name for i in ifaces] == ["lo", "eth0", "net1"]
    assert ifaces[1] == InterfaceStats(
        name="eth0", rx_bytes=1296543, rx_packets=1016, rx_errors=2, rx_dropped=1,
        tx_bytes=110234, tx_packets=913, tx_errors=3, tx_dropped=4)
    assert network.parse_net_dev("garbage\nx: 1 2 3\n") == []


def test_default_interface() -> None:
    ifaces = network.parse_net_dev(NET_DEV)
    default = network.default_interface(ifaces)
    assert default is not None and default.name == "eth0"
    rest = [i for i in ifaces if i.name != "eth0"]
    default = network.default_interface(rest)
    assert default is not None and default.name == "net1"
    assert network.default_interface([ifaces[0]]) is None


async def test_unreadable_namespace_is_reported_not_raised(tmp_path: object) -> None:
    result = await network.read_namespaces(["/nonexistent/netns"])
    assert isinstance(result["/nonexistent/netns"], OSError)
    assert await network.read_namespaces([]) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN")
async def test_reads_inside_a_namespace() -> None:
    # Our own namespace, entered from the helper thread: the same interfaces as ours.
    own = "/proc/self/ns/net"
    result = await network.read_namespaces([own])
    found = result[own]
    assert not isinstance(found, OSError)
    text = Path("/proc/self/net/dev").read_text()  # noqa: ASYNC240 - procfs, instant
    assert {i.name for i in found} == {i.name for i in network.parse_net_dev(text)}
