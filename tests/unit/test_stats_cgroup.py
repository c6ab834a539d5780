"""cgroup v1 and v2 readers over fixture trees with the kernel's exact file formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from moorage.errors import InvalidArgument
from moorage.sandbox.cgroups import Layout
from moorage.stats import cgroup
from moorage.stats.cgroup import CpuSpec, IoDevice, Psi, PsiData

REL = "/kubepods/burstable/podabc/moorage-0123"
UNLIMITED_V1 = "9223372036854771712"
TS = 1_700_000_000_000_000_000

# -- cgroup v1 files (as a 6.x kernel writes them) ---------------------------------------------

V1_MEMORY_STAT = """\
cache 9220096
rss 7364608
rss_huge 0
shmem 0
mapped_file 7528448
dirty 4096
writeback 0
swap 0
pgpgin 87201
pgpgout 83151
pgfault 1200
pgmajfault 3
inactive_anon 0
active_anon 1531904
inactive_file 0
active_file 135168
unevictable 0
hierarchical_memory_limit 104857600
hierarchical_memsw_limit 9223372036854771712
total_cache 20480000
total_rss 12288000
total_rss_huge 2097152
total_shmem 0
total_mapped_file 4096000
total_dirty 0
total_writeback 0
total_swap 0
total_pgpgin 100
total_pgpgout 50
total_pgfault 142555
total_pgmajfault 17
total_inactive_anon 0
total_active_anon 12288000
total_inactive_file 8192000
total_active_file 12288000
total_unevictable 0
"""
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"
V1_BLKIO_BYTES = """\
8:0 Read 4096
8:0 Write 8192
8:0 Sync 12288
8:0 Async 0
8:0 Discard 0
8:0 Total 12288
253:1 Read 100
253:1 Write 0
253:1 Sync 100
253:1 Async 0
253:1 Discard 0
253:1 Total 100
Total 12388
"""
V1_BLKIO_OPS = """\
8:0 Read 1
8:0 Write 2
8:0 Sync 3
8:0 Async 0
8:0 Discard 0
8:0 Total 3
253:1 Read 5
253:1 Write 0
253:1 Sync 5
253:1 Async 0
253:1 Discard 0
253:1 Total 5
Total 8
"""


def write_tree(base: Path, files: dict[str, str]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (base / name).write_text(text)


def v1_layout(root: Path) -> Layout:
    names = ["cpu", "cpuacct", "memory", "pids", "blkio"]
    return Layout(root=root, version=1, v1_controllers={n: root / n for n in names},
                  unified=root / "unified")


def make_v1(root: Path, rel: str = REL, *, memory_limit: str = "104857600\n",
            with_usage_user: bool = True) -> Layout:
    r = rel.strip("/")
    cpuacct = {"cpuacct.usage": "123456789012\n",
               "cpuacct.stat": "user 1000\nsystem 234\n"}
    if with_usage_user:
        cpuacct |= {"cpuacct.usage_user": "100000000000\n",
                    "cpuacct.usage_sys": "23456789012\n"}
    write_tree(root / "cpuacct" / r, cpuacct)
    write_tree(root / "cpu" / r, {
        "cpu.stat": "nr_periods 50\nnr_throttled 7\nthrottled_time 3500000000\n"
                    "nr_bursts 0\nburst_time 0\n",
        "cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "50000\n",
        "cpu.shares": "512\n",
    })
    write_tree(root / "memory" / r, {
        "memory.usage_in_bytes": "40960000\n", "memory.limit_in_bytes": memory_limit,
        "memory.max_usage_in_bytes": "50000000\n", "memory.failcnt": "4\n",
        "memory.soft_limit_in_bytes": UNLIMITED_V1 + "\n",
        "memory.stat": V1_MEMORY_STAT, "memory.oom_control": V1_OOM_CONTROL,
        "memory.memsw.usage_in_bytes": "41984000\n",
        "memory.memsw.limit_in_bytes": "209715200\n",
        "memory.kmem.usage_in_bytes": "1048576\n",
    })
    write_tree(root / "pids" / r, {"pids.current": "3\n", "pids.max": "1024\n"})
    write_tree(root / "blkio" / r, {
        "blkio.throttle.io_service_bytes_recursive": V1_BLKIO_BYTES,
        "blkio.throttle.io_serviced_recursive": V1_BLKIO_OPS,
    })
    return v1_layout(root)


def test_v1_reader(tmp_path: Path) -> None:
    layout = make_v1(tmp_path)
    stats = cgroup.read(cgroup.locate(layout, REL), TS)
    assert stats is not None and stats.timestamp_ns == TS
    cpu = stats.cpu
    assert cpu is not None
    assert cpu.usage_ns == 123456789012
    assert (cpu.user_ns, cpu.system_ns) == (100000000000, 23456789012)
    assert (cpu.periods, cpu.throttled_periods, cpu.throttled_ns) == (50, 7, 3500000000)
    assert cpu.spec == CpuSpec(period_us=100000, quota_us=50000, shares=512)
    assert cpu.psi is None
    mem = stats.memory
    assert mem is not None
    assert mem.usage == 40960000
    assert mem.working_set == 40960000 - 8192000  # usage - total_inactive_file
    assert mem.rss == 12288000 and mem.cache == 20480000 and mem.mapped_file == 4096000
    assert (mem.page_faults, mem.major_page_faults) == (142555, 17)
    assert (mem.own_page_faults, mem.own_major_page_faults) == (1200, 3)
    assert mem.limit == 104857600
    assert mem.available == 104857600 - (40960000 - 8192000)
    assert mem.reservation is None  # the unlimited soft limit
    assert (mem.max_usage, mem.failcnt, mem.kernel) == (50000000, 4, 1048576)
    assert mem.swap_usage == 41984000 - 40960000
    assert mem.swap_limit == 209715200 - 104857600
    assert mem.oom_kills == 2
    assert stats.pids == cgroup.PidsStats(current=3, limit=1024)
    assert stats.io is not None
    assert stats.io.devices == (
        IoDevice(8, 0, read_bytes=4096, write_bytes=8192, reads=1, writes=2),
        IoDevice(253, 1, read_bytes=100, write_bytes=0, reads=5, writes=0),
    )


def test_v1_unlimited_and_old_kernel_files(tmp_path: Path) -> None:
    layout = make_v1(tmp_path, memory_limit=UNLIMITED_V1 + "\n", with_usage_user=False)
    stats = cgroup.read(cgroup.locate(layout, REL), TS)
    assert stats is not None and stats.memory is not None and stats.cpu is not None
    assert stats.memory.limit is None and stats.memory.available is None
    assert stats.memory.swap_limit is None
    # cpuacct.stat in USER_HZ ticks when usage_user/usage_sys are missing.
    tick = 1_000_000_000 // cgroup._CLK_TCK
    assert (stats.cpu.user_ns, stats.cpu.system_ns) == (1000 * tick, 234 * tick)


def test_v1_missing_controllers_and_gone_cgroup(tmp_path: Path) -> None:
    layout = make_v1(tmp_path)
    assert cgroup.read(cgroup.locate(layout, "/kubepods/gone"), TS) is None
    only = Layout(root=tmp_path, version=1,
                  v1_controllers={"memory": tmp_path / "memory"})
    stats = cgroup.read(cgroup.locate(only, REL), TS)
    assert stats is not None
    assert stats.cpu is None and stats.pids is None and stats.io is None
    assert stats.memory is not None and stats.memory.usage == 40960000


def test_v1_working_set_never_negative(tmp_path: Path) -> None:
    layout = make_v1(tmp_path)
    (tmp_path / "memory" / REL.strip("/") / "memory.usage_in_bytes").write_text("4096\n")
    stats = cgroup.read(cgroup.locate(layout, REL), TS)
    assert stats is not None and stats.memory is not None
    assert stats.memory.working_set == 0


# -- cgroup v2 files ---------------------------------------------------------------------------

V2_CPU_STAT = """\
usage_usec 7654321
user_usec 5000000
system_usec 2654321
core_sched.force_idle_usec 0
nr_periods 120
nr_throttled 12
throttled_usec 345678
nr_bursts 0
burst_usec 0
"""
V2_MEMORY_STAT = """\
anon 10485760
file 20971520
kernel 2097152
kernel_stack 163840
pagetables 458752
sec_pagetables 0
percpu 9600
sock 0
vmalloc 0
shmem 0
zswap 0
zswapped 0
file_mapped 3145728
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 0
file_thp 0
shmem_thp 0
inactive_anon 0
active_anon 10485760
inactive_file 16777216
active_file 4194304
unevictable 0
slab_reclaimable 1048576
slab_unreclaimable 524288
slab 1572864
workingset_refault_anon 0
workingset_refault_file 0
pgscan 0
pgsteal 0
pgactivate 10
pgdeactivate 0
pglazyfree 0
pglazyfreed 0
thp_fault_alloc 0
thp_collapse_alloc 0
pgfault 98765
pgmajfault 21
"""
V2_MEMORY_EVENTS = "low 0\nhigh 0\nmax 6\noom 1\noom_kill 1\noom_group_kill 0\n"
V2_IO_STAT = (
    "8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n"
    "253:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n"
)
V2_PRESSURE = (
    "some avg10=1.50 avg60=0.75 avg300=0.10 total=123456\n"
    "full avg10=0.50 avg60=0.25 avg300=0.05 total=6543\n"
)


def make_v2(root: Path, rel: str = REL, *, memory_max: str = "268435456\n") -> Layout:
    write_tree(root / rel.strip("/"), {
        "cgroup.controllers": "cpuset cpu io memory hugetlb pids\n",
        "cpu.stat": V2_CPU_STAT, "cpu.max": "25000 100000\n", "cpu.weight": "39\n",
        "cpu.pressure": V2_PRESSURE,
        "memory.current": "41943040\n", "memory.max": memory_max,
        "memory.low": "0\n", "memory.peak": "52428800\n",
        "memory.stat": V2_MEMORY_STAT, "memory.events": V2_MEMORY_EVENTS,
        "memory.swap.current": "1048576\n", "memory.swap.max": "max\n",
        "memory.pressure": V2_PRESSURE,
        "pids.current": "5\n", "pids.max": "max\n",
        "io.stat": V2_IO_STAT, "io.pressure": V2_PRESSURE,
    })
    return Layout(root=root, version=2, v1_controllers={}, unified=root)


def test_v2_reader(tmp_path: Path) -> None:
    layout = make_v2(tmp_path)
    loc = cgroup.locate(layout, REL)
    assert loc.unified == tmp_path / REL.strip("/")
    stats = cgroup.read(loc, TS)
    assert stats is not None
    cpu = stats.cpu
    assert cpu is not None
    assert cpu.usage_ns == 7654321000
    assert (cpu.user_ns, cpu.system_ns) == (5000000000, 2654321000)
    assert (cpu.periods, cpu.throttled_periods, cpu.throttled_ns) == (120, 12, 345678000)
    # weight 39 is what shares 1024 becomes; the way back loses a little (cAdvisor's map).
    assert cpu.spec == CpuSpec(period_us=100000, quota_us=25000, shares=998)
    psi = Psi(some=PsiData(123456000, 1.5, 0.75, 0.1), full=PsiData(6543000, 0.5, 0.25, 0.05))
    assert cpu.psi == psi
    mem = stats.memory
    assert mem is not None
    assert mem.usage == 41943040
    assert mem.working_set == 41943040 - 16777216  # memory.current - inactive_file
    assert mem.rss == 10485760 and mem.cache == 20971520 and mem.mapped_file == 3145728
    assert (mem.page_faults, mem.major_page_faults) == (98765, 21)
    assert mem.limit == 268435456
    assert mem.available == 268435456 - (41943040 - 16777216)
    assert (mem.max_usage, mem.failcnt, mem.kernel) == (52428800, 6, 2097152)
    assert (mem.swap_usage, mem.swap_limit) == (1048576, None)
    assert mem.oom_kills == 1
    assert mem.reservation is None
    assert mem.psi == psi
    assert stats.pids == cgroup.PidsStats(current=5, limit=None)
    assert stats.io is not None and stats.io.psi == psi
    assert stats.io.devices == (
        IoDevice(8, 16, read_bytes=1459200, write_bytes=314773504, reads=192, writes=353),
        IoDevice(253, 0, read_bytes=4096, write_bytes=0, reads=1, writes=0),
    )


def test_v2_unlimited_and_missing_files(tmp_path: Path) -> None:
    layout = make_v2(tmp_path, memory_max="max\n")
    d = tmp_path / REL.strip("/")
    for name in ("cpu.pressure", "memory.pressure", "io.pressure", "memory.peak",
                 "memory.swap.current", "memory.swap.max", "cpu.max", "cpu.weight"):
        (d / name).unlink()
    stats = cgroup.read(cgroup.locate(layout, REL), TS)
    assert stats is not None and stats.memory is not None and stats.cpu is not None
    assert stats.memory.limit is None and stats.memory.available is None
    assert stats.memory.swap_usage is None and stats.memory.max_usage is None
    assert stats.cpu.psi is None and stats.cpu.spec is None
    assert stats.io is not None and stats.io.psi is None
    assert cgroup.read(cgroup.locate(layout, "/nope"), TS) is None


def test_v2_kernel_memory_on_older_kernels(tmp_path: Path) -> None:
    make_v2(tmp_path)
    stat = tmp_path / REL.strip("/") / "memory.stat"
    stat.write_text(V2_MEMORY_STAT.replace("kernel 2097152\n", ""))
    stats = cgroup.read_v2(tmp_path / REL.strip("/"), TS)
    assert stats is not None and stats.memory is not None
    assert stats.memory.kernel == 163840 + 1572864 + 0  # kernel_stack + slab + sock


# -- parsers and paths -------------------------------------------------------------------------


def test_parsers_skip_junk() -> None:
    assert cgroup.parse_flat("a 1\nbad\nb x\nc 3 4\n\nd 5") == {"a": 1, "d": 5}
    assert cgroup.parse_psi("some avg10=x\n") is None
    assert cgroup.parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n") == Psi(
        some=PsiData(7000, 0.0, 0.0, 0.0), full=None)
    assert cgroup.parse_io_stat("8:0\nbad line\n8:0 rbytes=5 wbytes=x\n") == (
        IoDevice(8, 0, read_bytes=5),)
    assert cgroup.parse_blkio("Total 0\n", "") == ()


def test_container_cgroup_paths() -> None:
    assert cgroup.container_cgroup_path("/kubepods/pod1/moorage-abc") == \
        "/kubepods/pod1/moorage-abc"
    assert cgroup.container_cgroup_path("kubepods-besteffort-pod1.slice:moorage:abc") == (
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/"
        "moorage-abc.scope")
    assert cgroup.container_cgroup_path("system.slice:moorage:abc") == \
        "/system.slice/moorage-abc.scope"
    assert cgroup.container_cgroup_path("-.slice:moorage:abc") == "/moorage-abc.scope"
    with pytest.raises(InvalidArgument):
        cgroup.container_cgroup_path("not-a-slice:moorage:abc")


def test_locate_on_hybrid_uses_v1_controllers(tmp_path: Path) -> None:
    mountinfo = (
        "30 1 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "34 30 0:30 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    )
    layout = Layout.from_mountinfo(mountinfo)
    loc = cgroup.locate(layout, "/moorage/x/")
    assert loc.version == 1 and loc.unified is None
    assert loc.v1 == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct/moorage/x"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct/moorage/x"),
        "memory": Path("/sys/fs/cgroup/memory/moorage/x"),
        "pids": Path("/sys/fs/cgroup/pids/moorage/x"),
    }
