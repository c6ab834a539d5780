"""The OCI runtime adapter without a container: error parsing, command lines, the binary
lookup, argument checks and the control-command timeout.  No root needed.

The timeout test runs a real stand-in "runtime" (a shell script that hangs and starts a
child in its process group), to see the whole group killed and reaped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from moorage.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from moorage.oci import OciRuntime, OciRuntimeError, parse_runc_error
from moorage.oci.runtime import _children, _stat_fields

# -- parse_runc_error ------------------------------------------------------------------------


def test_parse_logrus_text() -> None:
    stderr = b'time="2026-11-22T18:06:34Z" level=error msg="container does not exist"\n'
    assert parse_runc_error(stderr) == "container does not exist"


def test_parse_logrus_text_with_escapes() -> None:
    stderr = (
        b'time="2026-11-22T18:06:34Z" level=warning msg="something odd"\n'
        b'time="2026-11-22T18:06:34Z" level=error msg="exec failed: unable to start container'
        b' process: exec: \\"nosuch\\": executable file not found in $PATH"\n'
    )
    assert parse_runc_error(stderr) == (
        'exec failed: unable to start container process: exec: "nosuch": '
        "executable file not found in $PATH"
    )


def test_parse_json_lines_last_error_wins() -> None:
    stderr = (
        b'{"level":"info","msg":"starting","time":"2026-11-22T18:06:34Z"}\n'
        b'{"level":"error","msg":"first","time":"2026-11-22T18:06:34Z"}\n'
        b'{"level":"error","msg":"container not running","time":"2026-11-22T18:06:34Z"}\n'
    )
    assert parse_runc_error(stderr) == "container not running"


def test_parse_help_topic_newline() -> None:
    stderr = b'time="2026-11-22T18:06:34Z" level=error msg="No help topic for \'bogus\'\\n"\n'
    assert parse_runc_error(stderr) == "No help topic for 'bogus'"


def test_parse_plain_and_crun() -> None:
    assert parse_runc_error(b"something broke\nbadly\n") == "something broke; badly"
    assert parse_runc_error(b"crun: container `x` does not exist\n") == (
        "container `x` does not exist"
    )
    assert parse_runc_error(b"") == ""
    assert parse_runc_error(b"\xff\xfe not utf8") == "\ufffd\ufffd not utf8"


def test_parse_non_error_levels_only() -> None:
    stderr = b'{"level":"warning","msg":"just a warning"}\n'
    assert parse_runc_error(stderr) == "just a warning"


def test_parse_json_without_msg_is_plain() -> None:
    assert parse_runc_error(b'{"x": 1}\n') == '{"x": 1}'


# -- command lines and the binary -------------------------------------------------------------


def test_global_args(tmp_path: Path) -> None:
    rt = OciRuntime("runc", "/usr/sbin/runc", tmp_path / "state")
    assert rt.global_args == ["--root", str(tmp_path / "state")]
    rt = OciRuntime("runc", "runc", tmp_path, systemd_cgroup=True)
    assert rt.global_args == ["--root", str(tmp_path), "--systemd-cgroup"]


def test_argv_resolves_in_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = _script(tmp_path / "bin" / "myrt", "exit 0\n")
    monkeypatch.setenv("PATH", str(binary.parent))
    rt = OciRuntime("fast", "", tmp_path / "root")  # "" means the handler's name ...
    with pytest.raises(OciRuntimeError, match="runtime handler 'fast'.*'fast' not found in PATH"):
        rt.binary_path()
    rt = OciRuntime("fast", "myrt", tmp_path / "root")
    assert rt.argv("state", "x") == [str(binary), "--root", str(tmp_path / "root"), "state", "x"]


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    rt = OciRuntime("kata", str(tmp_path / "no-such-runtime"), tmp_path)
    with pytest.raises(OciRuntimeError) as info:
        await rt.state("abc")
    assert isinstance(info.value, FailedPrecondition)
    assert "runtime handler 'kata'" in info.value.message
    assert str(tmp_path / "no-such-runtime") in info.value.message
    assert info.value.handler == "kata"
    with pytest.raises(OciRuntimeError, match="kata"):
        await rt.exec_sync("abc", ["true"], timeout=1)


async def test_not_executable_binary(tmp_path: Path) -> None:
    path = tmp_path / "rt"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    rt = OciRuntime("plain", str(path), tmp_path)
    with pytest.raises(OciRuntimeError, match="not executable"):
        await rt.version()


async def test_bad_arguments(tmp_path: Path) -> None:
    rt = OciRuntime("runc", "/bin/true", tmp_path)
    for bad in ("", "-rf", "a/b", "a b"):
        with pytest.raises(InvalidArgument, match="container id"):
            await rt.start(bad)
    with pytest.raises(InvalidArgument, match="signal"):
        await rt.kill("abc", 0)
    with pytest.raises(InvalidArgument, match="signal"):
        await rt.kill("abc", "KILL; rm")
    with pytest.raises(InvalidArgument, match="empty"):
        await rt.exec_sync("abc", [], timeout=1)
    with pytest.raises(InvalidArgument, match="FOO"):
        await rt.exec_sync("abc", ["true"], timeout=1, env=["FOO"])


# -- a stand-in runtime: errors, timeouts --------------------------------------------------------


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


async def test_command_failure_carries_runtime_message(tmp_path: Path) -> None:
    binary = _script(
        tmp_path / "rt",
        'echo \'time="x" level=error msg="cannot start a container that has stopped"\' >&2\n'
        "exit 1\n",
    )
    rt = OciRuntime("odd", str(binary), tmp_path / "root")
    with pytest.raises(OciRuntimeError) as info:
        await rt.start("abc")
    assert info.value.message == (
        "runtime handler 'odd': `start abc` failed: cannot start a container that has stopped"
    )
    assert info.value.exit_code == 1
    assert b"level=error" in info.value.stderr


async def test_idempotent_errors_are_ignored(tmp_path: Path) -> None:
    binary = _script(
        tmp_path / "rt",
        'case "$3" in\n'
        '  kill) echo \'{"level":"error","msg":"container not running"}\' >&2 ;;\n'
        '  delete) echo \'time="x" level=error msg="container does not exist"\' >&2 ;;\n'
        '  state) echo \'time="x" level=error msg="container does not exist"\' >&2 ;;\n'
        "esac\nexit 1\n",
    )
    rt = OciRuntime("odd", str(binary), tmp_path / "root")
    await rt.kill("abc", signal.SIGTERM)
    await rt.kill("abc", "KILL", all_processes=True)
    await rt.delete("abc")
    await rt.delete("abc", force=True)
    assert await rt.state("abc") is None


async def test_features_unsupported_and_version(tmp_path: Path) -> None:
    binary = _script(
        tmp_path / "rt",
        'if [ "$1" = --version ]; then echo "oldrt version 0.9.1"; echo "spec: 1.0"; exit 0; fi\n'
        'echo "time=\\"x\\" level=error msg=\\"No help topic for \'features\'\\"" >&2\nexit 3\n',
    )
    rt = OciRuntime("old", str(binary), tmp_path / "root")
    assert await rt.features() == {}
    assert await rt.supports_mount_option("rro") is False
    assert await rt.version() == "0.9.1"


@pytest.mark.parametrize("leader", ["waits", "exits"])
async def test_control_command_timeout_kills_the_group(tmp_path: Path, leader: str) -> None:
    """A command that does not finish in time is killed with everything it started: also
    when the command itself has exited and a child it left holds its stdout open."""
    pid_file = tmp_path / "child.pid"
    end = "wait\n" if leader == "waits" else "exit 0\n"
    binary = _script(tmp_path / "rt", f"sleep 300 &\necho $! > {pid_file}\n{end}")
    rt = OciRuntime("slow", str(binary), tmp_path / "root", command_timeout=0.5)
    with pytest.raises(DeadlineExceeded, match=r"handler 'slow': `start abc` did not finish"):
        await rt.start("abc")
    child = int(pid_file.read_text())
    # The grandchild was in the runtime's process group: SIGKILLed. It dies when next
    # scheduled (then init reaps it), so wait for that with a deadline.
    deadline = time.monotonic() + 30
    while (st := _stat_fields(child)) is not None and st[0] not in ("Z", "X"):
        assert time.monotonic() < deadline, f"grandchild {child} still alive: {st}"
        await asyncio.sleep(0.02)
    assert _zombie_children() == []


def _zombie_children() -> list[int]:
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat_fields(int(name))
            if st is not None and st[1] == me and st[0] == "Z":
                found.append(int(name))
    return found


def test_children_of_this_process() -> None:
    assert _children(os.getpid()) == [] or all(
        (_stat_fields(c) or ("", -1, 0))[1] == os.getpid() for c in _children(os.getpid())
    )
    assert _children(2**22 + 7) == []
