"""``runtime create``, run by a short-lived worker process that the monitor forks.

The monitor (:mod:`moorage.monitor.monitor`) forks this worker so that the work done once per
container (spawning the runtime, waiting for it, taking the console, reading the pid file,
reporting errors) dirties the worker's copy-on-write pages, not the long-lived monitor's: the
worker exits as soon as the container is created, and its memory goes with it. The runtime is
a child of the worker, so the container's init process, orphaned when ``runtime create``
exits, is reparented to the monitor (the nearest subreaper).

The worker tells the monitor how it went over a ``SOCK_SEQPACKET`` socket pair: one packet
``ok <container pid> <oom kills before, or -1>`` (with the pty master attached as
``SCM_RIGHTS`` for a tty container), or nothing at all (it failed, answered the requester
itself and exited).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: no enum wrappers
import array
import contextlib
import json
import os
import select
import socket
import time

from moorage.monitor.protocol import (
    CONSOLE_SOCKET,
    DEFAULT_CREATE_TIMEOUT,
    KIND_INTERNAL,
    KIND_RUNTIME,
    PIDFILE,
    exit_code_of,
    read_oom_kills,
    runtime_argv,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

#: How much of the runtime's stderr a failure reports.
MAX_ERROR = 8192
#: Signals the runtime (and so the container) must start with at their default action: the
#: monitor ignores some of them, and ignored signals survive exec.
RESET_SIGNALS = (
    _signal.SIGPIPE,
    _signal.SIGHUP,
    _signal.SIGXFSZ,
    _signal.SIGINT,
    _signal.SIGCHLD,
    _signal.SIGTERM,
)
#: The runtime's environment: no PYTHONPATH or other variables of the daemon's.
RUNTIME_ENV = {
    "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}
LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
LOG_MODE = 0o640


class CreateFailed(Exception):
    """``runtime create`` failed; the message is the runtime's own words."""


class Cancelled(Exception):
    """The requester went away before the answer: undo and exit quietly."""


class Stdio:
    """The container's ends of its stdio, made by the monitor before it forked the worker."""

    __slots__ = ("err_r", "stderr", "stdin", "stdout")

    def __init__(self, stdin: int, stdout: int, stderr: int, err_r: int) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.err_r = err_r  # where the runtime's error messages can be read back


def open_log(path: str) -> tuple[int, bool]:
    """Open (create) the CRI log file: (fd, whether this call created it)."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o750, exist_ok=True)
    created = not os.path.lexists(path)
    return os.open(path, LOG_FLAGS, LOG_MODE), created


def _on_signal(signum: int, frame: object) -> None:
    """SIGCHLD: the wakeup descriptor has the byte the event loop needs."""


def _read_all(fd: int, limit: int) -> bytes:
    """What can be read from a non-blocking ``fd`` now, up to ``limit`` bytes."""
    chunks = []
    total = 0
    while total < limit:
        try:
            chunk = os.read(fd, limit - total)
        except OSError:  # EAGAIN: nothing more now; EIO: a pty without its other side
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def children() -> list[int]:
    """This process's children (``/proc/self/task/*/children``)."""
    out: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def kill_children(reaped: dict[int, int] | None = None) -> None:
    """SIGKILL and reap every child of this process, and the orphans they leave to it."""
    for _ in range(1000):
        for pid in children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, _signal.SIGKILL)
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return
        if reaped is not None:
            reaped[pid] = status


def reply(conn: socket.socket, doc: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the requester is gone
        conn.settimeout(5)
        conn.sendall(json.dumps(doc).encode() + b"\n")


class Worker:
    def __init__(self, req: dict[str, Any], stdio: Stdio) -> None:
        self.req = req
        self.stdio = stdio
        self.tty = bool(req.get("tty"))
        self.runtime_pid = -1
        self.master = -1
        self.reaped: dict[int, int] = {}
        self.wake_r = -1

    def run(self, conn: socket.socket) -> tuple[int, int]:
        """Create the container: (its pid, the OOM kill count before it ran, or -1)."""
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, _on_signal)
        console: socket.socket | None = None
        err_r = self.stdio.err_r
        argv = runtime_argv(self.req, CONSOLE_SOCKET if self.tty else None)
        try:
            stdio = (self.stdio.stdin, self.stdio.stdout, self.stdio.stderr)
            if self.tty:
                console = _listen_console(CONSOLE_SOCKET)
                err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                stdio = (self.stdio.stdin, self.stdio.stdout, err_w)
            self.runtime_pid = os.posix_spawn(
                argv[0],
                argv,
                RUNTIME_ENV,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(stdio)],
                setsigmask=(),
                setsigdef=RESET_SIGNALS,
            )
            if self.tty:
                os.close(err_w)
            self._wait(conn, console)
        finally:
            if console is not None:
                console.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(CONSOLE_SOCKET)
        status = self.reaped.pop(self.runtime_pid)
        if status != 0 or (self.tty and self.master < 0):
            message = _read_all(err_r, MAX_ERROR).decode("utf-8", "replace").strip()
            if status != 0:
                code, sig = exit_code_of(status)
                what = f"killed by signal {sig}" if sig else f"exit status {code}"
                raise CreateFailed(message or f"{argv[0]} create failed ({what})")
            raise CreateFailed(message or f"{argv[0]} create did not send the console")
        with open(PIDFILE) as f:
            pid = int(f.read().strip())
        oom = read_oom_kills(self.req.get("cgroup_memory_dir", ""))
        return pid, -1 if oom is None else oom

    def _wait(self, conn: socket.socket, console: socket.socket | None) -> None:
        """Until the runtime exits: take the console, watch the requester, mind the time."""
        ep = select.epoll()
        timeout = float(self.req.get("timeout", DEFAULT_CREATE_TIMEOUT))
        try:
            ep.register(self.wake_r, select.EPOLLIN)
            ep.register(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            if console is not None:
                ep.register(console.fileno(), select.EPOLLIN)
            deadline = time.monotonic() + timeout
            while self.runtime_pid not in self.reaped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    kill_children(self.reaped)
                    raise CreateFailed(
                        f"{self.req['runtime']} create did not finish in {timeout:g}s; killed"
                    )
                for fd, _ in ep.poll(remaining):
                    if fd == self.wake_r:
                        self._reap()
                    elif console is not None and fd == console.fileno():
                        self._take_console(console)
                    elif fd == conn.fileno():
                        kill_children(self.reaped)
                        raise Cancelled()
            if console is not None and self.master < 0:
                self._take_console(console)  # it connected, sent and exited between polls
        finally:
            ep.close()

    def _reap(self) -> None:
        _read_all(self.wake_r, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.reaped[pid] = status

    def _take_console(self, console: socket.socket) -> None:
        try:
            conn, _ = console.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(5)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        if fds and self.master < 0:
            self.master = fds.pop(0)
        for fd in fds:
            os.close(fd)


def _listen_console(name: str) -> socket.socket:
    """The console socket (``SOCK_STREAM``: runc's dialer) at ``name`` in the state dir."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(name)
    sock.listen(1)
    sock.setblocking(False)
    return sock


def work(req: dict[str, Any], conn: socket.socket, stdio: Stdio, report: socket.socket) -> NoReturn:
    """The worker's whole life (in the child the monitor forked): create, report, exit."""
    code = 1
    log_fd, created_log = -1, False
    worker = Worker(req, stdio)
    try:
        try:
            log_fd, created_log = open_log(req["log_path"])
            pid, oom = worker.run(conn)
            fds = [worker.master] if worker.master >= 0 else []
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            report.sendmsg([b"ok %d %d" % (pid, oom)], ancillary if fds else [])
            code = 0
        except Cancelled:
            kill_children()
        except CreateFailed as e:
            kill_children()
            reply(conn, {"error": str(e), "kind": KIND_RUNTIME})
        except Exception as e:
            kill_children()
            reply(conn, {"error": f"monitor: {describe(e)}", "kind": KIND_INTERNAL})
        if code != 0 and created_log:
            with contextlib.suppress(OSError):
                if os.fstat(log_fd).st_size == 0:
                    os.unlink(req["log_path"])
    finally:
        os._exit(code)


def describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return f"{type(e).__name__}: {e}"
