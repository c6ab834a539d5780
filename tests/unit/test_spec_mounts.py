"""Mounts (defaults, pod files, CRI binds with propagation and read-only modes), devices and
resources of the OCI spec."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from moorage.container import defaults
from moorage.container.model import ContainerResources, Device, Mount
from moorage.container.spec import host_devices, oci_resources
from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.sandbox.cgroups import Resources
from tests.unit.test_spec_document import (
    OPTIONS,
    V1_NODE,
    V2_NODE,
    build,
    make_sandbox,
    make_spec,
    opts,
    pod_files,
)


def by_dest(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["destination"]: m for m in doc["mounts"]}


# -- defaults and pod files ------------------------------------------------------------------------


def test_default_and_pod_mounts(tmp_path: Path) -> None:
    files = pod_files(tmp_path)
    doc = build(sandbox=make_sandbox(files_dir=files))
    dests = [m["destination"] for m in doc["mounts"]]
    assert dests == [
        "/proc",
        "/dev",
        "/sys",
        "/dev/pts",
        "/dev/mqueue",
        "/dev/shm",
        "/etc/hostname",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/sys/fs/cgroup",
    ]
    m = by_dest(doc)
    assert m["/proc"] == {
        "destination": "/proc",
        "type": "proc",
        "source": "proc",
        "options": ["nosuid", "noexec", "nodev"],
    }
    assert m["/sys"]["options"][-1] == "ro"
    assert m["/sys/fs/cgroup"]["type"] == "cgroup" and "ro" in m["/sys/fs/cgroup"]["options"]
    assert m["/dev/pts"]["type"] == "devpts"
    assert m["/dev/shm"]["source"] == "/run/moorage/sandboxes/sb1/shm"
    assert m["/dev/shm"]["type"] == "bind" and "rw" in m["/dev/shm"]["options"]
    for name in ("hostname", "hosts", "resolv.conf"):
        mount = m[f"/etc/{name}"]
        assert mount["source"] == str(files / name)
        assert mount["type"] == "bind" and mount["options"][-1] == "rw"


def test_pod_files_read_only_with_readonly_rootfs(tmp_path: Path) -> None:
    files = pod_files(tmp_path)
    doc = build(
        sandbox=make_sandbox(files_dir=files), spec=make_spec(sec={"readonly_rootfs": True})
    )
    for name in ("hostname", "hosts", "resolv.conf"):
        assert by_dest(doc)[f"/etc/{name}"]["options"][-1] == "ro"


def test_pod_file_missing(tmp_path: Path) -> None:
    files = pod_files(tmp_path)
    (files / "hosts").unlink()
    with pytest.raises(FailedPrecondition, match="hosts is missing"):
        build(sandbox=make_sandbox(files_dir=files))


def test_host_ipc_shm() -> None:
    doc = build(sandbox=make_sandbox(ipc_ns=None, shm_path=None))
    assert by_dest(doc)["/dev/shm"]["source"] == "/dev/shm"


# -- CRI mounts ------------------------------------------------------------------------------------


def test_cri_bind_mounts(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "cfg")
    mounts = (
        Mount("/var/lib/data", str(tmp_path / "data")),
        Mount("/etc/config/", str(tmp_path / "link"), readonly=True),
        Mount("/data", str(tmp_path / "data")),
    )
    doc = build(spec=make_spec(mounts=mounts))
    m = by_dest(doc)
    assert m["/var/lib/data"] == {
        "destination": "/var/lib/data",
        "type": "bind",
        "source": str(tmp_path / "data"),
        "options": ["rbind", "rprivate", "rw"],
    }
    # the container path normalized, the host path's symlinks resolved
    assert m["/etc/config"]["source"] == str(tmp_path / "cfg")
    assert m["/etc/config"]["options"] == ["rbind", "rprivate", "ro"]
    # parents first: sorted by depth, stable
    dests = [x["destination"] for x in doc["mounts"]]
    depths = [len([p for p in d.split("/") if p]) for d in dests]
    assert depths == sorted(depths)
    assert dests.index("/data") < dests.index("/etc/config") < dests.index("/var/lib/data")
    assert "rootfsPropagation" not in doc["linux"]


def test_cri_mount_replaces_defaults(tmp_path: Path) -> None:
    files = pod_files(tmp_path)
    hosts = tmp_path / "kubelet-hosts"
    hosts.write_text("10.0.0.1 web-0\n")
    shm = tmp_path / "shm"
    shm.mkdir()
    mounts = (Mount("/etc/hosts", str(hosts)), Mount("/dev/shm", str(shm)))
    doc = build(sandbox=make_sandbox(files_dir=files), spec=make_spec(mounts=mounts))
    dests = [x["destination"] for x in doc["mounts"]]
    assert dests.count("/etc/hosts") == 1 and dests.count("/dev/shm") == 1
    assert by_dest(doc)["/etc/hosts"]["source"] == str(hosts)
    assert by_dest(doc)["/dev/shm"]["source"] == str(shm)
    # a CRI /dev replaces everything below it
    doc = build(spec=make_spec(mounts=(Mount("/dev", str(shm)),)))
    dests = [x["destination"] for x in doc["mounts"]]
    assert not [d for d in dests if d.startswith("/dev/")]
    assert dests.count("/dev") == 1


def test_cri_mount_missing_host_path(tmp_path: Path) -> None:
    mounts = (Mount("/a", str(tmp_path)), Mount("/b", str(tmp_path / "gone")))
    with pytest.raises(
        InvalidArgument, match=r"config.mounts\[1\].host_path: .*gone' does not exist"
    ):
        build(spec=make_spec(mounts=mounts))


def test_cri_mount_relative_container_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"config.mounts\[0\].container_path"):
        build(spec=make_spec(mounts=(Mount("data", str(tmp_path)),)))


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / {root}/shared rw,relatime shared:7 - tmpfs tmpfs rw
31 22 0:41 / {root}/slave rw,relatime master:7 - tmpfs tmpfs rw
32 22 0:42 / {root}/private rw,relatime - tmpfs tmpfs rw
33 30 0:43 / {root}/shared/inner rw,relatime - tmpfs tmpfs rw
34 22 0:44 / {root}/with\\040space rw,relatime shared:9 - tmpfs tmpfs rw
35 22 0:45 / {root}/remounted rw,relatime shared:10 - tmpfs tmpfs rw
36 22 0:46 / {root}/remounted rw,relatime - tmpfs tmpfs rw
"""


@pytest.fixture
def hosts(tmp_path: Path) -> tuple[Path, Path]:
    """A fake mount table over real directories: (root of the directories, mountinfo)."""
    root = (tmp_path / "m").resolve()
    for d in ("shared/inner", "shared/other", "slave", "private", "with space", "remounted"):
        (root / d).mkdir(parents=True)
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO.format(root=root))
    return root, path


@pytest.mark.parametrize(
    ("host_path", "propagation", "ok"),
    [
        ("shared", "rshared", True),
        ("shared", "rslave", True),
        ("slave", "rslave", True),
        ("slave", "rshared", False),
        ("private", "rslave", False),
        ("private", "rshared", False),
        ("shared/inner", "rshared", False),  # the deepest mount counts
        ("shared/other", "rshared", True),
        ("with space", "rshared", True),
        ("remounted", "rslave", False),  # the last mount on a point is the one on top
        ("", "rshared", True),  # on / which is shared
    ],
)
def test_propagation(hosts: tuple[Path, Path], host_path: str, propagation: Any, ok: bool) -> None:
    root, mountinfo = hosts
    source = str(root / host_path) if host_path else str(root)
    spec = make_spec(mounts=(Mount("/m", source, propagation=propagation),))
    o = opts(mountinfo=str(mountinfo))
    if ok:
        doc = build(spec=spec, options=o)
        assert by_dest(doc)["/m"]["options"] == ["rbind", propagation, "rw"]
        assert doc["linux"]["rootfsPropagation"] == propagation
    else:
        with pytest.raises(InvalidArgument, match=r"config.mounts\[0\].propagation"):
            build(spec=spec, options=o)


def test_rootfs_propagation_rshared_wins(hosts: tuple[Path, Path]) -> None:
    root, mountinfo = hosts
    mounts = (
        Mount("/a", str(root / "shared"), propagation="rshared"),
        Mount("/b", str(root / "slave"), propagation="rslave"),
    )
    doc = build(spec=make_spec(mounts=mounts), options=opts(mountinfo=str(mountinfo)))
    assert doc["linux"]["rootfsPropagation"] == "rshared"
    doc = build(spec=make_spec(mounts=mounts[1:]), options=opts(mountinfo=str(mountinfo)))
    assert doc["linux"]["rootfsPropagation"] == "rslave"


def test_recursive_read_only(tmp_path: Path, hosts: tuple[Path, Path]) -> None:
    rro = Mount("/r", str(tmp_path), readonly=True, recursive_read_only=True)
    doc = build(spec=make_spec(mounts=(rro,)), options=opts(rro_supported=True))
    assert by_dest(doc)["/r"]["options"] == ["rbind", "rprivate", "rro"]
    with pytest.raises(InvalidArgument,
                       match=r"^config\.mounts\[0\]\.recursive_read_only: .*not supported by "
                             "this runtime handler"):
        build(spec=make_spec(mounts=(rro,)))
    rw = Mount("/r", str(tmp_path), readonly=False, recursive_read_only=True)
    with pytest.raises(InvalidArgument, match="recursive_read_only: needs readonly"):
        build(spec=make_spec(mounts=(rw,)), options=opts(rro_supported=True))
    root, mountinfo = hosts
    m = Mount(
        "/r", str(root / "shared"), readonly=True, recursive_read_only=True, propagation="rslave"
    )
    with pytest.raises(InvalidArgument, match="needs private propagation"):
        build(
            spec=make_spec(mounts=(m,)),
            options=opts(rro_supported=True, mountinfo=str(mountinfo)),
        )
    # Checked before the host path's own propagation (a private one here).
    m = Mount("/r", str(tmp_path), readonly=True, recursive_read_only=True,
              propagation="rshared")
    with pytest.raises(InvalidArgument, match="recursive_read_only: needs private propagation"):
        build(spec=make_spec(mounts=(m,)), options=opts(rro_supported=True))


# -- devices ---------------------------------------------------------------------------------------


def test_devices() -> None:
    st = os.stat("/dev/null")
    doc = build(spec=make_spec(devices=(Device("/dev/xnull", "/dev/null", "rw"),)))
    linux = doc["linux"]
    assert linux["devices"] == [
        {
            "path": "/dev/xnull",
            "type": "c",
            "major": 1,
            "minor": 3,
            "fileMode": st.st_mode & 0o7777,
            "uid": st.st_uid,
            "gid": st.st_gid,
        }
    ]
    assert linux["resources"]["devices"] == [
        *defaults.DEVICE_RULES,  # deny all, then the standard devices
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
    ]


def test_no_devices_denies_all() -> None:
    linux = build()["linux"]
    assert linux["devices"] == []
    assert linux["resources"]["devices"] == list(defaults.DEVICE_RULES)


def test_device_directory(tmp_path: Path) -> None:
    # A directory gives the device nodes below it; symbolic links are not device nodes.
    d = tmp_path / "devs"
    d.mkdir()
    (d / "link").symlink_to("/dev/null")
    (d / "file").write_text("")
    doc = build(spec=make_spec(devices=(Device("/dev/x", str(d), "r"),)))
    assert doc["linux"]["devices"] == []
    assert doc["linux"]["resources"]["devices"] == list(defaults.DEVICE_RULES)


@pytest.mark.parametrize(
    ("device", "match"),
    [
        (
            Device("/dev/x", "/dev/does-not-exist"),
            r"config.devices\[0\].host_path: .* does not exist",
        ),
        (Device("/dev/x", "/etc/hostname"), "is not a device"),
        (Device("/dev/x", "/dev/null", "rwx"), r"config.devices\[0\].permissions"),
        (Device("/dev/x", "/dev/null", "rr"), r"config.devices\[0\].permissions"),
        (Device("x", "/dev/null"), r"config.devices\[0\].container_path"),
    ],
)
def test_device_refusals(device: Device, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        build(spec=make_spec(devices=(device,)))


def test_host_devices() -> None:
    devs = {d["path"]: d for d in host_devices("/dev")}
    assert devs["/dev/null"]["major"] == 1 and devs["/dev/zero"]["minor"] == 5
    assert "/dev/console" not in devs
    assert not any(p.startswith(("/dev/pts/", "/dev/shm/", "/dev/fd/")) for p in devs)
    assert host_devices("/nonexistent") == []


# -- resources -------------------------------------------------------------------------------------


def res(**kw: Any) -> ContainerResources:
    adj = kw.pop("oom_score_adj", 0)
    return ContainerResources(cgroup=Resources(**kw), oom_score_adj=adj)


def test_resources() -> None:
    r = res(
        cpu_shares=512,
        cpu_quota=50000,
        cpu_period=100000,
        cpuset_cpus="0-1",
        cpuset_mems="0",
        memory_limit=64 << 20,
        pids_limit=100,
        hugepage_limits={"2MB": 0, "1GB": 1 << 30},
    )
    doc = build(spec=make_spec(resources=r))
    out = doc["linux"]["resources"]
    assert out["cpu"] == {
        "shares": 512,
        "quota": 50000,
        "period": 100000,
        "cpus": "0-1",
        "mems": "0",
    }
    assert out["memory"] == {"limit": 64 << 20, "swap": 64 << 20}  # no swap by default
    assert out["pids"] == {"limit": 100}
    assert out["hugepageLimits"] == [
        {"pageSize": "2MB", "limit": 0},
        {"pageSize": "1GB", "limit": 1 << 30},
    ]
    assert "unified" not in out


def test_resources_empty() -> None:
    assert oci_resources(res(), OPTIONS) == {}


@pytest.mark.parametrize(
    ("memory", "swap", "accounting", "expected"),
    [
        (64 << 20, 0, True, {"limit": 64 << 20, "swap": 64 << 20}),
        (64 << 20, 0, False, {"limit": 64 << 20}),
        (64 << 20, 128 << 20, True, {"limit": 64 << 20, "swap": 128 << 20}),
        (64 << 20, -1, True, {"limit": 64 << 20, "swap": -1}),
        (-1, 0, True, {"limit": -1, "swap": -1}),
    ],
)
def test_memory_swap(memory: int, swap: int, accounting: bool, expected: dict[str, int]) -> None:
    node = dataclasses.replace(V1_NODE, swap_accounting=accounting)
    out = oci_resources(res(memory_limit=memory, memory_swap_limit=swap), opts(cgroups=node))
    assert out["memory"] == expected


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"memory_limit": 64 << 20, "memory_swap_limit": 32 << 20}, "memory_swap_limit_in_bytes"),
        ({"memory_swap_limit": 32 << 20}, "a swap limit needs a memory limit"),
        ({"memory_limit": -5}, "memory_limit_in_bytes"),
        ({"cpu_shares": -1}, "cpu_shares"),
        ({"hugepage_limits": {"2M": 1}}, "page size '2M'"),
        ({"hugepage_limits": {"2MB": -1}}, "limit -1 for 2MB is negative"),
        ({"unified": {"memoryhigh": "1G"}}, "not a cgroup file name"),
    ],
)
def test_resource_refusals(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as e:
        oci_resources(res(**kw), OPTIONS)
    assert e.value.message.startswith("config.linux.resources.")


def test_unified_on_v2() -> None:
    out = oci_resources(res(unified={"memory.high": "1G"}), opts(cgroups=V2_NODE))
    assert out["unified"] == {"memory.high": "1G"}
    with pytest.raises(InvalidArgument, match="not a cgroup file name"):
        oci_resources(res(unified={"../x": "1"}), opts(cgroups=V2_NODE))


#: What kubelet 1.35 sends for a container on a node with 2MB and 1GB pages (cgroup v1).
KUBELET_DEFAULTS = {"cpu_shares": 2, "cpu_period": 100000, "memory_limit": 64 << 20,
                    "memory_swap_limit": 64 << 20, "hugepage_limits": {"2MB": 0, "1GB": 0}}


def test_kubelet_defaults_on_a_node_without_hugetlb() -> None:
    """The kubelet-requests issue: no hugetlb hierarchy mounted (cgroup v1 hybrid), so the
    hugepage limits kubelet always sends are dropped (CRI-O, containerd) and runc is not
    asked for them; everything else stays."""
    node = dataclasses.replace(V1_NODE, v1_controllers={
        k: v for k, v in V1_NODE.v1_controllers.items() if k != "hugetlb"})
    out = oci_resources(res(**KUBELET_DEFAULTS), opts(cgroups=node), make_sandbox(),
                        container_id="c0ffee")
    assert "hugepageLimits" not in out
    assert out["cpu"] == {"shares": 2, "period": 100000}
    assert out["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    # with the controller: as sent
    out = oci_resources(res(**KUBELET_DEFAULTS), opts(cgroups=V1_NODE))
    assert out["hugepageLimits"] == [{"pageSize": "2MB", "limit": 0},
                                     {"pageSize": "1GB", "limit": 0}]


def test_hugepage_sizes_the_node_lacks_are_dropped() -> None:
    node = dataclasses.replace(V2_NODE, hugepage_sizes=frozenset({"2MB"}))
    out = oci_resources(res(hugepage_limits={"2MB": 4 << 20, "1GB": 0}), opts(cgroups=node))
    assert out["hugepageLimits"] == [{"pageSize": "2MB", "limit": 4 << 20}]
    node = dataclasses.replace(V2_NODE, v2_controllers=V2_NODE.v2_controllers - {"hugetlb"})
    assert "hugepageLimits" not in oci_resources(
        res(hugepage_limits={"2MB": 1 << 21}), opts(cgroups=node))


def test_swap_dropped_without_swap_accounting() -> None:
    node = dataclasses.replace(V2_NODE, swap_accounting=False)
    kw = {**KUBELET_DEFAULTS, "unified": {"memory.swap.max": "0", "memory.oom.group": "1"}}
    out = oci_resources(res(**kw), opts(cgroups=node))
    assert out["memory"] == {"limit": 64 << 20}
    assert out["unified"] == {"memory.oom.group": "1"}  # kubelet's NoSwap key: dropped
    out = oci_resources(res(unified={"memory.swap.max": "0"}), opts(cgroups=V2_NODE))
    assert out["unified"] == {"memory.swap.max": "0"}


def test_unified_on_v1_is_dropped() -> None:
    """CRI-O's answer on cgroup v1 (kubelet sends ``unified`` only on v2)."""
    out = oci_resources(res(unified={"memory.high": "1G"}, cpu_shares=2), opts(cgroups=V1_NODE))
    assert "unified" not in out and out["cpu"] == {"shares": 2}


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"cpuset_cpus": "0-1"}, "cpuset_cpus"),
        ({"cpuset_mems": "0"}, "cpuset_mems"),
        ({"unified": {"cpuset.cpus.partition": "root"}}, "unified['cpuset.cpus.partition']"),
    ],
)
def test_limits_of_a_controller_the_pod_lacks_are_refused(kw: dict[str, Any], field: str
                                                          ) -> None:
    """cpuset on a node without cpuset delegation: runc would fail the create; the request
    fails first, naming the field (a pinned CPU set silently dropped would be wrong)."""
    node = dataclasses.replace(V2_NODE, v2_controllers=V2_NODE.v2_controllers - {"cpuset"})
    with pytest.raises(FailedPrecondition) as e:
        oci_resources(res(**kw), opts(cgroups=node))
    assert e.value.message.startswith(f"config.linux.resources.{field}: the cpuset controller")
