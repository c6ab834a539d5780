"""The pod cgroup and /dev/shm on this machine for real (root).

A pod cgroup with the cgroupfs driver in every hierarchy the host has, limits read back
from the kernel, a process moved in and seen there, removal refused while it lives and
complete once it is gone; a size-limited tmpfs /dev/shm.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.errors import FailedPrecondition
from moorage.sandbox import cgroups, files
from moorage.sandbox.cgroups import Layout, PodCgroup, Resources

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


def _mounts() -> list[list[str]]:
    return [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]


@pytest.fixture
def top() -> Iterator[str]:
    """A unique top-level cgroup name; whatever is left of it is removed afterwards."""
    name = f"moorage-test-{secrets.token_hex(4)}"
    yield name
    layout = Layout.detect()
    for point in layout.hierarchies():
        base = point / name
        if not base.exists():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda w: -len(w[0])):
            procs = Path(dirpath) / "cgroup.procs"
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def test_pod_cgroup_live(top: str) -> None:
    layout = Layout.detect()
    path = cgroups.pod_cgroup_path(f"/{top}/pod1", "cgroupfs")
    cg = PodCgroup(layout, path)
    created = cg.create()
    proc: subprocess.Popen[bytes] | None = None
    try:
        expected_dirs = [p / top / "pod1" for p in layout.hierarchies()]
        assert created == [d for p in layout.hierarchies() for d in (p / top, p / top / "pod1")]
        assert all(d.is_dir() for d in expected_dirs)
        memory_limit = 64 << 20
        res = Resources(
            cpu_period=100000,
            cpu_quota=50000,
            cpu_shares=512,
            memory_limit=memory_limit,
            pids_limit=42,
        )
        cg.apply(res)
        if layout.version == 1:
            cpu = layout.v1_controllers["cpu"] / top / "pod1"
            assert (cpu / "cpu.cfs_period_us").read_text() == "100000\n"
            assert (cpu / "cpu.cfs_quota_us").read_text() == "50000\n"
            assert (cpu / "cpu.shares").read_text() == "512\n"
            mem = layout.v1_controllers["memory"] / top / "pod1"
            assert (mem / "memory.limit_in_bytes").read_text() == f"{memory_limit}\n"
            pids = layout.v1_controllers["pids"] / top / "pod1"
            assert (pids / "pids.max").read_text() == "42\n"
            if (mem / "memory.memsw.limit_in_bytes").exists():
                cg.apply(Resources(memory_limit=memory_limit, memory_swap_limit=2 * memory_limit))
                assert (mem / "memory.memsw.limit_in_bytes").read_text() == (
                    f"{2 * memory_limit}\n"
                )
            cpuset = layout.v1_controllers.get("cpuset")
            if cpuset is not None:
                assert (cpuset / top / "pod1" / "cpuset.cpus").read_text() == (
                    cpuset / "cpuset.cpus"
                ).read_text()
        else:
            d = expected_dirs[0]
            assert (d / "cpu.max").read_text() == "50000 100000\n"
            assert (d / "cpu.weight").read_text() == f"{cgroups.cpu_weight(512)}\n"
            assert (d / "memory.max").read_text() == f"{memory_limit}\n"
            assert (d / "pids.max").read_text() == "42\n"

        proc = subprocess.Popen(["sleep", "600"])
        for procs in cg.procs_files():
            procs.write_text(str(proc.pid))
        lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
        where = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}
        if layout.version == 1:
            for ctrl in layout.v1_controllers:
                key = next(k for k in where if ctrl in k.split(","))
                assert where[key] == f"/{top}/pod1", (ctrl, lines)
        if layout.unified is not None:
            assert where[""] == f"/{top}/pod1"
        for procs in cg.procs_files():
            assert str(proc.pid) in procs.read_text().split()

        # Removal kills nothing: it refuses, naming the cgroup, and leaves it all in place.
        with pytest.raises(FailedPrecondition, match=f"{top}/pod1 still holds processes"):
            cg.remove(created)
        assert proc.poll() is None
        assert all(d.is_dir() for d in expected_dirs)

        proc.kill()
        proc.wait()
        cg.remove(created)
        for point in layout.hierarchies():
            assert not (point / top).exists(), point
        cg.remove(created)  # again: nothing there is fine
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def test_existing_parent_is_kept(top: str) -> None:
    layout = Layout.detect()
    parent = PodCgroup(layout, f"/{top}")
    parent_created = parent.create()
    cg = PodCgroup(layout, f"/{top}/pod2")
    created = cg.create()
    assert created == [p / top / "pod2" for p in layout.hierarchies()]
    cg.remove(created)
    assert all((p / top).is_dir() and not (p / top / "pod2").exists() for p in layout.hierarchies())
    parent.remove(parent_created)
    assert not any((p / top).exists() for p in layout.hierarchies())


def test_mount_shm_live(tmp_path: Path) -> None:
    shm = tmp_path / "sandbox" / "shm"
    files.mount_shm(shm, 1 << 20)
    try:
        entry = next(m for m in _mounts() if m[4] == str(shm))
        sep = entry.index("-")
        fstype, source, super_opts = entry[sep + 1], entry[sep + 2], entry[sep + 3]
        assert (fstype, source) == ("tmpfs", "shm")
        assert {"nosuid", "nodev", "noexec"} <= set(entry[5].split(","))
        assert "size=1024k" in super_opts.split(",")
        assert stat.S_IMODE(shm.stat().st_mode) == 0o1777
        (shm / "small").write_bytes(b"x" * (512 << 10))
        with pytest.raises(OSError) as info, open(shm / "big", "wb") as f:
            f.write(b"x" * (1 << 20))
            f.flush()
        assert info.value.errno == errno.ENOSPC
    finally:
        files.unmount(shm)
    assert not any(m[4] == str(shm) for m in _mounts())
    assert list(shm.iterdir()) == []  # the tmpfs content went with it
    files.unmount(shm)  # not mounted any more: fine
    files.unmount(tmp_path / "missing")
