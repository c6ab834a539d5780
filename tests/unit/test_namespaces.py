"""Sysctl rules, helper arguments and answers, process start times and stopping: no root needed.

The helper is run for real where it refuses a request before it changes anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.errors import Internal, InvalidArgument
from moorage.sandbox import namespaces
from moorage.sandbox.namespaces import (
    NamespaceError,
    PinnedNamespaces,
    infra_argv,
    is_pinned,
    pin,
    pin_argv,
    process_start_time,
    start_infra,
    stop_infra,
    validate_sysctls,
)
from moorage.sandbox.pinns import sysctl_namespace, sysctl_problem
from moorage.sandbox.pinns.__main__ import (
    EXIT_REFUSED,
    Refused,
    _parse_infra_args,
    _parse_pin_args,
    _pin_sysctls,
)

SRC = str(Path(namespaces.__file__).resolve().parents[2])

# -- sysctl rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "ns"),
    [
        ("net.ipv4.ping_group_range", "net"),
        ("net.core.somaxconn", "net"),
        ("net.ipv4.conf.all.rp_filter", "net"),
        ("kernel.shmmni", "ipc"),
        ("kernel.shm_rmid_forced", "ipc"),
        ("kernel.msgmax", "ipc"),
        ("kernel.sem", "ipc"),
        ("fs.mqueue.msg_max", "ipc"),
        ("kernel.semaphore", None),
        ("kernel.hostname", None),
        ("kernel.domainname", None),
        ("vm.swappiness", None),
        ("fs.mqueue", None),
        ("network.x", None),
        ("net", None),
        ("kernel.pid_max", None),
    ],
)
def test_sysctl_namespace(key: str, ns: str | None) -> None:
    assert sysctl_namespace(key) == ns


@pytest.mark.parametrize(
    "key",
    ["", "net/ipv4/ip_forward", "net..ipv4", "net.ipv4.", ".net.ipv4", "net.a=b", "net.a\0b"],
)
def test_malformed_sysctl_names(key: str) -> None:
    assert sysctl_problem(key, "1") is not None
    with pytest.raises(InvalidArgument, match="sysctl"):
        validate_sysctls({key: "1"}, host_network=False, host_ipc=False)


def test_sysctl_value_with_newline_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="net.ipv4.ip_forward"):
        validate_sysctls({"net.ipv4.ip_forward": "1\n0"}, host_network=False, host_ipc=False)


def test_validate_sysctls_accepts_namespaced_ones() -> None:
    validate_sysctls(
        {
            "net.ipv4.ping_group_range": "0 2147483647",
            "kernel.shmmni": "8192",
            "kernel.sem": "250 32000 32 128",
            "fs.mqueue.queues_max": "300",
        },
        host_network=False,
        host_ipc=False,
    )
    validate_sysctls({}, host_network=True, host_ipc=True)


@pytest.mark.parametrize("key", ["vm.swappiness", "kernel.hostname", "kernel.pid_max"])
def test_validate_sysctls_refuses_host_wide_ones(key: str) -> None:
    with pytest.raises(InvalidArgument, match=f"{key}.*not namespaced"):
        validate_sysctls({key: "1"}, host_network=False, host_ipc=False)


def test_validate_sysctls_refuses_net_with_host_network() -> None:
    validate_sysctls({"kernel.shmmni": "8192"}, host_network=True, host_ipc=False)
    with pytest.raises(InvalidArgument, match="net.core.somaxconn.*host network"):
        validate_sysctls({"net.core.somaxconn": "1024"}, host_network=True, host_ipc=False)


@pytest.mark.parametrize("key", ["kernel.shmmni", "kernel.msgmax", "kernel.sem", "fs.mqueue.x"])
def test_validate_sysctls_refuses_ipc_with_host_ipc(key: str) -> None:
    validate_sysctls({"net.core.somaxconn": "1024"}, host_network=False, host_ipc=True)
    with pytest.raises(InvalidArgument, match=f"{key}.*host IPC"):
        validate_sysctls({key: "1"}, host_network=False, host_ipc=True)


def test_validation_errors_are_invalid_argument_and_namespace_errors_internal() -> None:
    assert issubclass(NamespaceError, Internal)
    assert InvalidArgument.code == "INVALID_ARGUMENT"


# -- helper arguments ------------------------------------------------------------------------


def test_pin_argv() -> None:
    argv = pin_argv(
        Path("/run/x/ns"),
        "abc",
        net=True,
        ipc=False,
        uts=True,
        hostname="pod-a",
        sysctls={"net.ipv4.ping_group_range": "0 2147483647"},
    )
    assert argv == [
        "--dir",
        "/run/x/ns",
        "--id",
        "abc",
        "--net",
        "--uts",
        "--hostname",
        "pod-a",
        "--sysctl",
        "net.ipv4.ping_group_range=0 2147483647",
    ]
    args = _parse_pin_args(argv)
    assert (args.dir, args.id, args.net, args.ipc, args.uts) == ("/run/x/ns", "abc", 1, 0, 1)
    assert args.hostname == "pod-a"
    assert _pin_sysctls(args) == [("net.ipv4.ping_group_range", "0 2147483647")]


def test_pin_argv_minimal() -> None:
    argv = pin_argv(Path("/ns"), "i", net=False, ipc=True, uts=False)
    assert argv == ["--dir", "/ns", "--id", "i", "--ipc"]


@pytest.mark.parametrize(
    ("flags", "sysctl", "match"),
    [
        (["--net"], "kernel.shmmni=1", "needs a new ipc namespace"),
        (["--ipc"], "net.core.somaxconn=1", "needs a new net namespace"),
        (["--net", "--ipc", "--uts"], "vm.swappiness=1", "vm.swappiness.*not namespaced"),
        (["--uts"], "kernel.hostname=x", "kernel.hostname.*not namespaced"),
        (["--net"], "net.core.somaxconn", "not KEY=VALUE"),
        (["--net"], "net/core/somaxconn=1", "dot-separated"),
        (["--net"], "net..x=1", "empty component"),
    ],
)
def test_helper_rechecks_sysctls(flags: list[str], sysctl: str, match: str) -> None:
    args = _parse_pin_args(["--dir", "/d", "--id", "i", *flags, "--sysctl", sysctl])
    with pytest.raises(Refused, match=match):
        _pin_sysctls(args)


def test_infra_argv_round_trip() -> None:
    pinned = PinnedNamespaces(net="/ns/net/a", ipc=None, uts="/ns/uts/a")
    argv = infra_argv(
        pinned,
        [Path("/cg/pids/pod/cgroup.procs"), Path("/cg/memory/pod/cgroup.procs")],
        ["/usr/bin/catatonit", "-P"],
    )
    assert argv == [
        "infra",
        "--net-ns",
        "/ns/net/a",
        "--uts-ns",
        "/ns/uts/a",
        "--cgroup-procs",
        "/cg/pids/pod/cgroup.procs",
        "--cgroup-procs",
        "/cg/memory/pod/cgroup.procs",
        "--",
        "/usr/bin/catatonit",
        "-P",
    ]
    args, command = _parse_infra_args(argv[1:])
    assert (args.net_ns, args.ipc_ns, args.uts_ns) == ("/ns/net/a", None, "/ns/uts/a")
    assert args.cgroup_procs == ["/cg/pids/pod/cgroup.procs", "/cg/memory/pod/cgroup.procs"]
    assert command == ["/usr/bin/catatonit", "-P"]


def test_infra_args_without_command() -> None:
    with pytest.raises(Refused, match="no command"):
        _parse_infra_args(["--net-ns", "/x"])


def test_pinned_paths() -> None:
    assert PinnedNamespaces().paths() == []
    assert PinnedNamespaces(net="/a", uts="/c").paths() == ["/a", "/c"]


# -- the daemon refuses before the helper runs -----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sandbox_id": "a/b"}, "not a plain file name"),
        ({"sandbox_id": ".."}, "not a plain file name"),
        ({"hostname": "x" * 65}, "longer than 64"),
        ({"hostname": "pod", "uts": False}, "needs a new UTS"),
        ({"sysctls": {"vm.swappiness": "1"}}, "vm.swappiness"),
        ({"sysctls": {"net.core.somaxconn": "1"}, "net": False}, "net.core.somaxconn"),
        ({"sysctls": {"kernel.shmmni": "1"}, "ipc": False}, "kernel.shmmni"),
        ({"ns_dir": Path("relative/ns")}, "not an absolute path"),
    ],
)
async def test_pin_refuses_bad_requests(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    call: dict[str, object] = {
        "ns_dir": tmp_path / "ns",
        "sandbox_id": "abc",
        "net": True,
        "ipc": True,
        "uts": True,
    }
    call.update(kwargs)
    with pytest.raises(InvalidArgument, match=match):
        await pin(**call)  # type: ignore[arg-type]
    assert not (tmp_path / "ns").exists()


async def test_pin_nothing_runs_no_helper(tmp_path: Path) -> None:
    got = await pin(tmp_path / "ns", "abc", net=False, ipc=False, uts=False)
    assert got == PinnedNamespaces()
    assert not (tmp_path / "ns").exists()


async def test_start_infra_refuses_relative_command() -> None:
    with pytest.raises(InvalidArgument, match="absolute path"):
        await start_infra(PinnedNamespaces(), [], ["catatonit", "-P"])
    with pytest.raises(InvalidArgument, match="absolute path"):
        await start_infra(PinnedNamespaces(), [], [])


# -- the helper program refuses, as a program ------------------------------------------------


def _helper(*args: str) -> tuple[int, dict[str, object]]:
    env = dict(os.environ, PYTHONPATH=SRC)
    done = subprocess.run(
        [sys.executable, "-P", "-S", "-m", "moorage.sandbox.pinns", *args],
        capture_output=True,
        env=env,
        cwd="/",
        timeout=30,
        check=False,
    )
    lines = done.stdout.decode().strip().splitlines()
    assert len(lines) == 1, (done.stdout, done.stderr)
    answer = json.loads(lines[0])
    assert isinstance(answer, dict)
    return done.returncode, answer


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--net", "--sysctl", "vm.swappiness=10"], "vm.swappiness"),
        (["--uts", "--sysctl", "kernel.hostname=x"], "kernel.hostname"),
        (["--ipc", "--hostname", "pod"], "--uts"),
        ([], "no namespace"),
        (["--uts", "--hostname", "h" * 65], "longer than 64"),
    ],
)
def test_helper_program_refuses(tmp_path: Path, args: list[str], match: str) -> None:
    code, answer = _helper("--dir", str(tmp_path / "ns"), "--id", "abc", *args)
    assert code == EXIT_REFUSED
    assert match in str(answer["error"])
    assert not (tmp_path / "ns").exists()


def test_helper_program_refuses_infra_without_absolute_command() -> None:
    code, answer = _helper("infra", "--", "catatonit", "-P")
    assert code == EXIT_REFUSED
    assert "absolute path" in str(answer["error"])


# -- process start time, is_pinned, stop_infra on ordinary processes -------------------------


def test_process_start_time() -> None:
    mine = process_start_time(os.getpid())
    assert isinstance(mine, int) and mine > 0
    assert process_start_time(os.getpid()) == mine
    assert process_start_time(2**22 + 7) is None  # above pid_max's ceiling


def test_process_start_time_of_a_zombie_is_none() -> None:
    child = subprocess.Popen(["true"])
    try:
        for _ in range(500):
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if b") Z " in f.read():
                    break
            time.sleep(0.01)
        assert process_start_time(child.pid) is None
    finally:
        child.wait()


def test_process_start_time_with_parentheses_in_the_name(tmp_path: Path) -> None:
    odd = tmp_path / "a) b (c"
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "60"])
    try:
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            assert b"(a) b (c)" in f.read()
        start = process_start_time(child.pid)
        assert start is not None and start >= (process_start_time(os.getpid()) or 0)
    finally:
        child.kill()
        child.wait()


def test_is_pinned_is_false_for_ordinary_paths(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.touch()
    assert not is_pinned(str(plain))
    assert not is_pinned(str(tmp_path / "missing"))
    assert not is_pinned(str(tmp_path))
    # /proc/<pid>/ns/* are symlinks into nsfs, not pins.
    assert not is_pinned("/proc/self/ns/net")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


async def test_stop_infra_kills_and_waits(sleeper: subprocess.Popen[bytes]) -> None:
    start = process_start_time(sleeper.pid)
    assert start is not None
    await stop_infra(sleeper.pid, start)
    assert process_start_time(sleeper.pid) is None  # exited (a zombie until we reap it)
    assert sleeper.wait(timeout=5) == -9
    await stop_infra(sleeper.pid, start)  # gone: fine


async def test_stop_infra_leaves_a_reused_pid_alone(sleeper: subprocess.Popen[bytes]) -> None:
    start = process_start_time(sleeper.pid)
    assert start is not None
    await stop_infra(sleeper.pid, start + 1)
    assert sleeper.poll() is None
    assert process_start_time(sleeper.pid) == start


async def test_stop_infra_without_start_time(sleeper: subprocess.Popen[bytes]) -> None:
    await stop_infra(sleeper.pid)
    assert sleeper.wait(timeout=5) == -9


async def test_stop_infra_of_a_missing_pid() -> None:
    await stop_infra(2**22 + 7)
    await stop_infra(2**22 + 7, 12345)
