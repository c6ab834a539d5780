"""The OCI spec document as a whole: its shape, root, hostname, annotations, cgroupsPath,
image volumes. Also the helpers the other ``test_spec_*`` modules build specs with."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from moorage.container import defaults
from moorage.container.model import (
    ContainerSpec,
    ImageView,
    SandboxView,
    SecurityContext,
)
from moorage.container.spec import (
    OCI_VERSION,
    SpecOptions,
    build_spec,
    cgroups_path,
    image_volumes,
)
from moorage.container.users import ResolvedUser
from moorage.errors import InvalidArgument
from moorage.sandbox.cgroups import Layout

#: Every capability of a kernel with cap_last_cap 40, as tests use it.
ALL_CAPS = defaults.CAPABILITY_NAMES

# -- helpers (imported by the other test_spec_* modules) -------------------------------------------


def make_sandbox(files_dir: Path | None = None, **kw: Any) -> SandboxView:
    base: dict[str, Any] = {
        "id": "sb1",
        "name": "web",
        "namespace": "default",
        "uid": "pod-uid-1",
        "cgroup_parent": "/kubepods/besteffort/podpod-uid-1",
        "net_ns": "/run/moorage/ns/net/sb1",
        "ipc_ns": "/run/moorage/ns/ipc/sb1",
        "uts_ns": "/run/moorage/ns/uts/sb1",
        "pid_ns": None,
        "files_dir": str(files_dir) if files_dir else "",
        "shm_path": "/run/moorage/sandboxes/sb1/shm",
        "hostname": "web-0",
        "log_directory": "/var/log/pods/default_web_pod-uid-1",
    }
    base.update(kw)
    return SandboxView(**base)


def make_image(**config: Any) -> ImageView:
    cfg: dict[str, Any] = {"Cmd": ["sh"]}
    cfg.update(config)
    return ImageView(
        id="sha256:abc", ref="sha256:abc", name="busybox:latest", config=cfg, layers=()
    )


def make_spec(**kw: Any) -> ContainerSpec:
    security = kw.pop("security", None)
    sec_kw = kw.pop("sec", None)
    if security is None:
        security = SecurityContext(**(sec_kw or {}))
    base: dict[str, Any] = {"name": "app", "attempt": 0, "image": "busybox:latest"}
    base.update(kw)
    return ContainerSpec(security=security, **base)


def pod_files(tmp_path: Path) -> Path:
    d = tmp_path / "podfiles"
    d.mkdir(exist_ok=True)
    for name, text in (
        ("hostname", "web-0\n"),
        ("hosts", "127.0.0.1 localhost\n"),
        ("resolv.conf", "nameserver 10.0.0.10\n"),
    ):
        (d / name).write_text(text)
    return d


#: A cgroup v1 node with every controller, both page sizes and swap accounting; and its v2
#: twin (the pod cgroups of the tests do not exist: the root's controllers apply).
V1_NODE = Layout(
    root=Path("/sys/fs/cgroup"), version=1,
    v1_controllers={c: Path("/sys/fs/cgroup") / c for c in
                    ("cpu", "cpuacct", "cpuset", "memory", "pids", "hugetlb", "blkio")},
    hugepage_sizes=frozenset({"2MB", "1GB"}), swap_accounting=True,
)
V2_NODE = Layout(
    root=Path("/nonexistent/cgroup"), version=2, unified=Path("/nonexistent/cgroup"),
    hugepage_sizes=frozenset({"2MB", "1GB"}), swap_accounting=True,
    v2_controllers=frozenset({"cpuset", "cpu", "io", "memory", "hugetlb", "pids"}),
)

OPTIONS = SpecOptions(
    all_capabilities=ALL_CAPS,
    cgroups=V1_NODE,
    apparmor_enabled=False,
    daemon_oom_score_adj=0,
)


def build(
    *,
    spec: ContainerSpec | None = None,
    sandbox: SandboxView | None = None,
    image: ImageView | None = None,
    user: ResolvedUser | None = None,
    options: SpecOptions = OPTIONS,
    **kw: Any,
) -> dict[str, Any]:
    return build_spec(
        container_id=kw.pop("container_id", "c0ffee"),
        spec=spec or make_spec(),
        sandbox=sandbox or make_sandbox(),
        image=image or make_image(),
        rootfs=Path("/var/lib/moorage/containers/c0ffee/merged"),
        user=user
        or ResolvedUser(uid=0, gid=0, additional_gids=(0,), username="root", home="/root"),
        options=options,
        **kw,
    )


def opts(**kw: Any) -> SpecOptions:
    return dataclasses.replace(OPTIONS, **kw)


# -- the document ----------------------------------------------------------------------------------


def test_document_shape() -> None:
    doc = build()
    assert doc["ociVersion"] == OCI_VERSION == "1.0.2-dev"
    assert set(doc) == {
        "ociVersion",
        "process",
        "root",
        "hostname",
        "mounts",
        "annotations",
        "linux",
    }
    assert doc["root"] == {"path": "/var/lib/moorage/containers/c0ffee/merged", "readonly": False}
    assert doc["hostname"] == "web-0"
    p = doc["process"]
    assert p["terminal"] is False
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert p["noNewPrivileges"] is False
    assert p["oomScoreAdj"] == 0
    assert "apparmorProfile" not in p and "seccomp" not in doc["linux"]
    assert "sysctl" not in doc["linux"]
    assert doc["linux"]["cgroupsPath"] == "/kubepods/besteffort/podpod-uid-1/moorage-c0ffee"


def test_readonly_rootfs() -> None:
    doc = build(spec=make_spec(sec={"readonly_rootfs": True}))
    assert doc["root"]["readonly"] is True


@pytest.mark.parametrize(
    ("kw", "hostname"),
    [
        ({}, "web-0"),
        ({"uts_ns": None, "host_network": True, "net_ns": None}, None),
        ({"uts_ns": None}, None),  # host UTS: runc cannot set a hostname
    ],
)
def test_hostname(kw: dict[str, Any], hostname: str | None) -> None:
    doc = build(sandbox=make_sandbox(**kw))
    assert doc.get("hostname") == hostname


def test_annotations() -> None:
    spec = make_spec(annotations={"a": "1", "io.kubernetes.pod.name": "spoofed"})
    ann = build(spec=spec)["annotations"]
    assert ann["a"] == "1"
    assert ann["io.kubernetes.cri.container-type"] == "container"
    assert ann["io.kubernetes.cri.container-name"] == "app"
    assert ann["io.kubernetes.cri.sandbox-id"] == "sb1"
    assert ann["io.kubernetes.cri.image-name"] == "busybox:latest"
    assert ann["io.kubernetes.cri.sandbox-name"] == "web"
    assert ann["io.kubernetes.cri.sandbox-namespace"] == "default"
    assert ann["io.kubernetes.cri.sandbox-uid"] == "pod-uid-1"
    assert ann["io.kubernetes.pod.name"] == "web"  # ours win
    assert ann["io.kubernetes.pod.namespace"] == "default"
    assert ann["io.kubernetes.pod.uid"] == "pod-uid-1"


@pytest.mark.parametrize(
    ("parent", "driver", "expected"),
    [
        ("/kubepods/burstable/pod1", "cgroupfs", "/kubepods/burstable/pod1/moorage-abc"),
        ("/moorage/", "cgroupfs", "/moorage/moorage-abc"),
        ("", "cgroupfs", "/moorage/moorage-abc"),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice",
            "systemd",
            "kubepods-burstable-pod1.slice:moorage:abc",
        ),
        ("kubepods-pod1.slice", "systemd", "kubepods-pod1.slice:moorage:abc"),
        ("", "systemd", "system.slice:moorage:abc"),
    ],
)
def test_cgroups_path(parent: str, driver: str, expected: str) -> None:
    assert cgroups_path("abc", make_sandbox(cgroup_parent=parent), driver) == expected


def test_cgroups_path_refusals() -> None:
    with pytest.raises(InvalidArgument, match="not a systemd slice"):
        cgroups_path("abc", make_sandbox(cgroup_parent="/kubepods/pod1"), "systemd")
    with pytest.raises(InvalidArgument, match="container id"):
        cgroups_path("../x", make_sandbox(), "cgroupfs")
    with pytest.raises(InvalidArgument, match="cgroup driver"):
        cgroups_path("abc", make_sandbox(), "other")


def test_systemd_driver_in_spec() -> None:
    sb = make_sandbox(cgroup_parent="/kubepods.slice/kubepods-pod1.slice")
    doc = build(sandbox=sb, options=opts(cgroup_driver="systemd"))
    assert doc["linux"]["cgroupsPath"] == "kubepods-pod1.slice:moorage:c0ffee"


@pytest.mark.parametrize(
    ("volumes", "expected"),
    [
        (None, []),
        ({}, []),
        (
            {"/data": {}, "/var/lib/db/": {}, "cache": {}, "/": {}, "/a/../b": {}},
            ["/b", "/cache", "/data", "/var/lib/db"],
        ),
        (["/not-a-map"], []),
    ],
)
def test_image_volumes(volumes: Any, expected: list[str]) -> None:
    assert image_volumes(make_image(Volumes=volumes)) == expected


def test_privileged_needs_a_privileged_pod() -> None:
    with pytest.raises(InvalidArgument, match="privileged"):
        build(spec=make_spec(sec={"privileged": True}))
