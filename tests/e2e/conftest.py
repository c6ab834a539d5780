"""Fixtures for tests that run pods: a "node" network namespace, a CNI config, the daemon.

Everything network-facing happens inside a namespace these fixtures create: the daemon
runs there, the CNI bridge lives there, pods hang off it. Nothing touches the machine's
own network.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.daemon import CNI_PLUGIN_DIR, Daemon

SUBNET = "10.99.0.0/16"

def sh(*cmd: str, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd}: {out.returncode}: {out.stderr}")
    return out.stdout


def in_ns(ns: str, *cmd: str, check: bool = True) -> str:
    return sh("nsenter", f"--net={ns}", *cmd, check=check)


@pytest.fixture
def node_ns() -> Iterator[str]:
    name = f"mtest-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    path = f"/run/netns/{name}"
    try:
        in_ns(path, "ip", "link", "set", "lo", "up")
        yield path
    finally:
        sh("ip", "netns", "del", name, check=False)


def bridge_conflist(tmp: Path, plugins_extra: list[dict[str, object]] | None = None,
                    name: str = "moorage-test") -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge", "bridge": "mbr0", "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                         "dataDir": str(tmp / "ipam")},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            *(plugins_extra or []),
        ],
    }


@pytest.fixture
def cni_dir(tmp_path: Path) -> Path:
    d = tmp_path / "net.d"
    d.mkdir()
    (d / "10-bridge.conflist").write_text(json.dumps(bridge_conflist(tmp_path)))
    return d


def make_daemon(tmp_path: Path, node_ns: str, cni_dir: Path, extra: list[str] | None = None
                ) -> Daemon:
    # The plugin dir as a flag, so that a test's own --cni-plugin-dir adds to it.
    return Daemon(tmp_path / "d", netns=node_ns,
                  extra_args=["--cni-config-dir", str(cni_dir),
                              "--cni-plugin-dir", str(CNI_PLUGIN_DIR), *(extra or [])])


@pytest.fixture
def daemon(tmp_path: Path, node_ns: str, cni_dir: Path) -> Iterator[Daemon]:
    d = make_daemon(tmp_path, node_ns, cni_dir).start()
    yield d
    d.remove_pods_and_stop()  # whatever a failing test left


