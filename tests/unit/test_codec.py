from __future__ import annotations

import pytest

from moorage.container.model import (
    Container,
    ContainerResources,
    ContainerSpec,
    ImageView,
    Mount,
    SecurityContext,
    SecurityProfile,
    State,
)
from moorage.sandbox.cgroups import Resources
from moorage.util import codec


def test_container_round_trips_exactly() -> None:
    spec = ContainerSpec(
        name="c", attempt=2, image="busybox", command=("sh",), args=("-c", "true"),
        env=(("A", b"\xff\x00bytes"), ("B", b"")),
        mounts=(Mount("/data", "/srv", readonly=True, propagation="rslave"),),
        labels={"a": "b"},
        resources=ContainerResources(Resources(cpu_shares=512, hugepage_limits={"2MB": 1}),
                                     oom_score_adj=5),
        security=SecurityContext(run_as_user=1000, masked_paths=(),
                                 seccomp=SecurityProfile("Localhost", "p.json")),
    )
    c = Container(id="x" * 64, sandbox_id="y" * 64, spec=spec,
                  image=ImageView("sha256:1", "sha256:1", "busybox", {"User": "1"}, ("d",)),
                  created_at=1, runtime_handler="runc", state=State.EXITED, exit_code=137,
                  extra={"k": [1, 2]})
    data = codec.to_data(c)
    again = codec.load(Container, data)
    assert again == c
    assert again.spec.security.masked_paths == ()  # empty stays empty, not None


def test_bad_data_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        codec.load(ImageView, {"id": 1, "ref": "r", "name": "n", "config": {}, "layers": []})
    with pytest.raises(ValueError):
        codec.load(Mount, {"container_path": "/", "host_path": "/", "propagation": "weird"})


def test_snapshot_is_cut_off_from_later_changes() -> None:
    image = ImageView("sha256:1", "sha256:1", "busybox", {"User": "1"}, ("d",))
    c = Container(id="x" * 64, sandbox_id="y" * 64, spec=ContainerSpec(name="c", attempt=0,
                                                                      image="busybox"),
                  image=image, created_at=1, runtime_handler="runc", state=State.CREATED,
                  user={"uid": 0, "additional_gids": [1]}, extra={"k": [1, 2]})
    before = codec.to_data(c)
    snap = codec.snapshot(c)
    assert snap == c and snap is not c
    assert snap.spec is c.spec and snap.image is c.image  # frozen values are shared
    c.state = State.RUNNING
    c.extra["k"].append(3)
    c.extra["new"] = "x"
    c.user["additional_gids"].append(2)
    c.pid = 42
    assert codec.to_data(snap) == before
    assert snap.state == State.CREATED and snap.extra == {"k": [1, 2]}
