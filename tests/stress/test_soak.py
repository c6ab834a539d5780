"""The soak's short mode: the kubelet-like driver of bench/soak.py for a few dozen pod
cycles (with relists, probes and image churn); every call succeeds and every count of the
node comes back. The long mode (2,000 cycles, RSS checked too) is run by hand:
docs/reliability.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.soak import Options, Soak, soak_node
from tests.fixtures.registry import registry_available

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not registry_available(),
                                reason="needs root and docker-registry")


def test_short_soak_fails_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    opts = Options(cycles=24, workers=6, report_every=12, probe_period=1.0)
    with soak_node(tmp_path / "node") as (node, moorage, bench, target):
        result = Soak(bench, moorage, target, node.images.small, opts, lines.append).run()
    print("\n".join(lines))
    assert result.errors == []
    assert result.failures == []
    assert [r.cycles for r in result.rows] == [12, 24]
    # The relist, the probes and the image churn ran alongside the pods.
    seen = {rpc for r in result.rows for rpc in r.latency}
    assert {"ListPodSandbox", "ContainerStatus", "ExecSync", "PullImage",
            "RemoveImage"} <= seen
    assert result.pulls > 0
    # Counts are real: pods were there at some report (a pod holds a netns and a veth).
    assert result.baseline["netns"] == 0 and result.end["netns"] == 0
    assert result.baseline["mounts"] == result.end["mounts"]
