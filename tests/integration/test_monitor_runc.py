"""The per-container monitor with real runc containers (busybox), as the daemon drives it.

Needs root, runc and busybox-static. Each test gets its own runroot, runc root and cgroup
parent (``/moorage-test-<hex>``); the fixture deletes every container (``runc delete -f``),
stops the monitor server, waits for the monitors to exit and removes the cgroups, even when
the test fails. No assertion is about time: waits have generous deadlines only so that a
broken monitor fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from moorage.errors import FailedPrecondition
from moorage.monitor import protocol
from moorage.monitor.client import (
    Created,
    CreateRequest,
    ExitStatus,
    MonitorClient,
    MonitorError,
    open_attach,
)
from moorage.util.helper import helper_env
from tests.fixtures.procs import alive

RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
CGROUP_ROOT = Path("/sys/fs/cgroup")
LINE = re.compile(
    rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([PF]) (.*)\n\Z", re.S
)
WAIT = 30.0  # a deadline for things that take milliseconds

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists(RUNC), reason=f"{RUNC} missing (Debian runc)"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason=f"{BUSYBOX} missing"),
]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        m = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M)
    assert m
    return int(m.group(1))


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def _until(check: Any, what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def entries(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    """(stream, tag, content) of every log entry; each line must match the CRI format."""
    out = []
    for line in path.read_bytes().splitlines(keepends=True):
        m = LINE.match(line)
        assert m, f"not a CRI log line: {line!r}"
        out.append((m.group(2), m.group(3), m.group(4)))
    return out


def stream_text(path: Path, stream: bytes) -> bytes:
    """What kubelet shows of one stream: F content with its newline, P content without."""
    return b"".join(c + (b"\n" if t == b"F" else b"") for s, t, c in entries(path) if s == stream)


class Env:
    """One test's containers, monitor server and cgroups."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runroot = root / "run"
        self.runc_root = root / "runc"
        self.rootfs = root / "rootfs"
        self.cgroup_parent = f"/moorage-test-{secrets.token_hex(4)}"
        self.client = MonitorClient(self.runroot)
        self.ids: list[str] = []
        self.monitors: list[int] = []
        (self.rootfs / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, self.rootfs / "bin" / "busybox")
        for applet in ("sh", "cat", "echo", "sleep", "stty", "tail", "head", "tr", "true"):
            (self.rootfs / "bin" / applet).symlink_to("busybox")
        spec_dir = root / "spec"
        spec_dir.mkdir()
        subprocess.run([RUNC, "spec"], cwd=spec_dir, check=True)
        self.spec: dict[str, Any] = json.loads((spec_dir / "config.json").read_text())

    def bundle(
        self,
        cid: str,
        args: Sequence[str],
        *,
        tty: bool = False,
        memory_limit: int | None = None,
    ) -> Path:
        """A bundle directory (also the container's state directory) with its config.json."""
        bundle = self.root / "ctr" / cid
        bundle.mkdir(parents=True)
        config = json.loads(json.dumps(self.spec))
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        config["process"]["terminal"] = tty
        config["process"]["args"] = list(args)
        config["linux"]["cgroupsPath"] = f"{self.cgroup_parent}/{cid}"
        if memory_limit is not None:
            config["linux"].setdefault("resources", {})["memory"] = {"limit": memory_limit}
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle

    def memory_dir(self, cid: str) -> str:
        return str(CGROUP_ROOT / "memory" / self.cgroup_parent.lstrip("/") / cid)

    def request(self, cid: str, bundle: Path, **changes: Any) -> CreateRequest:
        fields: dict[str, Any] = {
            "id": cid,
            "bundle": str(bundle),
            "runtime": RUNC,
            "runtime_root": str(self.runc_root),
            "runtime_args": [],
            "state_dir": str(bundle),
            "log_path": str(self.root / "logs" / cid / "0.log"),
            "cgroup_memory_dir": self.memory_dir(cid),
        }
        fields.update(changes)
        return CreateRequest(**fields)

    async def create(
        self, cid: str, args: Sequence[str], *, tty: bool = False,
        memory_limit: int | None = None, **changes: Any,
    ) -> tuple[Created, Path, Path]:  # fmt: skip
        """Create (not start) a container: (created, state dir, log path)."""
        bundle = self.bundle(cid, args, tty=tty, memory_limit=memory_limit)
        req = self.request(cid, bundle, tty=tty, **changes)
        self.ids.append(cid)
        created = await self.client.create(req)
        self.monitors.append(created.monitor_pid)
        return created, bundle, Path(req.log_path)

    def runc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(
            [RUNC, "--root", str(self.runc_root), *args], capture_output=True, timeout=60
        )
        if check and done.returncode != 0:
            raise AssertionError(f"runc {' '.join(args)}: {done.stderr.decode()}")
        return done

    def start(self, cid: str) -> None:
        self.runc("start", cid)

    async def wait(self, created: Created, state: Path) -> ExitStatus:
        status = await asyncio.wait_for(self.client.wait_exit(created.monitor_pid, state), WAIT)
        assert status is not None
        return status

    async def cleanup(self) -> None:
        for cid in self.ids:
            self.runc("delete", "-f", cid, check=False)
        with contextlib.suppress(Exception):
            await self.client.shutdown_server()
        for pid in self.monitors:
            with contextlib.suppress(AssertionError):
                await _until(lambda pid=pid: not alive(pid), f"monitor {pid} to exit")
            if alive(pid) and "moorage.monitor" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)
        _kill_server(self.runroot)
        _remove_cgroups(self.cgroup_parent)


def _kill_server(runroot: Path) -> None:
    """A server the shutdown request did not stop (it should have)."""
    pid_file = runroot / protocol.SERVER_DIR / protocol.SERVER_PID
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        if alive(pid) and str(runroot) in _cmdline(pid):
            os.kill(pid, signal.SIGKILL)


def _remove_cgroups(parent: str) -> None:
    for _ in range(100):
        left = False
        for controller in CGROUP_ROOT.iterdir():
            top = controller / parent.lstrip("/")
            if not top.is_dir():
                continue
            for path in [*sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True), top]:
                with contextlib.suppress(OSError):
                    for pid in (path / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                try:
                    path.rmdir()
                except OSError:
                    left = True
        if not left:
            return
        time.sleep(0.05)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        await e.cleanup()


# -- exit codes and the log ------------------------------------------------------------------


async def test_output_exit_code_and_log_format(env: Env) -> None:
    created, state, log = await env.create(
        "out", ["sh", "-c", "echo out1; echo err1 >&2; echo out2; printf 'no end'; exit 3"]
    )
    assert alive(created.monitor_pid)
    assert (state / "monitor.pid").read_text() == f"{created.monitor_pid}\n"
    assert (state / "pidfile").read_text().strip() == str(created.pid)
    assert log.exists() and log.stat().st_size == 0  # made before the container ran
    assert log.stat().st_mode & 0o777 == 0o640
    env.start("out")
    status = await env.wait(created, state)
    assert status.exit_code == 3 and status.signal is None and not status.oom_killed
    assert time.time_ns() - status.exited_at < 600 * 10**9
    assert stream_text(log, b"stdout") == b"out1\nout2\nno end"
    assert stream_text(log, b"stderr") == b"err1\n"
    assert [e for e in entries(log) if e[0] == b"stdout"] == [
        (b"stdout", b"F", b"out1"),
        (b"stdout", b"F", b"out2"),
        (b"stdout", b"P", b"no end"),  # a partial line at the end is P, as in CRI-O/containerd
    ]
    assert MonitorClient.read_exit(state) == status
    # The monitor is gone, and so are its sockets.
    assert not alive(created.monitor_pid)
    assert not (state / "attach").exists() and not (state / "ctl").exists()


async def test_a_40k_line_is_split_at_log_max_line(env: Env) -> None:
    script = "head -c 40960 /dev/zero | tr '\\0' x; echo; echo short"
    created, state, log = await env.create("long", ["sh", "-c", script], log_max_line=16384)
    env.start("long")
    assert (await env.wait(created, state)).exit_code == 0
    got = [(s, t, len(c)) for s, t, c in entries(log)]
    assert got == [
        (b"stdout", b"P", 16384),
        (b"stdout", b"P", 16384),
        (b"stdout", b"F", 8192),
        (b"stdout", b"F", 5),
    ]
    assert stream_text(log, b"stdout") == b"x" * 40960 + b"\nshort\n"


async def test_no_output_still_makes_an_empty_log(env: Env) -> None:
    created, state, log = await env.create("quiet", ["true"])
    env.start("quiet")
    status = await env.wait(created, state)
    assert status.exit_code == 0 and status.signal is None
    assert log.exists() and log.read_bytes() == b""


async def test_killed_by_a_signal_is_128_plus_signal(env: Env) -> None:
    created, state, _ = await env.create("kill", ["sleep", "1000"])
    env.start("kill")
    env.runc("kill", "kill", "KILL")
    status = await env.wait(created, state)
    assert (status.exit_code, status.signal, status.oom_killed) == (137, 9, False)


async def test_a_container_killed_before_start(env: Env) -> None:
    created, state, _ = await env.create("never", ["true"])
    env.runc("delete", "-f", "never")
    status = await env.wait(created, state)
    assert status.exit_code == 137


async def test_oom_kill_is_reported(env: Env) -> None:
    created, state, _ = await env.create(
        "oom", ["tail", "/dev/zero"], memory_limit=20 * 1024 * 1024
    )
    env.start("oom")
    status = await env.wait(created, state)
    assert status.oom_killed
    assert (status.exit_code, status.signal) == (137, 9)


async def test_oom_counter_of_an_older_container_is_not_counted(env: Env) -> None:
    """A cgroup whose counter is already up (an earlier OOM) does not make a clean exit OOM."""
    first, state, _ = await env.create(
        "again", ["tail", "/dev/zero"], memory_limit=20 * 1024 * 1024
    )
    env.start("again")
    assert (await env.wait(first, state)).oom_killed
    memory_dir = env.memory_dir("again")
    before = protocol.read_oom_kills(memory_dir)
    assert before is not None and before >= 1
    # A container that exits on its own, watched through that cgroup's counter (kept: the
    # OOM-killed container is stopped, not deleted).
    second, state2, _ = await env.create("again2", ["true"], cgroup_memory_dir=memory_dir)
    env.start("again2")
    status = await env.wait(second, state2)
    assert (status.exit_code, status.oom_killed) == (0, False)
    assert protocol.read_oom_kills(memory_dir) == before


# -- tty, attach, stdin ----------------------------------------------------------------------


async def _attach(state: Path) -> Any:
    return await open_attach(state)


async def _read_frames(sock: Any, until: bytes, timeout: float = WAIT) -> list[tuple[int, bytes]]:
    loop = asyncio.get_running_loop()
    frames: list[tuple[int, bytes]] = []
    async with asyncio.timeout(timeout):
        while until not in b"".join(data for _, data in frames):
            packet = await loop.sock_recv(sock, 65536)
            if not packet:
                break
            frames.append((packet[0], packet[1:]))
    return frames


async def test_tty_output_and_resize(env: Env) -> None:
    created, state, log = await env.create(
        "tty", ["sh", "-c", "read go; stty size; echo done"], tty=True, stdin=True
    )
    env.start("tty")
    await env.client.resize(state, width=100, height=30)
    sock = await _attach(state)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"go\n")
        frames = await _read_frames(sock, b"done")
    finally:
        sock.close()
    assert {stream for stream, _ in frames} == {protocol.STREAM_STDOUT}
    status = await env.wait(created, state)
    assert status.exit_code == 0
    assert {s for s, _, _ in entries(log)} == {b"stdout"}
    text = stream_text(log, b"stdout")
    assert b"30 100\r\n" in text  # the pty turns \n into \r\n
    assert b"done" in text


async def test_resize_without_a_terminal_is_refused(env: Env) -> None:
    created, state, _ = await env.create("notty", ["sleep", "1000"])
    with pytest.raises(FailedPrecondition, match="no terminal"):
        await env.client.resize(state, 80, 24)
    env.runc("delete", "-f", "notty")
    await env.wait(created, state)


async def test_attach_gets_live_output(env: Env) -> None:
    script = (
        "i=0; while [ $i -lt 600 ]; do echo tick $i; echo tock $i >&2; i=$((i+1)); sleep 0.05; done"
    )
    created, state, _ = await env.create("att", ["sh", "-c", script])
    env.start("att")
    sock = await _attach(state)
    try:
        frames = await _read_frames(sock, b"tock")
        await _read_frames(sock, b"tick")
    finally:
        sock.close()
    streams = {stream for stream, _ in frames}
    assert protocol.STREAM_STDERR in streams
    env.runc("kill", "att", "KILL")
    assert (await env.wait(created, state)).exit_code == 137


async def test_an_attach_client_that_does_not_read_is_dropped(env: Env) -> None:
    script = "head -c 50000000 /dev/zero | tr '\\0' y; echo; echo finished"
    created, state, log = await env.create("flood", ["sh", "-c", script])
    sock = await _attach(state)  # never read
    try:
        env.start("flood")
        status = await env.wait(created, state)
    finally:
        sock.close()
    assert status.exit_code == 0
    assert stream_text(log, b"stdout").endswith(b"\nfinished\n")  # nothing lost in the log


async def test_stdin_through_attach(env: Env) -> None:
    created, state, log = await env.create("cat", ["cat"], stdin=True)
    env.start("cat")
    sock = await _attach(state)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"hello\n")
        frames = await _read_frames(sock, b"hello\n")
    finally:
        sock.close()  # not stdin_once: cat goes on
    assert (protocol.STREAM_STDOUT, b"hello\n") in frames
    await _until(lambda: b"hello\n" in stream_text(log, b"stdout"), "hello in the log")
    await asyncio.sleep(0.2)
    assert alive(created.pid)
    env.runc("kill", "cat", "KILL")
    assert (await env.wait(created, state)).exit_code == 137


async def test_stdin_once_closes_stdin_when_the_client_detaches(env: Env) -> None:
    created, state, log = await env.create(
        "once", ["sh", "-c", "cat; echo cat-done"], stdin=True, stdin_once=True
    )
    env.start("once")
    sock = await _attach(state)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"hi\n")
        await _read_frames(sock, b"hi\n")
    finally:
        sock.close()
    status = await env.wait(created, state)
    assert status.exit_code == 0
    assert stream_text(log, b"stdout") == b"hi\ncat-done\n"


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def test_a_container_that_closes_its_stdin(env: Env) -> None:
    """The monitor's end of the stdin pipe then reports an error, always: it is closed, and
    the monitor does not spin on it (a busy loop would use all of a CPU)."""
    created, state, log = await env.create(
        "close0", ["sh", "-c", "exec 0<&-; echo closed; sleep 2; echo done"], stdin=True
    )
    env.start("close0")
    await _until(lambda: b"closed" in log.read_bytes(), "stdin closed")
    await asyncio.sleep(0.2)
    before = _cpu_ticks(created.monitor_pid)
    await asyncio.sleep(0.5)
    used = _cpu_ticks(created.monitor_pid) - before
    assert used < 25, f"the monitor used {used} ticks of 50 while the container slept"
    sock = await _attach(state)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b"dropped\n")
        status = await env.wait(created, state)
    finally:
        sock.close()
    assert status.exit_code == 0
    assert stream_text(log, b"stdout") == b"closed\ndone\n"


async def test_container_without_stdin_reads_eof(env: Env) -> None:
    created, state, log = await env.create("nostdin", ["sh", "-c", "cat; echo eof"])
    env.start("nostdin")
    assert (await env.wait(created, state)).exit_code == 0
    assert stream_text(log, b"stdout") == b"eof\n"


# -- reopen ----------------------------------------------------------------------------------


async def test_reopen_log_after_rotation(env: Env) -> None:
    created, state, log = await env.create(
        "rot", ["sh", "-c", "echo one; read x; echo two"], stdin=True
    )
    env.start("rot")
    await _until(lambda: log.exists() and b"one" in log.read_bytes(), "the first line")
    rotated = log.with_name("0.log.20240101-000000")
    log.rename(rotated)
    await env.client.reopen_log(state)
    assert log.exists()
    sock = await _attach(state)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b"x\n")
    finally:
        sock.close()
    assert (await env.wait(created, state)).exit_code == 0
    assert stream_text(rotated, b"stdout") == b"one\n"
    assert stream_text(log, b"stdout") == b"two\n"
    # After the exit there is no monitor to reopen anything.
    with pytest.raises(FailedPrecondition):
        await env.client.reopen_log(state)


async def test_reopen_error_keeps_the_old_file(env: Env) -> None:
    created, state, log = await env.create("rot2", ["sh", "-c", "read x; echo late"], stdin=True)
    env.start("rot2")
    log.rename(log.with_name("old.log"))
    log.symlink_to("/etc/passwd")  # O_NOFOLLOW: refused
    with pytest.raises(FailedPrecondition, match="link"):
        await env.client.reopen_log(state)
    sock = await _attach(state)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b"x\n")
    finally:
        sock.close()
    await env.wait(created, state)
    assert stream_text(log.with_name("old.log"), b"stdout") == b"late\n"


# -- lifetime --------------------------------------------------------------------------------


def _create_in_a_child(runroot: Path, req: CreateRequest) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _CREATE_IN_A_CHILD, str(runroot), json.dumps(req.__dict__)],
        capture_output=True, env=helper_env(), timeout=60, check=True,
    )  # fmt: skip
    answer: dict[str, int] = json.loads(done.stdout)
    return answer


_CREATE_IN_A_CHILD = """
import asyncio, json, sys
from pathlib import Path
from moorage.monitor.client import CreateRequest, MonitorClient

async def main():
    req = CreateRequest(**json.loads(sys.argv[2]))
    created = await MonitorClient(Path(sys.argv[1])).create(req)
    print(json.dumps({"pid": created.pid, "monitor_pid": created.monitor_pid}))

asyncio.run(main())
"""


async def test_monitor_outlives_its_requester_and_the_server(env: Env) -> None:
    bundle = env.bundle("survivor", ["sh", "-c", "read x; exit 7"])
    req = env.request("survivor", bundle, stdin=True)
    env.ids.append("survivor")
    # Asked by another process (a daemon that then goes away).
    answer = await asyncio.to_thread(_create_in_a_child, env.runroot, req)
    created = Created(pid=answer["pid"], monitor_pid=answer["monitor_pid"])
    env.monitors.append(created.monitor_pid)
    monitor_pid = created.monitor_pid
    assert alive(monitor_pid)
    # Its parent is not the server (it double-forked): init or the nearest subreaper.
    server_pid = int((env.runroot / protocol.SERVER_DIR / protocol.SERVER_PID).read_text())
    assert _parent(monitor_pid) not in (server_pid, os.getpid())
    os.kill(server_pid, signal.SIGKILL)
    await _until(lambda: not alive(server_pid), "the server's death")
    await asyncio.sleep(0.2)
    assert alive(monitor_pid)
    env.start("survivor")
    # A new daemon: a new client, which starts a new server, and waits through a pidfd.
    fresh = MonitorClient(env.runroot)
    await fresh.ensure_server()
    assert fresh.server_pid != server_pid
    sock = await open_attach(Path(req.state_dir))
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b"x\n")
    finally:
        sock.close()
    status = await asyncio.wait_for(fresh.wait_exit(monitor_pid, Path(req.state_dir)), WAIT)
    assert status is not None and status.exit_code == 7
    await fresh.shutdown_server()


async def test_wait_exit_after_a_daemon_restart(env: Env) -> None:
    created, state, _ = await env.create("restart", ["sleep", "1000"])
    env.start("restart")
    server_pid = env.client.server_pid
    again = MonitorClient(env.runroot)  # the restarted daemon's client
    await again.ensure_server()
    assert again.server_pid == server_pid  # it found the live server
    waiter = asyncio.ensure_future(again.wait_exit(created.monitor_pid, state))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    env.runc("kill", "restart", "KILL")  # (PID 1 of its namespace: TERM would be ignored)
    status = await asyncio.wait_for(waiter, WAIT)
    assert status is not None and (status.exit_code, status.signal) == (137, 9)


async def test_runtime_create_failure(env: Env) -> None:
    bundle = env.bundle("bad", ["/no/such/program"])
    req = env.request("bad", bundle)
    env.ids.append("bad")
    with pytest.raises(MonitorError) as err:
        await env.client.create(req)
    message = str(err.value)
    assert "/no/such/program" in message and "no such file or directory" in message
    # Nothing is left: no runc container, no monitor, no empty log file, no sockets.
    assert "bad" not in env.runc("list", "-q").stdout.decode().split()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                assert os.readlink(f"/proc/{entry}/cwd") != str(bundle)
    assert not _exists(Path(req.log_path))
    assert not _exists(bundle / "attach") and not _exists(bundle / "monitor.pid")


async def test_ten_monitors(env: Env) -> None:
    """Ten monitors at once, each on its own; memory is printed (see bench/ for numbers)."""
    made = [
        await env.create(f"m{i}", ["sh", "-c", "while true; do echo $$; sleep 0.1; done"])
        for i in range(10)
    ]
    for i in range(10):
        env.start(f"m{i}")
    await asyncio.sleep(1)
    pss = []
    for created, _, log in made:
        assert alive(created.monitor_pid)
        pss.append(_pss_kib(created.monitor_pid))
        assert entries(log)
    print(f"monitor PSS KiB: min {min(pss)} median {sorted(pss)[5]} max {max(pss)}")
    # Far above the measured ~1 MiB, far below a fresh interpreter's ~6 MiB: a gross check
    # that monitors share the server's pages.
    assert sorted(pss)[5] < 4096
    assert len({c.monitor_pid for c, _, _ in made}) == 10
    for i in range(10):
        env.runc("kill", f"m{i}", "KILL")
    for created, state, _ in made:
        assert (await env.wait(created, state)).exit_code == 137
