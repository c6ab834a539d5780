"""The monitor server and the daemon's client, without root and without a container runtime.

These start the real server (``python -m moorage.monitor server``) in ``tmp_path``; the
"runtime" of a create request is a small script that fails, so every path up to the
runtime and back is exercised. Containers are the integration tests' business
(``tests/integration/test_monitor_runc.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moorage.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from moorage.monitor import create, protocol
from moorage.monitor.client import (
    CreateRequest,
    ExitStatus,
    MonitorClient,
    MonitorError,
    MonitorFailure,
)
from tests.fixtures.procs import alive


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (a monitor's is its state dir)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/cwd") == str(directory):
                    out.append(int(entry))
    return out


async def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[MonitorClient]:
    c = MonitorClient(tmp_path / "run")
    try:
        yield c
    finally:
        await c.shutdown_server()
        pid_file = tmp_path / "run" / protocol.SERVER_DIR / protocol.SERVER_PID
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if not await _gone(pid, 5):
                os.kill(pid, signal.SIGKILL)


def _runtime(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-runtime"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _request(tmp_path: Path, runtime: str, **changes: object) -> CreateRequest:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    fields: dict[str, object] = {
        "id": "c1",
        "bundle": str(state),
        "runtime": runtime,
        "runtime_root": str(tmp_path / "rt"),
        "runtime_args": [],
        "state_dir": str(state),
        "log_path": str(tmp_path / "logs" / "c1" / "0.log"),
    }
    fields.update(changes)
    return CreateRequest(**fields)  # type: ignore[arg-type]


async def test_ensure_server_starts_one_and_finds_it_again(
    client: MonitorClient, tmp_path: Path
) -> None:
    await client.ensure_server()
    pid = client.server_pid
    assert pid is not None and alive(pid)
    await client.ensure_server()
    assert client.server_pid == pid
    # A restarted daemon (a new client) finds the same server.
    again = MonitorClient(tmp_path / "run")
    await again.ensure_server()
    assert again.server_pid == pid
    # Its parent is init, not this process: it outlives the daemon.
    assert _parent(pid) != os.getpid()


async def test_concurrent_ensure_server_starts_a_single_server(tmp_path: Path) -> None:
    clients = [MonitorClient(tmp_path / "run") for _ in range(4)]
    try:
        await asyncio.gather(*(c.ensure_server() for c in clients))
        assert len({c.server_pid for c in clients}) == 1
    finally:
        await clients[0].shutdown_server()


async def test_a_server_of_other_code_is_replaced(client: MonitorClient) -> None:
    await client.ensure_server()
    old = client.server_pid
    assert old is not None
    client._digest = "0-other-code"  # as if moorage had been upgraded since it started
    with contextlib.suppress(MonitorFailure):
        await client.ensure_server()  # the new server reports the real digest: no match
    assert await _gone(old)
    client._digest = None
    await client.ensure_server()
    assert client.server_pid not in (None, old)


async def test_shutdown_removes_the_socket(client: MonitorClient, tmp_path: Path) -> None:
    await client.ensure_server()
    pid = client.server_pid
    assert pid is not None
    await client.shutdown_server()
    assert await _gone(pid)
    assert not (tmp_path / "run" / protocol.SERVER_DIR / protocol.SERVER_SOCKET).exists()
    await client.shutdown_server()  # none running: fine


async def test_runtime_failure_reports_its_stderr_and_leaves_nothing(
    client: MonitorClient, tmp_path: Path
) -> None:
    runtime = _runtime(tmp_path, 'echo "boom: $*" >&2; exit 2')
    req = _request(tmp_path, runtime)
    with pytest.raises(MonitorError) as err:
        await client.create(req)
    message = str(err.value)
    assert "boom: --root" in message and "create --bundle" in message
    state = Path(req.state_dir)
    for name in ("attach", "ctl", "console.sock", "monitor.pid", "exit"):
        assert not _exists(state / name), name
    assert not _exists(Path(req.log_path))  # it was made for this attempt, and is empty
    assert _exists(Path(req.log_path).parent)
    for _ in range(100):
        if not _processes_in(state):
            break
        await asyncio.sleep(0.02)
    assert _processes_in(state) == []


async def test_runtime_failure_without_output(client: MonitorClient, tmp_path: Path) -> None:
    with pytest.raises(MonitorError, match=r"exit status 1"):
        await client.create(_request(tmp_path, "/bin/false"))


async def test_tty_runtime_that_sends_no_console(client: MonitorClient, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, 'echo "$$" > pidfile; exit 0')
    with pytest.raises(MonitorError, match="did not send the console"):
        await client.create(_request(tmp_path, runtime, tty=True))


async def test_bad_requests(client: MonitorClient, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="state_dir"):
        await client.create(_request(tmp_path, "/bin/false", state_dir="relative"))
    with pytest.raises(InvalidArgument, match="stdin_once"):
        await client.create(_request(tmp_path, "/bin/false", stdin_once=True))
    with pytest.raises(MonitorFailure, match="No such file or directory"):
        await client.create(_request(tmp_path, "/bin/false", state_dir=str(tmp_path / "none")))


async def test_create_timeout_kills_the_runtime(client: MonitorClient, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, "exec sleep 30")
    with pytest.raises(DeadlineExceeded, match="did not finish in 0.3s"):
        await client.create(_request(tmp_path, runtime, timeout=0.3))


async def test_cancelled_create_kills_the_runtime(client: MonitorClient, tmp_path: Path) -> None:
    """A runtime that does not finish within the grace period after its requester left."""
    marker = tmp_path / "runtime.pid"
    runtime = _runtime(tmp_path, f'[ "$3" = create ] || exit 0; echo $$ > {marker}; '
                       "exec sleep 30")
    task = asyncio.ensure_future(client.create(_request(tmp_path, runtime)))
    for _ in range(500):
        if marker.exists() and marker.read_text().strip():
            break
        await asyncio.sleep(0.01)
    runtime_pid = int(marker.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _gone(runtime_pid, timeout=create.ABANDONED_GRACE + 10)


async def test_cancelled_create_finishes_then_deletes(client: MonitorClient,
                                                      tmp_path: Path) -> None:
    """A runtime killed halfway could leave what it made with no state to delete it by:
    it is let finish, then ``delete --force`` undoes the container."""
    calls = tmp_path / "calls"
    runtime = _runtime(tmp_path, f'echo "$*" >> {calls}; [ "$3" = create ] || exit 0; '
                       "sleep 0.5; echo $$ > pidfile")
    task = asyncio.ensure_future(client.create(_request(tmp_path, runtime)))
    for _ in range(500):
        if calls.exists():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 10
    while "delete" not in (calls.read_text() if calls.exists() else ""):
        assert time.monotonic() < deadline, "no delete after the create"
        await asyncio.sleep(0.02)
    lines = calls.read_text().splitlines()
    assert [line.split()[2] for line in lines] == ["create", "delete"]
    assert lines[1].endswith(f"delete --force {_request(tmp_path, runtime).id}")


async def test_the_server_restarts_when_it_is_gone(client: MonitorClient, tmp_path: Path) -> None:
    await client.ensure_server()
    old = client.server_pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert await _gone(old)
    # The socket file is left behind by a killed server: create starts a new server.
    with pytest.raises(MonitorError):
        await client.create(_request(tmp_path, "/bin/false"))
    assert client.server_pid not in (None, old)


def test_read_exit(tmp_path: Path) -> None:
    assert MonitorClient.read_exit(tmp_path) is None
    (tmp_path / "exit").write_bytes(protocol.encode_exit(137, 42, True, 9))
    assert MonitorClient.read_exit(tmp_path) == ExitStatus(137, 42, True, 9)
    (tmp_path / "exit").write_bytes(b'{"exit_code": 1')
    assert MonitorClient.read_exit(tmp_path) is None


async def test_wait_exit_of_a_gone_or_foreign_pid(tmp_path: Path) -> None:
    client = MonitorClient(tmp_path / "run")
    # No such process: straight to the exit file.
    (tmp_path / "exit").write_bytes(protocol.encode_exit(0, 1, False, None))
    assert await client.wait_exit(2**22 + 12345, tmp_path) == ExitStatus(0, 1, False, None)
    # A live process that is not the monitor of this state dir (a reused pid): not waited for.
    (tmp_path / "exit").unlink()
    assert await asyncio.wait_for(client.wait_exit(os.getpid(), tmp_path), 5) is None


async def test_ctl_without_a_monitor(tmp_path: Path) -> None:
    client = MonitorClient(tmp_path / "run")
    with pytest.raises(FailedPrecondition, match="not running"):
        await client.reopen_log(tmp_path)
    with pytest.raises(FailedPrecondition, match="not running"):
        await client.resize(tmp_path, 80, 24)
    with pytest.raises(InvalidArgument):
        await client.resize(tmp_path, 0, 24)


def test_create_request_wire_format(tmp_path: Path) -> None:
    req = _request(tmp_path, "/usr/sbin/runc", runtime_args=["--debug"], tty=True)
    line = req.to_wire()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    doc = protocol.loads(line.decode())
    assert protocol.request_problem(doc) is None
    assert doc["runtime_args"] == ["--debug"] and doc["tty"] is True
