"""The load bench's short mode (bench/load.py): pods started, replaced and removed by
many clients at once while CNI and the registry are slow. Correctness only (no timings):
no call fails, and the node holds nothing more at the end than at the start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.load import Load, LoadOptions, slow_parts
from bench.soak import counts, soak_node
from tests.fixtures.registry import registry_available
from tests.fixtures.stallproxy import StallProxy

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not registry_available(),
                                reason="needs root and docker-registry")


def test_short_load_fails_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    opts = LoadOptions(pods=8, clients=12, pod_workers=4, pullers=2, steady=4.0,
                       cni_delay=0.5, registry_rate=256 * 1024)
    proxies: list[StallProxy] = []
    lines: list[str] = []
    with soak_node(tmp_path / "node", small_images=2, prepare=slow_parts(opts, proxies)) as (
            node, moorage, bench, target):
        assert node.registry is not None
        images = [r.replace(node.registry.host, proxies[0].host) for r in node.images.small]
        before = counts(target)
        phases = Load(bench, moorage, images, opts, lines.append).run()
        after = counts(target)
    print("\n".join(lines))
    assert [p.name for p in phases] == ["ramp", "steady", "teardown"]
    assert [e for p in phases for e in p.calls.errors] == []
    steady = {rpc for rpc, *_ in phases[1].rows()}
    assert {"RunPodSandbox", "RemovePodSandbox", "PullImage", "ListPodSandbox",
            "ContainerStatus"} <= steady
    # The pulls went through the slow proxy.
    assert any("/blobs/" in path for path, _ in proxies[0].requests)
    # What pods hold (the files and pools that the first pods create are the soak's).
    for k in ("monitors", "mounts", "netns", "veths", "ipam", "cgroups"):
        assert after[k] == before[k], (k, before[k], after[k])
