"""The daemon's side of the monitor: start or find the monitor server, create containers
through it, await exits, and talk to a running monitor (reopen the log, resize the tty).

The daemon never forks itself: the monitor server is a separate program
(``python -P -S -m moorage.monitor server``), started with fork+exec and found again by a
restarted daemon through ``<runroot>/monitor/server.sock``. Each container's monitor is
forked by that server and lives on its own: the daemon knows it by its pid and its state
directory (its exit file, its ``ctl`` and ``attach`` sockets). See ``docs/monitor.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorage.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument
from moorage.monitor import protocol
from moorage.util.helper import helper_env

HELPER_MODULE = "moorage.monitor"
#: How long a ping (or shutdown) of the server may take.
PING_TIMEOUT = 5.0
#: How long the exec'd server may take to say it listens.
START_TIMEOUT = 30.0
#: How long a ctl request (reopen, resize) may take.
CTL_TIMEOUT = 10.0


class MonitorError(FailedPrecondition):
    """``runtime create`` failed; the message holds the runtime's own error output."""


class MonitorFailure(Internal):
    """The monitor machinery failed: the server cannot start, a monitor died unanswered."""


@dataclass(frozen=True)
class CreateRequest:
    """What a monitor needs to create and watch one container (see ``docs/monitor.md``)."""

    id: str
    bundle: str
    runtime: str
    runtime_root: str
    runtime_args: Sequence[str]  # global options, before ``create``
    state_dir: str
    log_path: str
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False
    log_max_line: int = 16384
    cgroup_memory_dir: str = ""
    #: Seconds ``runtime create`` may take before the monitor kills it.
    timeout: float = protocol.DEFAULT_CREATE_TIMEOUT

    def to_wire(self) -> bytes:
        """The request line the monitor server reads."""
        doc = {
            "id": self.id,
            "bundle": self.bundle,
            "runtime": self.runtime,
            "runtime_root": self.runtime_root,
            "runtime_args": list(self.runtime_args),
            "state_dir": self.state_dir,
            "log_path": self.log_path,
            "tty": self.tty,
            "stdin": self.stdin,
            "stdin_once": self.stdin_once,
            "log_max_line": self.log_max_line,
            "cgroup_memory_dir": self.cgroup_memory_dir,
            "timeout": self.timeout,
        }
        return json.dumps(doc).encode() + b"\n"


@dataclass(frozen=True)
class Created:
    pid: int  # the container's init process (host pid)
    monitor_pid: int


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int  # 128+signal for a signal death
    exited_at: int  # ns since the epoch
    oom_killed: bool
    signal: int | None


class MonitorClient:
    """The daemon's handle on the monitor server under ``runroot`` (one per daemon)."""

    def __init__(self, runroot: Path) -> None:
        self.runroot = Path(runroot)
        self.dir = self.runroot / protocol.SERVER_DIR
        self.socket_path = self.dir / protocol.SERVER_SOCKET
        #: The server's pid, once known.
        self.server_pid: int | None = None
        self._digest: str | None = None
        self._lock = asyncio.Lock()

    # -- the server ----------------------------------------------------------------------

    def digest(self) -> str:
        """The digest of the monitor code this daemon would start (read once)."""
        if self._digest is None:
            self._digest = protocol.code_digest()
        return self._digest

    async def ensure_server(self) -> None:
        """Connect to a live server running this moorage's monitor code, or start one.

        A server running other code (moorage was upgraded) is told to exit first; its
        monitors go on. Concurrent callers, in this daemon or another, start one server:
        ``server.lock`` is held (``flock``) while a server is started.
        """
        async with self._lock:
            answer = await self._ping()
            if self._is_current(answer):
                return
            await asyncio.to_thread(os.makedirs, self.dir, 0o700, exist_ok=True)
            lock = os.open(self.dir / protocol.SERVER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
            try:
                await _flock(lock)
                answer = await self._ping()  # someone else may have started it meanwhile
                if self._is_current(answer):
                    return
                if answer is not None:
                    await self._request(b"shutdown\n", PING_TIMEOUT)
                else:
                    self._kill_hung_server()
                await self._start_server()
            finally:
                os.close(lock)  # releases the flock

    async def shutdown_server(self) -> None:
        """Stop the monitor server, if one runs (``moorage wipe``, tests); monitors go on."""
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            await self._request(b"shutdown\n", PING_TIMEOUT)
        self.server_pid = None

    def _is_current(self, answer: dict[str, Any] | None) -> bool:
        if answer is None or answer.get("digest") != self.digest():
            return False
        pid = answer.get("pid")
        self.server_pid = pid if isinstance(pid, int) else None
        return True

    async def _ping(self) -> dict[str, Any] | None:
        try:
            return await self._request(b"ping\n", PING_TIMEOUT)
        except (OSError, TimeoutError, ValueError):
            return None

    def _kill_hung_server(self) -> None:
        """A server that does not answer (but whose pid file names a live process of it)."""
        try:
            pid = int((self.dir / protocol.SERVER_PID).read_text())
            if os.readlink(f"/proc/{pid}/cwd") == str(self.dir.resolve()):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    async def _start_server(self) -> None:
        argv = [sys.executable, "-P", "-S", "-m", HELPER_MODULE, "server", "--runroot"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                str(self.runroot),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd="/",
                env=helper_env(),
            )
        except OSError as e:
            raise MonitorFailure(f"cannot start the monitor server: {e.strerror}") from None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                stdout, stderr = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise MonitorFailure(
                f"the monitor server did not start in {START_TIMEOUT:g}s"
            ) from None
        answer = _first_json_line(stdout)
        if answer is None or not isinstance(answer.get("pid"), int):
            detail = answer.get("error") if answer else stderr.decode("utf-8", "replace")[-2000:]
            raise MonitorFailure(
                f"the monitor server did not start (exit status {proc.returncode}): "
                f"{str(detail).strip() or 'no output'}"
            )
        self.server_pid = answer["pid"]

    async def _request(self, line: bytes, timeout: float | None) -> dict[str, Any] | None:
        """One line to the server, one JSON line back (``None`` if it closed without one)."""
        sock = await _connect(str(self.socket_path), socket.SOCK_STREAM)
        try:
            async with asyncio.timeout(timeout):
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(sock, line)
                return await _read_line(sock)
        finally:
            sock.close()

    # -- containers ----------------------------------------------------------------------

    async def create(self, req: CreateRequest) -> Created:
        """Have a new monitor run ``runtime create``; returns once the container is created.

        Raises :class:`MonitorError` (with the runtime's words) if the runtime failed; then
        nothing of the attempt is left running. If the caller is cancelled, the connection
        closes and the monitor kills ``runtime create`` and whatever it started, and exits
        (the runtime's own state, if any, is the caller's to delete).
        """
        try:
            reply = await self._request(req.to_wire(), None)
        except (FileNotFoundError, ConnectionRefusedError):
            await self.ensure_server()  # the server is gone: start a new one, once
            try:
                reply = await self._request(req.to_wire(), None)
            except OSError as e:
                raise MonitorFailure(f"cannot reach the monitor server: {e}") from None
        except OSError as e:
            raise MonitorFailure(f"cannot reach the monitor server: {e}") from None
        except ValueError as e:
            raise MonitorFailure(f"the monitor answered garbage: {e}") from None
        if reply is None:
            raise MonitorFailure(
                f"the monitor of container {req.id} exited without answering "
                f"(see {self.dir / protocol.SERVER_LOG})"
            )
        error = reply.get("error")
        if error is not None:
            kind = reply.get("kind")
            if kind == protocol.KIND_RUNTIME:
                raise MonitorError(f"{req.runtime} create of container {req.id} failed: {error}")
            if kind == protocol.KIND_TIMEOUT:
                raise DeadlineExceeded(f"create of container {req.id}: {error}")
            if kind == protocol.KIND_INVALID:
                raise InvalidArgument(f"monitor request for container {req.id}: {error}")
            raise MonitorFailure(f"container {req.id}: {error}")
        pid, monitor_pid = reply.get("pid"), reply.get("monitor_pid")
        if not isinstance(pid, int) or not isinstance(monitor_pid, int):
            raise MonitorFailure(f"the monitor of container {req.id} answered {reply!r}")
        return Created(pid=pid, monitor_pid=monitor_pid)

    @staticmethod
    def read_exit(state_dir: Path) -> ExitStatus | None:
        """The exit status the monitor wrote, or ``None`` (not exited, or no monitor saw it)."""
        try:
            raw = (Path(state_dir) / protocol.EXIT_FILE).read_bytes()
        except OSError:
            return None
        doc = protocol.decode_exit(raw)
        if doc is None:
            return None
        return ExitStatus(
            exit_code=doc["exit_code"],
            exited_at=doc["exited_at"],
            oom_killed=doc["oom_killed"],
            signal=doc["signal"],
        )

    async def wait_exit(self, monitor_pid: int, state_dir: Path) -> ExitStatus | None:
        """Await the monitor's exit, then :meth:`read_exit`.

        Works for monitors that are not children of this process (a restarted daemon): the
        wait is a pidfd on the event loop. A pid that now names another process (the
        monitor is gone and the pid reused) is told apart by the monitor's working
        directory, which is its state directory. ``None`` if the monitor vanished without
        writing an exit file (it was killed).
        """
        try:
            pidfd = os.pidfd_open(monitor_pid)
        except ProcessLookupError:
            return self.read_exit(state_dir)
        try:
            if _is_monitor_of(monitor_pid, Path(state_dir)):
                await _readable(pidfd)
        finally:
            os.close(pidfd)
        return self.read_exit(state_dir)

    async def reopen_log(self, state_dir: Path) -> None:
        """Have the monitor close and reopen the container's log file (kubelet rotated it).

        :class:`FailedPrecondition` if the monitor is gone (the container has exited) or
        the file cannot be opened (the monitor then keeps writing to the old one).
        """
        await self._ctl(Path(state_dir), b"reopen")

    async def resize(self, state_dir: Path, width: int, height: int) -> None:
        """Set the container's terminal size; :class:`FailedPrecondition` if it has none."""
        if not (0 < width < 65536 and 0 < height < 65536):
            raise InvalidArgument(f"terminal size {width}x{height} is out of range")
        await self._ctl(Path(state_dir), b"resize %d %d" % (height, width))

    async def _ctl(self, state_dir: Path, request: bytes) -> None:
        path = state_dir / protocol.CTL_SOCKET
        try:
            sock = await _connect(str(path), socket.SOCK_SEQPACKET)
        except (FileNotFoundError, ConnectionRefusedError):
            raise FailedPrecondition(
                f"the monitor of container {state_dir.name} is not running"
            ) from None
        except OSError as e:
            raise FailedPrecondition(f"cannot reach the monitor at {path}: {e.strerror}") from None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CTL_TIMEOUT):
                await loop.sock_sendall(sock, request)
                reply = await loop.sock_recv(sock, protocol.MAX_CTL)
        except TimeoutError:
            raise FailedPrecondition(f"the monitor at {path} did not answer") from None
        except OSError as e:
            raise FailedPrecondition(f"the monitor at {path}: {e.strerror}") from None
        finally:
            sock.close()
        if reply == b"ok":
            return
        if reply.startswith(b"error "):
            raise FailedPrecondition(reply[6:].decode("utf-8", "replace"))
        raise FailedPrecondition(f"the monitor at {path} closed the connection")

    async def close(self) -> None:
        """Nothing to release: the server and the monitors outlive the daemon on purpose."""


# -- attach ----------------------------------------------------------------------------------


async def open_attach(state_dir: Path) -> socket.socket:
    """A non-blocking ``SOCK_SEQPACKET`` connection to the container's attach socket.

    Each packet received is one output frame: a stream byte (:data:`protocol.STREAM_STDOUT`
    or :data:`protocol.STREAM_STDERR`) and the bytes the container wrote; an empty read means
    the container has exited (or this client was dropped for not reading). Packets sent are
    stdin bytes (never empty); ``shutdown(SHUT_WR)`` detaches stdin (``stdin_once`` then
    closes the container's stdin). :class:`FailedPrecondition` if the monitor is gone.
    """
    path = Path(state_dir) / protocol.ATTACH_SOCKET
    try:
        return await _connect(str(path), socket.SOCK_SEQPACKET)
    except (FileNotFoundError, ConnectionRefusedError):
        raise FailedPrecondition(
            f"the monitor of container {Path(state_dir).name} is not running"
        ) from None


# -- helpers ---------------------------------------------------------------------------------


async def _connect(path: str, kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    address, dirfd = protocol.socket_address(path)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    finally:
        if dirfd is not None:
            os.close(dirfd)
    return sock


async def _read_line(sock: socket.socket) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    buf = b""
    while b"\n" not in buf:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > protocol.MAX_REQUEST:
            raise ValueError("answer too long")
    doc = json.loads(buf.split(b"\n", 1)[0])
    if not isinstance(doc, dict):
        raise ValueError(f"answer {doc!r} is not an object")
    return doc


def _first_json_line(raw: bytes) -> dict[str, Any] | None:
    line = raw.split(b"\n", 1)[0]
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


async def _flock(fd: int) -> None:
    """Take an exclusive flock without blocking the event loop (cancellation-safe)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await asyncio.sleep(0.01)
        except OSError as e:
            if e.errno != errno.EINTR:
                raise


def _is_monitor_of(pid: int, state_dir: Path) -> bool:
    """The monitor's working directory is its state directory (checked after pidfd_open)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False  # exited (a zombie has no cwd) or gone
    cwd = cwd.removesuffix(" (deleted)")
    return cwd in (str(state_dir), os.path.realpath(state_dir))


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
