"""The pod cgroup over fake cgroup trees (v1, hybrid, v2), and the path/slice/value rules.

The fake: directories under ``tmp_path`` with the control files as plain files, and
``os.mkdir``/``os.rmdir`` patched (below the fake root only) to do what the kernel does:
mkdir fills a new cgroup with its control files (v2: ``cgroup.controllers`` from the parent's
``cgroup.subtree_control``), rmdir refuses a cgroup with processes or children (EBUSY) and
drops the control files with the directory.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.sandbox import cgroups
from moorage.sandbox.cgroups import Layout, PodCgroup, Resources

UNLIMITED_V1 = "9223372036854771712"

#: Files the kernel gives every new cgroup, per v1 controller (value as a new child has it).
V1_FILES: dict[str, dict[str, str]] = {
    "cpu": {"cpu.shares": "1024\n", "cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n"},
    "memory": {
        "memory.limit_in_bytes": UNLIMITED_V1 + "\n",
        "memory.memsw.limit_in_bytes": UNLIMITED_V1 + "\n",
    },
    "pids": {"pids.max": "max\n"},
    "blkio": {"blkio.weight": "500\n"},
    "devices": {"devices.list": "a *:* rwm\n"},
    "freezer": {"freezer.state": "THAWED\n"},
    "hugetlb": {"hugetlb.2MB.limit_in_bytes": UNLIMITED_V1 + "\n"},
}
V2_FILES: dict[str, dict[str, str]] = {
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
    "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n"},
    "io": {"io.max": ""},
    "memory": {"memory.max": "max\n", "memory.high": "max\n", "memory.swap.max": "max\n"},
    "hugetlb": {"hugetlb.2MB.max": "max\n"},
    "pids": {"pids.max": "max\n"},
}
V2_ROOT_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc"


class FakeCgroupfs:
    """A fake cgroup filesystem at ``root``.

    ``v1`` maps each v1 mount directory name to its controllers (super options);
    ``hybrid`` adds cgroup2 at ``root/unified``; ``v1=None`` makes ``root`` a cgroup2 root.
    """

    def __init__(
        self,
        root: Path,
        v1: dict[str, list[str]] | None,
        *,
        hybrid: bool = False,
        memsw: bool = True,
    ) -> None:
        self.root = root
        self.v1 = v1
        self.memsw = memsw
        self.writes: list[tuple[str, str]] = []  # (file name, value) in order
        self.kinds: dict[Path, list[str] | None] = {}  # hierarchy root -> v1 ctrls / None=v2
        lines = [f"31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755"]
        if v1 is None:
            root.mkdir(parents=True, exist_ok=True)
            self.kinds[root] = None
            lines = [f"31 23 0:28 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"]
        else:
            for i, (name, ctrls) in enumerate(v1.items()):
                point = root / name
                point.mkdir(parents=True)
                self.kinds[point] = ctrls
                lines.append(
                    f"{32 + i} 31 0:{29 + i} / {point} rw - cgroup cgroup rw,{','.join(ctrls)}"
                )
            if hybrid:
                point = root / "unified"
                point.mkdir()
                self.kinds[point] = None
                lines.append(f"50 31 0:50 / {point} rw - cgroup2 cgroup2 rw")
        for point in self.kinds:
            self._populate(point, top=True)
        self.mountinfo = root.parent / "mountinfo"
        self.mountinfo.write_text("\n".join(lines) + "\n")

    def layout(self, page_sizes_kb: tuple[int, ...] = (2048, 1048576)) -> Layout:
        """The layout as the daemon probes it, with these huge page sizes in the kernel and
        this process in the cgroup ``/self`` (made, on v2, with the root's controllers)."""
        pages = self.root.parent / "hugepages"
        pages.mkdir(exist_ok=True)
        for kb in page_sizes_kb:
            (pages / f"hugepages-{kb}kB").mkdir(exist_ok=True)
        own = self.root.parent / "self-cgroup"
        own.write_text("0::/\n")
        return Layout.detect(self.root, self.mountinfo, pages, own)

    def hierarchy_of(self, path: Path) -> Path | None:
        for point in self.kinds:
            if path == point or point in path.parents:
                return point
        return None

    def _populate(self, directory: Path, top: bool = False) -> None:
        point = self.hierarchy_of(directory)
        assert point is not None
        kind = self.kinds[point]
        files = {"cgroup.procs": ""}
        if kind is not None:
            for ctrl in kind:
                files.update(V1_FILES.get(ctrl, {}))
            if not self.memsw:
                files.pop("memory.memsw.limit_in_bytes", None)
            if top and "cpuset" in kind:
                files.update({"cpuset.cpus": "0-3\n", "cpuset.mems": "0\n"})
        else:
            if top:
                controllers = V2_ROOT_CONTROLLERS if point == self.root else "hugetlb"
            else:
                parent = (directory.parent / "cgroup.subtree_control").read_text()
                controllers = " ".join(w.lstrip("+") for w in parent.split())
            files["cgroup.controllers"] = controllers + "\n"
            files["cgroup.subtree_control"] = ""
            for ctrl in controllers.split():
                files.update(V2_FILES.get(ctrl, {}))
        for name, content in files.items():
            (directory / name).write_text(content)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_mkdir, real_rmdir = os.mkdir, os.rmdir

        def mkdir(path: str | os.PathLike[str], mode: int = 0o777, **kw: object) -> None:
            real_mkdir(path, mode)
            p = Path(path)
            if self.hierarchy_of(p) is not None:
                self._populate(p)

        def rmdir(path: str | os.PathLike[str], **kw: object) -> None:
            p = Path(path)
            if self.hierarchy_of(p) is None or not p.is_dir():
                real_rmdir(path)
                return
            if any(c.is_dir() for c in p.iterdir()) or (p / "cgroup.procs").read_text().strip():
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(p))
            for c in p.iterdir():
                c.unlink()
            real_rmdir(path)

        real_write = cgroups._write

        def write(path: Path, value: str) -> None:
            self.writes.append((path.name, value))
            if path.name != "cgroup.subtree_control" or self.hierarchy_of(path) is None:
                real_write(path, value)
                return
            enabled = (path.read_text() if path.exists() else "").split()
            available = (path.parent / "cgroup.controllers").read_text().split()
            for token in value.split():
                name = token[1:]
                if token[0] not in "+-" or name not in available:
                    raise cgroups._WriteError(f"write {value!r} to {path}: ENOENT", errno.ENOENT)
                if token[0] == "+" and name not in enabled:
                    enabled.append(name)
                elif token[0] == "-" and name in enabled:
                    enabled.remove(name)
            now = " ".join(c for c in available if c in enabled) + "\n"
            real_write(path, now)
            for child in path.parent.iterdir():  # the children see it at once
                if child.is_dir():
                    (child / "cgroup.controllers").write_text(now)
                    for ctrl in enabled:
                        for name, content in V2_FILES.get(ctrl, {}).items():
                            if not (child / name).exists():
                                (child / name).write_text(content)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "rmdir", rmdir)
        monkeypatch.setattr(cgroups, "_write", write)


@pytest.fixture
def v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupfs:
    fs = FakeCgroupfs(tmp_path / "cgroup", None)
    fs.install(monkeypatch)
    return fs


V1_MOUNTS = {
    "cpu,cpuacct": ["cpu", "cpuacct"],
    "cpuset": ["cpuset"],
    "memory": ["memory"],
    "pids": ["pids"],
    "blkio": ["blkio"],
    "devices": ["devices"],
    "freezer": ["freezer"],
    "hugetlb": ["hugetlb"],
    "systemd": ["xattr", "name=systemd"],
}


@pytest.fixture
def v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupfs:
    fs = FakeCgroupfs(tmp_path / "cgroup", V1_MOUNTS, hybrid=True)
    fs.install(monkeypatch)
    return fs


def read(path: Path) -> str:
    return path.read_text()


# -- Layout.detect --------------------------------------------------------------------------

HYBRID = """\
22 1 8:1 / / rw,relatime - ext4 /dev/vda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

PURE_V1 = """\
25 1 8:1 / / rw - ext4 /dev/sda1 rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,release_agent=/a,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid shared:13 - cgroup cgroup rw,net_cls,net_prio
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid shared:14 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/hugetlb rw,nosuid shared:15 - cgroup cgroup rw,hugetlb
37 30 0:33 / /sys/fs/cgroup/cpuset rw,nosuid shared:16 - cgroup cgroup rw,cpuset,clone_children
38 30 0:34 / /sys/fs/cgroup/pids rw,nosuid shared:17 - cgroup cgroup rw,pids
90 25 0:33 / /mnt/elsewhere rw - cgroup cgroup rw,cpuset,clone_children
"""

PURE_V2 = """\
25 1 8:1 / / rw - ext4 /dev/sda1 rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
31 25 0:27 / /sys/fs/bpf rw - bpf bpf rw,mode=700
"""


def test_detect_hybrid(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(HYBRID)
    layout = Layout.detect(Path("/sys/fs/cgroup"), mi)
    cg = Path("/sys/fs/cgroup")
    assert layout.version == 1
    assert layout.unified == cg / "unified"
    assert dict(layout.v1_controllers) == {
        "cpu": cg / "cpu",
        "cpuacct": cg / "cpuacct",
        "cpuset": cg / "cpuset",
        "memory": cg / "memory",
        "devices": cg / "devices",
        "freezer": cg / "freezer",
        "blkio": cg / "blkio",
        "pids": cg / "pids",
        "name=systemd": cg / "systemd",
    }
    assert layout.hierarchies()[-1] == cg / "unified"
    assert len(layout.hierarchies()) == 10


def test_detect_pure_v1_with_comounts() -> None:
    layout = Layout.from_mountinfo(PURE_V1, Path("/sys/fs/cgroup"))
    cg = Path("/sys/fs/cgroup")
    assert layout.version == 1
    assert layout.unified is None
    assert layout.v1_controllers["cpu"] == layout.v1_controllers["cpuacct"] == cg / "cpu,cpuacct"
    assert layout.v1_controllers["net_prio"] == cg / "net_cls,net_prio"
    assert layout.v1_controllers["name=systemd"] == cg / "systemd"
    assert layout.v1_controllers["cpuset"] == cg / "cpuset"  # not the one outside the root
    assert "xattr" not in layout.v1_controllers
    assert "clone_children" not in layout.v1_controllers
    assert not any(k.startswith("release_agent") for k in layout.v1_controllers)
    assert layout.hierarchies() == [
        cg / "systemd",
        cg / "cpu,cpuacct",
        cg / "net_cls,net_prio",
        cg / "memory",
        cg / "hugetlb",
        cg / "cpuset",
        cg / "pids",
    ]


def test_detect_pure_v2() -> None:
    layout = Layout.from_mountinfo(PURE_V2, Path("/sys/fs/cgroup/"))
    assert layout.version == 2
    assert layout.unified == Path("/sys/fs/cgroup")
    assert dict(layout.v1_controllers) == {}
    assert layout.hierarchies() == [Path("/sys/fs/cgroup")]


def test_detect_escaped_mountpoints_and_shadowing() -> None:
    text = (
        "30 25 0:26 / /my\\040cg rw - tmpfs tmpfs rw\n"
        "31 30 0:27 / /my\\040cg/memory rw - cgroup cgroup rw,memory\n"
        "32 30 0:28 / /my\\040cg/pids rw - cgroup cgroup rw,pids\n"
        "33 30 0:29 / /my\\040cg/pids rw - tmpfs tmpfs rw\n"  # hides the pids mount
    )
    layout = Layout.from_mountinfo(text, Path("/my cg"))
    assert dict(layout.v1_controllers) == {"memory": Path("/my cg/memory")}


def test_detect_nothing_mounted() -> None:
    with pytest.raises(FailedPrecondition, match="no cgroup"):
        Layout.from_mountinfo(PURE_V2, Path("/elsewhere"))


def test_detect_this_machine() -> None:
    layout = Layout.detect()
    assert layout.version in (1, 2)
    assert all(p.is_dir() for p in layout.hierarchies())


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("-.slice", "/"),
        ("system.slice", "/system.slice"),
        ("kubepods.slice", "/kubepods.slice"),
        (
            "kubepods-burstable-pod123.slice",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod123.slice",
        ),
        ("test-a-b.slice", "/test.slice/test-a.slice/test-a-b.slice"),
        (
            "kubepods-besteffort-pod83b090de_9676_407c_99aa_d33dc6aa0c0d.slice",
            "/kubepods.slice/kubepods-besteffort.slice/"
            "kubepods-besteffort-pod83b090de_9676_407c_99aa_d33dc6aa0c0d.slice",
        ),
        ("a.b-c.slice", "/a.b.slice/a.b-c.slice"),
    ],
)
def test_systemd_slice_path(name: str, path: str) -> None:
    assert cgroups.systemd_slice_path(name) == path


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".slice",
        "slice",
        "system",
        "test--a.slice",
        "-test.slice",
        "test-.slice",
        "--.slice",
        "a/b.slice",
        "/system.slice",
        "kubepods.scope",
        "a b.slice",
        "a\n.slice",
        "x" * 250 + ".slice",
    ],
)
def test_invalid_slices(name: str) -> None:
    with pytest.raises(InvalidArgument, match="^cgroup_parent: "):
        cgroups.systemd_slice_path(name)


@pytest.mark.parametrize(
    ("parent", "driver", "path"),
    [
        ("/kubepods/burstable/pod1234", "cgroupfs", "/kubepods/burstable/pod1234"),
        ("/kubepods//besteffort/pod1/", "cgroupfs", "/kubepods/besteffort/pod1"),
        ("//kubepods", "cgroupfs", "/kubepods"),
        ("", "cgroupfs", "/moorage"),
        (
            "kubepods-burstable-pod1.slice",
            "systemd",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice",
        ),
        ("", "systemd", "/moorage.slice"),
    ],
)
def test_pod_cgroup_path(parent: str, driver: cgroups.Driver, path: str) -> None:
    assert cgroups.pod_cgroup_path(parent, driver) == path


@pytest.mark.parametrize(
    ("parent", "driver", "why"),
    [
        ("kubepods/pod1", "cgroupfs", "absolute"),
        ("kubepods-pod1.slice", "cgroupfs", "absolute"),
        ("/kubepods/../etc", "cgroupfs", r"'\.\.'"),
        ("/kubepods/./pod", "cgroupfs", r"'\.'"),
        ("/..", "cgroupfs", r"'\.\.'"),
        ("/", "cgroupfs", "root cgroup"),
        ("///", "cgroupfs", "root cgroup"),
        ("/a\nb", "cgroupfs", "newline"),
        ("/kubepods/burstable", "systemd", "systemd slice name"),
        ("kubepods--x.slice", "systemd", "systemd slice name"),
        ("-.slice", "systemd", "root cgroup"),
    ],
)
def test_pod_cgroup_path_invalid(parent: str, driver: cgroups.Driver, why: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^linux.cgroup_parent: .*{why}"):
        cgroups.pod_cgroup_path(parent, driver)


def test_unknown_driver() -> None:
    with pytest.raises(InvalidArgument, match="cgroup driver"):
        cgroups.pod_cgroup_path("/x", "docker")  # type: ignore[arg-type]


def test_pod_cgroup_refuses_bad_paths(tmp_path: Path) -> None:
    layout = Layout(root=tmp_path, version=2, unified=tmp_path)
    for bad in ("", "x", "/", "/a/../b"):
        with pytest.raises(InvalidArgument):
            PodCgroup(layout, bad)


# -- value conversions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shares", "weight"),
    [
        (0, 0),
        (1, 1),
        (2, 1),
        (3, 1),
        (102, 4),
        (1024, 39),
        (2048, 79),
        (262144, 10000),
        (10**7, 10000),
    ],
)
def test_cpu_weight(shares: int, weight: int) -> None:
    assert cgroups.cpu_weight(shares) == weight


@pytest.mark.parametrize(
    ("swap", "memory", "v2"),
    [
        (0, 0, 0),
        (0, 100, 0),
        (0, -1, -1),
        (-1, 100, -1),
        (-1, -1, -1),
        (100, 100, 0),
        (300, 100, 200),
    ],
)
def test_memory_swap_v2(swap: int, memory: int, v2: int) -> None:
    assert cgroups.memory_swap_v2(swap, memory) == v2


@pytest.mark.parametrize(
    ("swap", "memory", "why"),
    [(100, 0, "needs a memory limit"), (100, -1, "needs a memory limit"), (50, 100, "below")],
)
def test_memory_swap_v2_invalid(swap: int, memory: int, why: str) -> None:
    with pytest.raises(InvalidArgument, match=f"linux.resources.memory_swap.*{why}"):
        cgroups.memory_swap_v2(swap, memory)


# -- v2 -------------------------------------------------------------------------------------


def test_v2_create_enables_controllers_in_ancestors(v2: FakeCgroupfs) -> None:
    root = v2.root
    # as kubelet left them: cpu, memory, pids enabled at the top, cpu and memory below
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (root / "kubepods").mkdir()  # the fake's mkdir: controllers from the parent
    (root / "kubepods" / "cgroup.subtree_control").write_text("cpu memory\n")
    cg = PodCgroup(v2.layout(), "/kubepods/burstable/pod1")
    created = cg.create()
    assert created == [root / "kubepods/burstable", root / "kubepods/burstable/pod1"]
    # only what is missing is asked for, in each ancestor
    assert v2.writes == [
        ("cgroup.subtree_control", "+cpuset +io +hugetlb"),
        ("cgroup.subtree_control", "+cpuset +io +hugetlb +pids"),
        ("cgroup.subtree_control", "+cpuset +cpu +io +memory +hugetlb +pids"),
    ]
    everything = "cpuset cpu io memory hugetlb pids\n"
    assert read(root / "cgroup.subtree_control") == everything
    assert read(root / "kubepods/cgroup.subtree_control") == everything
    assert read(root / "kubepods/burstable/cgroup.subtree_control") == everything
    assert read(root / "kubepods/burstable/pod1/cgroup.controllers") == everything
    # the pod cgroup's own subtree_control is left to runc
    assert read(root / "kubepods/burstable/pod1/cgroup.subtree_control") == ""
    assert cg.procs_files() == [root / "kubepods/burstable/pod1/cgroup.procs"]
    assert cg.dirs() == [root / "kubepods/burstable/pod1"]


def test_v2_a_slice_systemd_made_gets_the_controllers_systemd_leaves_out(
        v2: FakeCgroupfs) -> None:
    """systemd enables only the controllers it manages below its slices: hugetlb stays
    unavailable to a pod slice it started until its ancestors enable it."""
    root = v2.root
    (root / "cgroup.subtree_control").write_text("cpuset cpu io memory pids\n")
    for d in ("kubepods.slice", "kubepods.slice/kubepods-burstable.slice",
              "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"):
        (root / d).mkdir()  # the fake's mkdir: controllers from the parent
        (root / d / "cgroup.subtree_control").write_text("cpuset cpu io memory pids\n")
    cg = PodCgroup(v2.layout(), cgroups.systemd_slice_path("kubepods-burstable-pod1.slice"))
    pod = root / "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"
    assert "hugetlb" not in read(pod / "cgroup.controllers")
    cg.enable_controllers()
    assert v2.writes == [("cgroup.subtree_control", "+hugetlb")] * 3
    assert "hugetlb" in read(pod / "cgroup.controllers").split()
    # the pod slice's own subtree_control is left to runc
    assert "hugetlb" not in read(pod / "cgroup.subtree_control")


def test_v2_create_twice_creates_nothing(v2: FakeCgroupfs) -> None:
    cg = PodCgroup(v2.layout(), "/kubepods/pod1")
    assert len(cg.create()) == 2
    assert cg.create() == []


def test_v2_create_only_available_controllers(v2: FakeCgroupfs) -> None:
    (v2.root / "cgroup.controllers").write_text("cpu memory\n")
    PodCgroup(v2.layout(), "/a/pod").create()
    assert v2.writes == [("cgroup.subtree_control", "+cpu +memory")] * 2
    assert read(v2.root / "a/pod/cgroup.controllers") == "cpu memory\n"


def test_v2_subtree_control_refused_as_a_whole_then_one_by_one(
    v2: FakeCgroupfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []
    real = cgroups._write

    def refuse_io(path: Path, value: str) -> None:
        if path.name == "cgroup.subtree_control":
            attempts.append(value)
            if "+io" in value:
                raise cgroups._WriteError(f"write {value!r} to {path}: busy", errno.EBUSY)
        real(path, value)

    monkeypatch.setattr(cgroups, "_write", refuse_io)
    PodCgroup(v2.layout(), "/pod").create()
    assert attempts == [
        "+cpuset +cpu +io +memory +hugetlb +pids",
        "+cpuset",
        "+cpu",
        "+io",
        "+memory",
        "+hugetlb",
        "+pids",
    ]


def test_v2_apply(v2: FakeCgroupfs) -> None:
    writes = v2.writes
    cg = PodCgroup(v2.layout(), "/kubepods/pod1")
    cg.create()
    writes.clear()
    cg.apply(
        Resources(
            cpu_period=100000,
            cpu_quota=50000,
            cpu_shares=1024,
            memory_limit=256 << 20,
            memory_swap_limit=512 << 20,
            cpuset_cpus="0-1",
            cpuset_mems="0",
            pids_limit=1024,
            hugepage_limits={"2MB": 4 << 20},
            unified={"memory.high": "200000000", "cpu.weight": "77"},
        )
    )
    d = v2.root / "kubepods/pod1"
    assert read(d / "cpu.max") == "50000 100000"
    assert read(d / "cpu.weight") == "77"  # the unified map is written last, as given
    assert read(d / "memory.max") == str(256 << 20)
    assert read(d / "memory.swap.max") == str(256 << 20)  # swap alone on v2
    assert read(d / "pids.max") == "1024"
    assert read(d / "cpuset.cpus") == "0-1"
    assert read(d / "cpuset.mems") == "0"
    assert read(d / "hugetlb.2MB.max") == str(4 << 20)
    assert writes == [
        ("cpu.max", "50000 100000"),
        ("cpu.weight", "39"),
        ("memory.swap.max", str(256 << 20)),
        ("memory.max", str(256 << 20)),
        ("pids.max", "1024"),
        ("cpuset.cpus", "0-1"),
        ("cpuset.mems", "0"),
        ("hugetlb.2MB.max", str(4 << 20)),
        ("memory.high", "200000000"),
        ("cpu.weight", "77"),
    ]


@pytest.mark.parametrize(
    ("res", "expected"),
    [
        (Resources(cpu_quota=-1, cpu_period=100000), [("cpu.max", "max 100000")]),
        (Resources(cpu_quota=20000), [("cpu.max", "20000")]),
        (Resources(cpu_period=50000), [("cpu.max", "max 50000")]),
        (Resources(cpu_shares=2), [("cpu.weight", "1")]),
        (Resources(memory_limit=-1), [("memory.swap.max", "max"), ("memory.max", "max")]),
        (Resources(memory_limit=1000), [("memory.max", "1000")]),
        (
            Resources(memory_limit=1000, memory_swap_limit=1000),
            # memory+swap equal to memory: no swap, so 0 is written (runc's fs2 does too)
            [("memory.swap.max", "0"), ("memory.max", "1000")],
        ),
        (
            Resources(memory_limit=1000, memory_swap_limit=-1),
            [("memory.swap.max", "max"), ("memory.max", "1000")],
        ),
        (Resources(pids_limit=-1), [("pids.max", "max")]),
        (Resources(), []),
    ],
)
def test_v2_apply_values(v2: FakeCgroupfs, res: Resources, expected: list[object]) -> None:
    writes = v2.writes
    cg = PodCgroup(v2.layout(), "/pod")
    cg.create()
    writes.clear()
    cg.apply(res)
    assert writes == expected


@pytest.mark.parametrize(
    ("res", "props"),
    [
        (Resources(), []),
        (Resources(cpu_shares=1024, cpu_quota=50_000, cpu_period=100_000),
         [("CPUWeight", ("t", 39)), ("CPUQuotaPerSecUSec", ("t", 500_000)),
          ("CPUQuotaPeriodUSec", ("t", 100_000))]),
        # systemd's granularity is 10 ms per second: rounded up, as runc does
        (Resources(cpu_quota=12_345), [("CPUQuotaPerSecUSec", ("t", 130_000))]),
        (Resources(cpu_quota=-1), [("CPUQuotaPerSecUSec", ("t", 2**64 - 1))]),
        (Resources(memory_limit=1000, memory_swap_limit=1000),
         [("MemoryMax", ("t", 1000)), ("MemorySwapMax", ("t", 0))]),
        (Resources(memory_limit=1000, memory_swap_limit=3000),
         [("MemoryMax", ("t", 1000)), ("MemorySwapMax", ("t", 2000))]),
        (Resources(memory_limit=-1),
         [("MemoryMax", ("t", 2**64 - 1)), ("MemorySwapMax", ("t", 2**64 - 1))]),
        (Resources(pids_limit=-1), [("TasksMax", ("t", 2**64 - 1))]),
        (Resources(cpuset_cpus="0-2,9", cpuset_mems="0"),
         [("AllowedCPUs", ("ay", bytes([0b111, 0b10]))),
          ("AllowedMemoryNodes", ("ay", b"\x01"))]),
        (Resources(unified={"memory.high": "5000", "memory.low": "max", "io.weight": "50"}),
         [("MemoryHigh", ("t", 5000)), ("MemoryLow", ("t", 2**64 - 1))]),
    ],
)
def test_systemd_properties(res: Resources, props: list[object]) -> None:
    assert cgroups.systemd_properties(res) == props


@pytest.mark.parametrize(
    "res",
    [Resources(cpuset_cpus="0-x"), Resources(cpuset_mems="a"),
     Resources(unified={"memory.high": "lots"})],
)
def test_systemd_properties_invalid(res: Resources) -> None:
    with pytest.raises(InvalidArgument, match="linux.resources"):
        cgroups.systemd_properties(res)


def test_v2_swap_max_without_swap_accounting(v2: FakeCgroupfs) -> None:
    cg = PodCgroup(v2.layout(), "/pod")
    cg.create()
    (v2.root / "pod/memory.swap.max").unlink()
    cg.apply(Resources(memory_limit=-1))  # "max" is fine without the file (runc)
    cg.apply(Resources(memory_limit=100, memory_swap_limit=-1))
    with pytest.raises(FailedPrecondition, match=r"write '100' to .*memory\.swap\.max"):
        cg.apply(Resources(memory_limit=100, memory_swap_limit=200))


def test_v2_write_failure_names_file_and_value(v2: FakeCgroupfs) -> None:
    cg = PodCgroup(v2.layout(), "/pod")
    cg.create()
    with pytest.raises(FailedPrecondition) as info:
        cg.apply(Resources(hugepage_limits={"1GB": 1 << 30}))
    assert str(v2.root / "pod/hugetlb.1GB.max") in info.value.message
    assert repr(str(1 << 30)) in info.value.message
    with pytest.raises(FailedPrecondition, match="memory.low"):
        cg.apply(Resources(unified={"memory.low": "1"}))  # files are never created


@pytest.mark.parametrize(
    "res",
    [
        Resources(hugepage_limits={"2MB/../../x": 1}),
        Resources(hugepage_limits={"2mb": 1}),
        Resources(unified={"../cpu.max": "1"}),
        Resources(unified={"": "1"}),
        Resources(unified={".hidden": "1"}),
        Resources(memory_swap_limit=100),
        Resources(memory_limit=200, memory_swap_limit=100),
    ],
)
def test_v2_apply_invalid(v2: FakeCgroupfs, res: Resources) -> None:
    cg = PodCgroup(v2.layout(), "/pod")
    cg.create()
    with pytest.raises(InvalidArgument, match="^linux.resources."):
        cg.apply(res)


def test_v2_remove(v2: FakeCgroupfs) -> None:
    (v2.root / "kubepods").mkdir()
    cg = PodCgroup(v2.layout(), "/kubepods/burstable/pod1")
    created = cg.create()
    cg.remove(created)
    assert not (v2.root / "kubepods/burstable").exists()
    assert (v2.root / "kubepods").is_dir()  # not ours
    cg.remove(created)  # missing is fine


def test_v2_remove_refuses_while_processes_are_inside(v2: FakeCgroupfs) -> None:
    cg = PodCgroup(v2.layout(), "/kubepods/pod1")
    created = cg.create()
    (v2.root / "kubepods/pod1/cgroup.procs").write_text("4242\n4243\n")
    with pytest.raises(FailedPrecondition) as info:
        cg.remove(created)
    msg = info.value.message
    assert f"{v2.root / 'kubepods/pod1'} still holds processes 4242, 4243" in msg
    assert f"{v2.root / 'kubepods'}: " in msg  # the parent could not go either
    assert (v2.root / "kubepods/pod1").is_dir()
    (v2.root / "kubepods/pod1/cgroup.procs").write_text("")
    cg.remove(created)
    assert not (v2.root / "kubepods").exists()


def test_v2_remove_with_a_child_left_retries_then_fails(
    v2: FakeCgroupfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PodCgroup, "RMDIR_DELAY", 0.0)
    calls: list[str] = []
    real_rmdir = os.rmdir

    def counting(path: str | os.PathLike[str], **kw: object) -> None:
        calls.append(str(path))
        real_rmdir(path)

    cg = PodCgroup(v2.layout(), "/pod")
    created = cg.create()
    (v2.root / "pod/crio-abc").mkdir()  # a container cgroup still there
    monkeypatch.setattr(os, "rmdir", counting)
    with pytest.raises(FailedPrecondition, match="pod cgroup not removed: .*/pod: "):
        cg.remove(created)
    assert len(calls) == PodCgroup.RMDIR_TRIES


def test_v2_remove_keeps_a_parent_other_pods_use(
    v2: FakeCgroupfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first pod made the parent; removing that pod leaves it to the other pods at once
    (no EBUSY retries, no failure)."""
    first = PodCgroup(v2.layout(), "/shared/pod1")
    created = first.create()
    assert v2.root / "shared" in created
    PodCgroup(v2.layout(), "/shared/pod2").create()
    calls: list[str] = []
    real_rmdir = os.rmdir

    def counting(path: str | os.PathLike[str], **kw: object) -> None:
        calls.append(str(path))
        real_rmdir(path)

    monkeypatch.setattr(os, "rmdir", counting)
    first.remove(created)
    assert not (v2.root / "shared/pod1").exists()
    assert (v2.root / "shared/pod2").is_dir()
    assert calls == [str(v2.root / "shared/pod1")]


# -- v1 -------------------------------------------------------------------------------------


def test_v1_create_in_every_hierarchy(v1: FakeCgroupfs) -> None:
    root = v1.root
    layout = v1.layout()
    assert layout.version == 1 and layout.unified == root / "unified"
    cg = PodCgroup(layout, "/kubepods/burstable/pod1")
    created = cg.create()
    mounts = [*V1_MOUNTS, "unified"]
    assert created == [
        p
        for m in mounts
        for p in (
            root / m / "kubepods",
            root / m / "kubepods/burstable",
            root / m / "kubepods/burstable/pod1",
        )
    ]
    assert cg.procs_files() == [root / m / "kubepods/burstable/pod1/cgroup.procs" for m in mounts]
    # cpuset: every level got the parent's cpus and mems
    for rel in ("kubepods", "kubepods/burstable", "kubepods/burstable/pod1"):
        assert read(root / "cpuset" / rel / "cpuset.cpus") == "0-3"
        assert read(root / "cpuset" / rel / "cpuset.mems") == "0"
    # nothing enabled in the hybrid cgroup2 tree: it only tracks processes
    assert read(root / "unified/cgroup.subtree_control") == ""


def test_v1_create_keeps_existing_dirs_and_their_cpusets(v1: FakeCgroupfs) -> None:
    root = v1.root
    for m in V1_MOUNTS:
        (root / m / "kubepods").mkdir()
    (root / "cpuset/kubepods/cpuset.cpus").write_text("2-3\n")
    (root / "cpuset/kubepods/cpuset.mems").write_text("0\n")
    created = PodCgroup(v1.layout(), "/kubepods/pod1").create()
    assert created == [root / m / "kubepods/pod1" for m in V1_MOUNTS] + [
        root / "unified/kubepods",
        root / "unified/kubepods/pod1",
    ]
    assert read(root / "cpuset/kubepods/cpuset.cpus") == "2-3\n"  # untouched
    assert read(root / "cpuset/kubepods/pod1/cpuset.cpus") == "2-3"


def test_v1_create_rolls_back_on_failure(v1: FakeCgroupfs) -> None:
    layout = v1.layout()
    (v1.root / "pids").rename(v1.root / "pids.gone")
    with pytest.raises(FailedPrecondition, match="pids is missing"):
        PodCgroup(layout, "/kubepods/pod1").create()
    for m in V1_MOUNTS:
        if m != "pids":
            assert not (v1.root / m / "kubepods").exists()


def test_v1_apply(v1: FakeCgroupfs) -> None:
    writes = v1.writes
    cg = PodCgroup(v1.layout(), "/kubepods/pod1")
    cg.create()
    writes.clear()
    cg.apply(
        Resources(
            cpu_period=100000,
            cpu_quota=50000,
            cpu_shares=512,
            memory_limit=256 << 20,
            memory_swap_limit=512 << 20,
            cpuset_cpus="1",
            cpuset_mems="0",
            pids_limit=100,
            hugepage_limits={"2MB": 2 << 20},
        )
    )
    r = v1.root
    assert read(r / "cpu,cpuacct/kubepods/pod1/cpu.shares") == "512"
    assert read(r / "cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us") == "100000"
    assert read(r / "cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us") == "50000"
    assert read(r / "memory/kubepods/pod1/memory.limit_in_bytes") == str(256 << 20)
    assert read(r / "memory/kubepods/pod1/memory.memsw.limit_in_bytes") == str(512 << 20)
    assert read(r / "pids/kubepods/pod1/pids.max") == "100"
    assert read(r / "cpuset/kubepods/pod1/cpuset.cpus") == "1"
    assert read(r / "cpuset/kubepods/pod1/cpuset.mems") == "0"
    assert read(r / "hugetlb/kubepods/pod1/hugetlb.2MB.limit_in_bytes") == str(2 << 20)
    assert writes == [
        ("cpu.shares", "512"),
        ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "50000"),
        # the current memory limit (unlimited) is above the new memory+swap: memory first
        ("memory.limit_in_bytes", str(256 << 20)),
        ("memory.memsw.limit_in_bytes", str(512 << 20)),
        ("pids.max", "100"),
        ("cpuset.cpus", "1"),
        ("cpuset.mems", "0"),
        ("hugetlb.2MB.limit_in_bytes", str(2 << 20)),
    ]


def test_v1_memory_raise_writes_swap_first(v1: FakeCgroupfs) -> None:
    writes = v1.writes
    cg = PodCgroup(v1.layout(), "/pod")
    cg.create()
    d = v1.root / "memory/pod"
    (d / "memory.limit_in_bytes").write_text("1000\n")
    (d / "memory.memsw.limit_in_bytes").write_text("1000\n")
    writes.clear()
    cg.apply(Resources(memory_limit=3000, memory_swap_limit=4000))
    assert writes == [("memory.memsw.limit_in_bytes", "4000"), ("memory.limit_in_bytes", "3000")]
    writes.clear()
    cg.apply(Resources(memory_limit=-1))  # unlimited memory: unlimited memory+swap, first
    assert writes == [("memory.memsw.limit_in_bytes", "-1"), ("memory.limit_in_bytes", "-1")]


def test_v1_without_swap_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeCgroupfs(tmp_path / "cg", {"memory": ["memory"]}, memsw=False)
    fs.install(monkeypatch)
    cg = PodCgroup(fs.layout(), "/pod")
    cg.create()
    fs.writes.clear()
    cg.apply(Resources(memory_limit=1000, memory_swap_limit=2000))
    assert fs.writes == [("memory.limit_in_bytes", "1000")]


def test_v1_cpu_period_refused_then_retried_after_the_quota(
    v1: FakeCgroupfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = v1.writes
    cg = PodCgroup(v1.layout(), "/pod")
    cg.create()
    spy = cgroups._write
    refused: list[bool] = []

    def einval_once(path: Path, value: str) -> None:
        if path.name == "cpu.cfs_period_us" and not refused:
            refused.append(True)
            raise cgroups._WriteError(f"write {value!r} to {path}: invalid", errno.EINVAL)
        spy(path, value)

    monkeypatch.setattr(cgroups, "_write", einval_once)
    writes.clear()
    cg.apply(Resources(cpu_period=10000, cpu_quota=5000))
    assert writes == [("cpu.cfs_quota_us", "5000"), ("cpu.cfs_period_us", "10000")]
    # without a quota to set, the refusal is the answer
    refused.clear()
    with pytest.raises(FailedPrecondition, match="cfs_period_us"):
        cg.apply(Resources(cpu_period=10000))


def test_v1_values(v1: FakeCgroupfs) -> None:
    writes = v1.writes
    cg = PodCgroup(v1.layout(), "/pod")
    cg.create()
    writes.clear()
    cg.apply(Resources(cpu_quota=-1, pids_limit=-1))
    assert writes == [("cpu.cfs_quota_us", "-1"), ("pids.max", "max")]


def test_v1_drops_unified(v1: FakeCgroupfs) -> None:
    """CRI-O's answer: v2 settings mean nothing on v1 (kubelet sends them on v2 only)."""
    cg = PodCgroup(v1.layout(), "/pod")
    cg.create()
    v1.writes.clear()
    cg.apply(Resources(unified={"memory.high": "1"}, pids_limit=5))
    assert v1.writes == [("pids.max", "5")]


def test_v1_missing_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This host's case: no hugetlb hierarchy. kubelet's hugepage limits are dropped (one
    debug line); a cpu limit without the cpu controller is refused, naming the field."""
    fs = FakeCgroupfs(tmp_path / "cg", {"memory": ["memory"], "pids": ["pids"]})
    fs.install(monkeypatch)
    cg = PodCgroup(fs.layout(), "/pod")
    cg.create()
    fs.writes.clear()
    cg.apply(Resources(hugepage_limits={"2MB": 0, "1GB": 0}, memory_limit=1 << 20))
    assert fs.writes == [("memory.limit_in_bytes", str(1 << 20))]
    with pytest.raises(FailedPrecondition,
                       match="^linux.resources.cpu_shares: the cpu controller is not available"):
        cg.apply(Resources(cpu_shares=2))


def test_v1_hugepages_only_of_sizes_the_node_has(v1: FakeCgroupfs) -> None:
    cg = PodCgroup(v1.layout(page_sizes_kb=(2048,)), "/pod")
    cg.create()
    v1.writes.clear()
    cg.apply(Resources(hugepage_limits={"2MB": 1 << 21, "1GB": 0}))
    assert v1.writes == [("hugetlb.2MB.limit_in_bytes", str(1 << 21))]


def test_v2_hugepages_need_hugetlb_enabled_for_the_pod(v2: FakeCgroupfs) -> None:
    """v2: the pod cgroup's parent must have enabled hugetlb (its cgroup.controllers)."""
    cg = PodCgroup(v2.layout(), "/kubepods/pod1")
    cg.create()
    d = v2.root / "kubepods/pod1"
    v2.writes.clear()
    cg.apply(Resources(hugepage_limits={"2MB": 0}))
    assert v2.writes == [("hugetlb.2MB.max", "0")]
    (d / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    v2.writes.clear()
    cg.apply(Resources(hugepage_limits={"2MB": 0}, cpu_shares=2))
    assert v2.writes == [("cpu.weight", "1")]
    with pytest.raises(FailedPrecondition, match=r"unified\['hugetlb.2MB.rsvd.max'\]: the "
                       "hugetlb controller is not available to cgroup /kubepods/pod1"):
        cg.apply(Resources(unified={"hugetlb.2MB.rsvd.max": "0"}))


def test_v2_unified_swap_without_swap_accounting(v2: FakeCgroupfs) -> None:
    """kubelet's NoSwap (``memory.swap.max: 0``) where swap is not accounted: dropped, as
    runc drops the swap field's 0 and max; other values are refused by the kernel."""
    cg = PodCgroup(v2.layout(), "/pod")
    cg.create()
    (v2.root / "pod/memory.swap.max").unlink()
    v2.writes.clear()
    cg.apply(Resources(unified={"memory.swap.max": "0", "memory.high": "100"}))
    assert v2.writes == [("memory.high", "100")]
    with pytest.raises(FailedPrecondition, match="memory.swap.max"):
        cg.apply(Resources(unified={"memory.swap.max": "100"}))


def test_hugepage_sizes(tmp_path: Path) -> None:
    for entry in ("hugepages-2048kB", "hugepages-1048576kB", "hugepages-64kB",
                  "hugepages-32768kB", "hugepages-16777216kB", "other", "hugepages-x"):
        (tmp_path / entry).mkdir()
    assert cgroups.hugepage_sizes(tmp_path) == {"2MB", "1GB", "64KB", "32MB", "16GB"}
    assert cgroups.hugepage_sizes(tmp_path / "missing") == frozenset()


def test_detect_probes_swap_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_memsw = FakeCgroupfs(tmp_path / "a" / "cg", {"memory": ["memory"]})
    assert with_memsw.layout().swap_accounting
    without = FakeCgroupfs(tmp_path / "b" / "cg", {"memory": ["memory"]}, memsw=False)
    assert not without.layout().swap_accounting
    v2 = FakeCgroupfs(tmp_path / "c" / "cg", None)
    v2.install(monkeypatch)
    PodCgroup(v2.layout(), "/self").create()
    layout = v2.layout()
    assert layout.swap_accounting and layout.v2_controllers >= {"memory", "hugetlb"}
    (v2.root / "self/memory.swap.max").unlink()
    assert not v2.layout().swap_accounting


def test_v1_remove_everywhere_and_report_busy(v1: FakeCgroupfs) -> None:
    cg = PodCgroup(v1.layout(), "/kubepods/pod1")
    created = cg.create()
    (v1.root / "memory/kubepods/pod1/cgroup.procs").write_text("77\n")
    with pytest.raises(FailedPrecondition) as info:
        cg.remove(created)
    assert "memory/kubepods/pod1 still holds processes 77" in info.value.message
    left = sorted(str(p.relative_to(v1.root)) for p in created if p.exists())
    assert left == ["memory/kubepods", "memory/kubepods/pod1"]  # everything else went
    (v1.root / "memory/kubepods/pod1/cgroup.procs").write_text("")
    cg.remove(created)
    assert not any(p.exists() for p in created)


def test_remove_only_what_it_is_given(v1: FakeCgroupfs) -> None:
    cg = PodCgroup(v1.layout(), "/a/b")
    created = cg.create()
    cg.remove([p for p in created if p.name == "b"])
    assert all((point / "a").is_dir() for point in v1.layout().hierarchies())
    assert not any((point / "a/b").exists() for point in v1.layout().hierarchies())


def test_v1_swap_below_memory_is_invalid(v1: FakeCgroupfs) -> None:
    cg = PodCgroup(v1.layout(), "/pod")
    cg.create()
    v1.writes.clear()
    with pytest.raises(InvalidArgument, match="memory_swap_limit_in_bytes: 100 is below"):
        cg.apply(Resources(memory_limit=200, memory_swap_limit=100))
    assert v1.writes == []
