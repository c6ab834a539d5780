"""Pod IPs from CNI results of every supported version, and CNI error output."""

from __future__ import annotations

from typing import Any

import pytest

from moorage.network.result import parse_error, parse_result, result_ips

BRIDGE_IFACES = [
    {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
    {"name": "veth1234", "mac": "aa:aa:aa:aa:aa:02"},
    {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/pod"},
]


def v03(version: str) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "interfaces": BRIDGE_IFACES,
        "ips": [
            {"version": "6", "interface": 2, "address": "fd00:10::5/64", "gateway": "fd00:10::1"},
            {"version": "4", "interface": 2, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def v1(version: str) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "interfaces": BRIDGE_IFACES,
        "ips": [
            {"interface": 2, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
            {"interface": 2, "address": "fd00:10::5/64", "gateway": "fd00:10::1"},
        ],
    }


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_v03_v04_results(version: str) -> None:
    assert result_ips(v03(version)) == ("10.1.0.5", "fd00:10::5")


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_v1_results(version: str) -> None:
    assert result_ips(v1(version)) == ("10.1.0.5", "fd00:10::5")


def test_legacy_v02_result() -> None:
    result = {
        "cniVersion": "0.2.0",
        "ip6": {"ip": "fd00::7/64"},
        "ip4": {"ip": "10.2.0.7/16", "gateway": "10.2.0.1"},
    }
    assert result_ips(result) == ("10.2.0.7", "fd00::7")


def test_ipv4_first_keeps_order_within_family() -> None:
    result = {
        "cniVersion": "1.0.0",
        "ips": [
            {"address": "fd00::2/64"},
            {"address": "10.0.0.9/8"},
            {"address": "fd00::1/64"},
            {"address": "10.0.0.3/8"},
            {"address": "10.0.0.9/8"},
        ],
    }
    assert result_ips(result) == ("10.0.0.9", "10.0.0.3", "fd00::2", "fd00::1")


def test_host_side_and_loopback_addresses_are_not_pod_ips() -> None:
    result = {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "lo", "sandbox": "/run/netns/pod"},
            {"name": "veth0"},
            {"name": "eth0", "sandbox": "/run/netns/pod"},
        ],
        "ips": [
            {"interface": 0, "address": "127.0.0.1/8"},
            {"interface": 0, "address": "::1/128"},
            {"interface": 1, "address": "169.254.1.1/32"},
            {"interface": 2, "address": "10.3.0.4/24"},
            {"address": "10.3.0.5/24"},  # no interface index: a pod address
            {"interface": 9, "address": "10.3.0.6/24"},  # index out of range: kept
        ],
    }
    assert result_ips(result) == ("10.3.0.4", "10.3.0.5", "10.3.0.6")


@pytest.mark.parametrize(
    "result",
    [
        {},
        {"cniVersion": "1.0.0", "ips": None},
        {"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip"}, "x", {"address": 5}]},
        {"cniVersion": "1.0.0", "ips": [{"interface": True, "address": "nonsense/99"}]},
    ],
)
def test_garbage_gives_no_ips(result: dict[str, Any]) -> None:
    assert result_ips(result) == ()


def test_parse_error() -> None:
    out = b'{"cniVersion":"1.0.0","code":11,"msg":"try again","details":"lock busy"}'
    assert parse_error(out) == (11, "try again", "lock busy")
    assert parse_error(b"panic: runtime error") == (None, "", "")
    assert parse_error(b'"just a string"') == (None, "", "")
    assert parse_error(b'{"code": true, "msg": 3}') == (None, "", "")


def test_parse_result() -> None:
    assert parse_result(b'{"cniVersion": "1.0.0"}') == {"cniVersion": "1.0.0"}
    with pytest.raises(ValueError):
        parse_result(b"")
    with pytest.raises(ValueError):
        parse_result(b"[1]")
