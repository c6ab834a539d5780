"""Pinned pod namespaces and the infra process for real: namespaces, bind mounts, cgroups.

Needs root. Every mount, cgroup and process a test makes is removed by its fixtures, even when
the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.errors import InvalidArgument
from moorage.sandbox.namespaces import (
    NamespaceError,
    PinnedNamespaces,
    is_pinned,
    pin,
    process_start_time,
    start_infra,
    stop_infra,
    unpin,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

CATATONIT = "/usr/bin/catatonit"
PIDS_V1 = Path("/sys/fs/cgroup/pids")
SYSCTLS = {"net.ipv4.ping_group_range": "0 2147483647", "kernel.shmmni": "8192"}


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` (octal escapes of mountinfo decoded)."""
    prefix = str(directory)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                out.append(point)
    return out


def _nsenter(kind: str, path: str, *cmd: str) -> str:
    done = subprocess.run(
        ["nsenter", f"--{kind}={path}", *cmd], capture_output=True, check=True, timeout=30
    )
    return done.stdout.decode().strip()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _exists(path: str | Path) -> bool:
    return os.path.lexists(path)


def _files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if not p.is_dir()]


def _rmdir(cgroup: Path) -> None:
    """Remove a cgroup, killing what is left in it; exiting tasks may hold it briefly."""
    for _ in range(100):
        for pid in _read(str(cgroup / "cgroup.procs")).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            cgroup.rmdir()
            return
        except OSError:
            time.sleep(0.05)
    cgroup.rmdir()


def _dead(pid: int) -> bool:
    """Exited: gone, or a zombie left to a parent that does not reap."""
    return process_start_time(pid) is None


@pytest.fixture
def ns_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "ns"
    try:
        yield d
    finally:
        for point in reversed(_mounts_under(tmp_path)):
            subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A cgroup v1 pids cgroup of its own; whatever runs in it is killed afterwards."""
    if not (PIDS_V1 / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy on this machine")
    cg = PIDS_V1 / f"moorage-test-{secrets.token_hex(4)}"
    cg.mkdir()
    try:
        yield cg
    finally:
        _rmdir(cg)


@pytest.fixture
def infra_pids() -> Iterator[list[int]]:
    """Pids of infra processes a test starts; killed afterwards if still there."""
    started: list[int] = []
    try:
        yield started
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                if not _dead(pid):
                    os.kill(pid, signal.SIGKILL)


# -- pin / unpin -----------------------------------------------------------------------------


async def test_pin_all_three_with_hostname_and_sysctls(ns_dir: Path) -> None:
    host_hostname = socket.gethostname()
    host_ping = _read("/proc/sys/net/ipv4/ping_group_range")
    host_shmmni = _read("/proc/sys/kernel/shmmni")
    assert host_shmmni != "8192"

    pinned = await pin(
        ns_dir, "sb1", net=True, ipc=True, uts=True, hostname="pod-a", sysctls=SYSCTLS
    )
    try:
        assert pinned == PinnedNamespaces(
            net=str(ns_dir / "net" / "sb1"),
            ipc=str(ns_dir / "ipc" / "sb1"),
            uts=str(ns_dir / "uts" / "sb1"),
        )
        assert pinned.net and pinned.ipc and pinned.uts
        for path in pinned.paths():
            assert is_pinned(path)
            assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
        assert sorted(_mounts_under(ns_dir)) == sorted(pinned.paths())

        assert _nsenter("uts", pinned.uts, "hostname") == "pod-a"
        assert _nsenter(
            "net", pinned.net, "cat", "/proc/sys/net/ipv4/ping_group_range"
        ).split() == ["0", "2147483647"]
        assert _nsenter("ipc", pinned.ipc, "cat", "/proc/sys/kernel/shmmni") == "8192"
        links = _nsenter("net", pinned.net, "ip", "-o", "link").splitlines()
        assert len(links) == 1 and ": lo:" in links[0]
        assert "state DOWN" in links[0]  # lo is CNI's loopback plugin's to bring up

        # Three distinct namespaces, none of them the host's.
        for kind, path in (("net", pinned.net), ("ipc", pinned.ipc), ("uts", pinned.uts)):
            assert os.stat(path).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino

        # The host is untouched.
        assert socket.gethostname() == host_hostname
        assert _read("/proc/sys/net/ipv4/ping_group_range") == host_ping
        assert _read("/proc/sys/kernel/shmmni") == host_shmmni
    finally:
        await unpin(pinned)

    assert _mounts_under(ns_dir) == []
    for path in pinned.paths():
        assert not _exists(path)
        assert not is_pinned(path)
    await unpin(pinned)  # idempotent
    await unpin(PinnedNamespaces(net=str(ns_dir / "net" / "never")))


async def test_pin_only_ipc(ns_dir: Path) -> None:
    pinned = await pin(ns_dir, "sb2", net=False, ipc=True, uts=False)
    try:
        assert pinned.net is None and pinned.uts is None
        assert pinned.ipc == str(ns_dir / "ipc" / "sb2")
        assert is_pinned(pinned.ipc)
        assert not _exists(ns_dir / "net") and not _exists(ns_dir / "uts")
    finally:
        await unpin(pinned)
    assert _mounts_under(ns_dir) == []


async def test_two_pods_pinned_at_once_get_their_own_namespaces(ns_dir: Path) -> None:
    a, b = await asyncio.gather(
        pin(ns_dir, "a", net=True, ipc=False, uts=True, hostname="pod-a"),
        pin(ns_dir, "b", net=True, ipc=False, uts=True, hostname="pod-b"),
    )
    try:
        assert a.net and b.net and a.uts and b.uts
        assert os.stat(a.net).st_ino != os.stat(b.net).st_ino
        assert _nsenter("uts", a.uts, "hostname") == "pod-a"
        assert _nsenter("uts", b.uts, "hostname") == "pod-b"
    finally:
        await unpin(a)
        await unpin(b)
    assert _mounts_under(ns_dir) == []


async def test_host_wide_sysctl_is_refused_and_nothing_pinned(ns_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="vm.swappiness"):
        await pin(ns_dir, "sb3", net=True, ipc=True, uts=True, sysctls={"vm.swappiness": "10"})
    assert _mounts_under(ns_dir) == []
    assert not _exists(ns_dir)


async def test_unknown_sysctl_is_refused_by_the_helper_and_nothing_pinned(ns_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="net.ipv4.no_such_sysctl.*does not exist"):
        await pin(
            ns_dir, "sb4", net=True, ipc=True, uts=True, sysctls={"net.ipv4.no_such_sysctl": "1"}
        )
    assert _mounts_under(ns_dir) == []
    assert _files_under(ns_dir) == []


async def test_value_the_kernel_refuses(ns_dir: Path) -> None:
    host_shmmni = _read("/proc/sys/kernel/shmmni")
    with pytest.raises(InvalidArgument, match="kernel.shmmni.*refused 'lots'"):
        await pin(ns_dir, "sb5", net=False, ipc=True, uts=False, sysctls={"kernel.shmmni": "lots"})
    assert _read("/proc/sys/kernel/shmmni") == host_shmmni
    assert _mounts_under(ns_dir) == []


async def test_failure_after_some_pins_undoes_them(ns_dir: Path) -> None:
    # net and ipc are pinned before uts; an existing uts file makes the last step fail.
    (ns_dir / "uts").mkdir(parents=True)
    squatter = ns_dir / "uts" / "sb6"
    squatter.write_text("not ours")
    with pytest.raises(NamespaceError, match="already exists"):
        await pin(ns_dir, "sb6", net=True, ipc=True, uts=True, hostname="pod")
    assert _mounts_under(ns_dir) == []
    assert _files_under(ns_dir) == [squatter]
    assert squatter.read_text() == "not ours"


async def test_cancelled_pin_leaves_nothing(ns_dir: Path) -> None:
    for delay in (0.0, 0.005, 0.02):
        task = asyncio.ensure_future(pin(ns_dir, "sb7", net=True, ipc=True, uts=True))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            pinned = await task
            await unpin(pinned)  # it finished first: the caller owns the pins
        assert _mounts_under(ns_dir) == []
        assert _files_under(ns_dir) == []


# -- the infra process -----------------------------------------------------------------------


async def test_infra_process(ns_dir: Path, pids_cgroup: Path, infra_pids: list[int]) -> None:
    pinned = await pin(ns_dir, "sb8", net=True, ipc=True, uts=True, hostname="pod-a")
    try:
        pid = await start_infra(pinned, [pids_cgroup / "cgroup.procs"], [CATATONIT, "-P"])
        infra_pids.append(pid)
        start = process_start_time(pid)
        assert start is not None

        status = dict(line.split(":", 1) for line in _read(f"/proc/{pid}/status").splitlines())
        assert status["NSpid"].split() == [str(pid), "1"]  # PID 1 of its own namespace
        assert int(status["PPid"]) != os.getpid()  # not a child of the daemon
        assert os.readlink(f"/proc/{pid}/exe") == CATATONIT
        assert _read(f"/proc/{pid}/cmdline").split("\0")[:2] == [CATATONIT, "-P"]
        assert pinned.net and pinned.ipc and pinned.uts
        for kind, path in (("net", pinned.net), ("ipc", pinned.ipc), ("uts", pinned.uts)):
            assert os.stat(f"/proc/{pid}/ns/{kind}").st_ino == os.stat(path).st_ino
        assert os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino
        assert str(pid) in _read(str(pids_cgroup / "cgroup.procs")).split()
        assert any(
            line.endswith(f":pids:/{pids_cgroup.name}")
            for line in _read(f"/proc/{pid}/cgroup").splitlines()
        )
        assert os.getsid(pid) == pid  # its own session
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        assert _read(f"/proc/{pid}/environ").split("\0")[0].startswith("PATH=")

        # A wrong start time means the pid was reused: leave that process alone.
        await stop_infra(pid, start + 1)
        assert process_start_time(pid) == start

        await stop_infra(pid, start)
        assert _dead(pid)
        await stop_infra(pid, start)  # idempotent
    finally:
        await unpin(pinned)
    assert _mounts_under(ns_dir) == []


async def test_infra_in_host_namespaces_and_two_cgroups(
    pids_cgroup: Path, infra_pids: list[int]
) -> None:
    freezer = Path("/sys/fs/cgroup/freezer")
    if not (freezer / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 freezer hierarchy")
    second = freezer / pids_cgroup.name
    second.mkdir()
    try:
        procs = [pids_cgroup / "cgroup.procs", second / "cgroup.procs"]
        pid = await start_infra(PinnedNamespaces(), procs, [CATATONIT, "-P"])
        infra_pids.append(pid)
        cgroups = _read(f"/proc/{pid}/cgroup")
        assert f"pids:/{pids_cgroup.name}" in cgroups
        assert f"freezer:/{pids_cgroup.name}" in cgroups
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
        await stop_infra(pid, process_start_time(pid))
        assert _dead(pid)
    finally:
        _rmdir(second)


async def test_infra_that_cannot_exec_leaves_nothing(pids_cgroup: Path) -> None:
    with pytest.raises(NamespaceError, match="cannot exec /nonexistent/pause"):
        await start_infra(
            PinnedNamespaces(), [pids_cgroup / "cgroup.procs"], ["/nonexistent/pause"]
        )
    assert _read(str(pids_cgroup / "cgroup.procs")) == ""


async def test_infra_with_a_bad_cgroup_leaves_nothing(tmp_path: Path, pids_cgroup: Path) -> None:
    with pytest.raises(NamespaceError, match="cannot join cgroup"):
        await start_infra(
            PinnedNamespaces(),
            [pids_cgroup / "cgroup.procs", tmp_path / "missing" / "cgroup.procs"],
            [CATATONIT, "-P"],
        )
    assert _read(str(pids_cgroup / "cgroup.procs")) == ""


async def test_infra_with_a_namespace_that_is_not_pinned(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.touch()
    with pytest.raises(NamespaceError, match="setns"):
        await start_infra(PinnedNamespaces(net=str(plain)), [], [CATATONIT, "-P"])
    with pytest.raises(NamespaceError, match="No such file"):
        await start_infra(PinnedNamespaces(net=str(tmp_path / "gone")), [], [CATATONIT, "-P"])


async def test_cancelled_start_infra_leaves_nothing_running(pids_cgroup: Path) -> None:
    for delay in (0.0, 0.01, 0.03):
        task = asyncio.ensure_future(
            start_infra(PinnedNamespaces(), [pids_cgroup / "cgroup.procs"], [CATATONIT, "-P"])
        )
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            pid = await task
            await stop_infra(pid)  # it finished first: the caller owns the process
        live = [p for p in _read(str(pids_cgroup / "cgroup.procs")).split() if not _dead(int(p))]
        assert live == []
