"""``runtime create``, run by a short-lived worker process that the monitor forks.

The monitor (:mod:`moorage.monitor.monitor`) forks this worker so that the work done once per
container (decoding and checking the request, spawning the runtime, waiting for it, taking the
console, reading the pid file, reporting errors) dirties the worker's copy-on-write pages, not
the long-lived monitor's: the worker exits as soon as the container is created, and its memory
goes with it. The runtime is a child of the worker, so the container's init process, orphaned
when ``runtime create`` exits, is reparented to the monitor (the nearest subreaper).

The worker also opens the log file, binds the ``attach`` and ``ctl`` sockets, makes the
container's pipes and writes ``monitor.pid``. It answers the requester itself when anything
fails. When the container is created it tells the monitor, over a ``SOCK_SEQPACKET`` socket
pair, one packet of NUL-separated fields (:func:`encode_report`) with the descriptors
attached (``SCM_RIGHTS``): the log, the attach and ctl sockets, then the monitor's ends of
the container's stdout, stderr and stdin pipes, or the pty master. The monitor answers the
requester.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: no enum wrappers
import _socket
import os
import select
import sys
import time

from moorage.monitor.protocol import (
    ATTACH_SOCKET,
    CONSOLE_SOCKET,
    CTL_SOCKET,
    DEFAULT_CREATE_TIMEOUT,
    KIND_INTERNAL,
    KIND_INVALID,
    KIND_RUNTIME,
    KIND_TIMEOUT,
    MONITOR_PID,
    PIDFILE,
    delete_argv,
    dumps,
    exit_code_of,
    loads,
    read_oom_kills,
    request_problem,
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


class CreateTimedOut(CreateFailed):
    """``runtime create`` did not finish in time and was killed."""


class Refused(Exception):
    """The request is malformed."""


class Cancelled(Exception):
    """The requester went away before the answer: undo and exit quietly.

    The runtime is let finish first (for :data:`ABANDONED_GRACE` seconds at most): a
    ``runc create`` killed halfway leaves what it had made (its cgroup, a bind mount of its
    own binary in its state dir) with no state that ``runc delete`` could find. Then
    ``delete --force`` undoes whatever it created."""


#: How long a runtime whose requester went away may still take to finish its create.
ABANDONED_GRACE = 5.0


def encode_report(req: dict[str, Any], pid: int, oom: int | None) -> bytes:
    """The worker's report to the monitor (C string methods only to decode, see monitor)."""
    fields = [
        b"ok",
        b"%d" % pid,
        b"%d" % (-1 if oom is None else oom),
        b"1" if req.get("tty") else b"0",
        b"1" if req.get("stdin") else b"0",
        b"1" if req.get("stdin_once") else b"0",
        b"%d" % int(req.get("log_max_line", 16384)),
        *(
            os.fsencode(req.get(name, ""))
            for name in ("id", "state_dir", "log_path", "cgroup_memory_dir")
        ),
    ]
    return b"\0".join(fields)


def open_log(path: str) -> tuple[int, bool]:
    """Open (create) the CRI log file: (fd, whether this call created it)."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)  # as kubelet makes log dirs
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
            try:  # noqa: SIM105 (no contextlib here)
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return
        if reaped is not None:
            reaped[pid] = status


def undo_create(req: dict[str, Any]) -> None:
    """``runtime delete --force`` the container (whatever its create got to), and wait."""
    try:
        pid = os.posix_spawn(req["runtime"], delete_argv(req), RUNTIME_ENV,
                             setsigmask=(), setsigdef=RESET_SIGNALS)
        os.waitpid(pid, 0)
    except OSError:
        pass


def reply(conn: int, doc: dict[str, Any]) -> None:
    """Answer the requester (blocking, bounded by the socket's buffer)."""
    data = dumps(doc).encode() + b"\n"
    try:
        os.set_blocking(conn, True)
        while data:
            data = data[os.write(conn, data) :]
    except OSError:  # the requester is gone
        pass


def describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return f"{type(e).__name__}: {e}"


def parse_request(line: bytes) -> dict[str, Any]:
    try:
        req = loads(line.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError too
        raise Refused(f"the request is not JSON: {e}") from None
    problem = request_problem(req)
    if problem:
        raise Refused(problem)
    assert isinstance(req, dict)
    return req


class Worker:
    def __init__(self, req: dict[str, Any]) -> None:
        self.req = req
        self.tty = bool(req.get("tty"))
        self.runtime_pid = -1
        self.master = -1
        #: The monitor's ends of the container's stdio (after a successful run).
        self.ends: list[int] = []
        self.reaped: dict[int, int] = {}
        self.wake_r = -1
        self.abandoned = False  # the requester went away

    def run(self, conn: int) -> tuple[int, int | None]:
        """Create the container: (its pid, the cgroup's OOM kill count before it ran).

        Afterwards :attr:`ends` holds the monitor's ends of the container's stdio: stdout
        and stderr (read), then stdin (write) if asked for; or the pty master (twice with
        stdin: one descriptor to read, one to write).
        """
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, _on_signal)
        console: _socket.socket | None = None
        argv = runtime_argv(self.req, CONSOLE_SOCKET if self.tty else None)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        want_stdin = bool(self.req.get("stdin"))
        try:
            if self.tty:
                console = _listen_console(CONSOLE_SOCKET)
                stdio = (null, null, err_w)  # the container's stdio is the pty
            else:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                stdin = null
                self.ends = [out_r, err_r]
                if want_stdin:
                    stdin, stdin_w = os.pipe2(os.O_CLOEXEC)
                    self.ends.append(stdin_w)
                stdio = (stdin, out_w, err_w)
            self.runtime_pid = os.posix_spawn(
                argv[0],
                argv,
                RUNTIME_ENV,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(stdio)],
                setsigmask=(),
                setsigdef=RESET_SIGNALS,
            )
            for fd in {*stdio}:
                os.close(fd)  # the runtime has them; the container's end of a pipe must not
                # stay open here (EOF), though this process exits soon anyway
            self._wait(conn, console)
        finally:
            if console is not None:
                console.close()
                _unlink(CONSOLE_SOCKET)
        status = self.reaped.pop(self.runtime_pid)
        if status != 0 or (self.tty and self.master < 0):
            os.set_blocking(err_r, False)
            message = _read_all(err_r, MAX_ERROR).decode("utf-8", "replace").strip()
            if status != 0:
                code, sig = exit_code_of(status)
                what = f"killed by signal {sig}" if sig else f"exit status {code}"
                raise CreateFailed(message or f"{argv[0]} create failed ({what})")
            raise CreateFailed(message or f"{argv[0]} create did not send the console")
        if self.tty:
            self.ends = [self.master, self.master] if want_stdin else [self.master]
        with open(PIDFILE) as f:
            pid = int(f.read().strip())
        return pid, read_oom_kills(self.req.get("cgroup_memory_dir", ""))

    def _wait(self, conn: int, console: _socket.socket | None) -> None:
        """Until the runtime exits: take the console, watch the requester, mind the time."""
        ep = select.epoll()
        timeout = float(self.req.get("timeout", DEFAULT_CREATE_TIMEOUT))
        try:
            ep.register(self.wake_r, select.EPOLLIN)
            ep.register(conn, select.EPOLLIN | select.EPOLLRDHUP)
            if console is not None:
                ep.register(console.fileno(), select.EPOLLIN)
            deadline = time.monotonic() + timeout
            while self.runtime_pid not in self.reaped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    kill_children(self.reaped)
                    if self.abandoned:
                        raise Cancelled()
                    raise CreateTimedOut(
                        f"{self.req['runtime']} create did not finish in {timeout:g}s; killed"
                    )
                for fd, _ in ep.poll(remaining):
                    if fd == self.wake_r:
                        self._reap()
                    elif console is not None and fd == console.fileno():
                        self._take_console(console)
                    elif fd == conn and not self.abandoned:
                        self.abandoned = True  # let the runtime finish (Cancelled)
                        ep.unregister(conn)
                        deadline = min(deadline, time.monotonic() + ABANDONED_GRACE)
            if self.abandoned:
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

    def _take_console(self, console: _socket.socket) -> None:
        try:
            fd, _ = console._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return
        conn = _socket.socket(fileno=fd)
        try:
            conn.settimeout(5)
            _, ancdata, _, _ = conn.recvmsg(4096, _socket.CMSG_SPACE(4 * 4))
        finally:
            conn.close()
        fds = unpack_fds(ancdata)
        if fds and self.master < 0:
            self.master = fds.pop(0)
        for fd in fds:
            os.close(fd)


def pack_fds(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """``SCM_RIGHTS`` ancillary data for ``sendmsg``."""
    data = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
    return [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, data)]


def unpack_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in ``recvmsg`` ancillary data."""
    fds = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            for i in range(0, len(data) - len(data) % 4, 4):
                fds.append(int.from_bytes(data[i : i + 4], sys.byteorder, signed=True))
    return fds


def _unlink(name: str) -> None:
    try:  # noqa: SIM105 (no contextlib here)
        os.unlink(name)
    except FileNotFoundError:
        pass


def _listen_console(name: str) -> _socket.socket:
    """The console socket (``SOCK_STREAM``: runc's dialer) at ``name`` in the state dir."""
    return _listen(name, _socket.SOCK_STREAM, 1)


def _listen(name: str, kind: int, backlog: int) -> _socket.socket:
    """A non-blocking listening unix socket at ``name`` (relative: in the state dir)."""
    _unlink(name)
    sock = _socket.socket(_socket.AF_UNIX, kind | _socket.SOCK_CLOEXEC)
    sock.bind(name)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def atomic_write(name: str, data: bytes) -> None:
    tmp = name + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, name)


def work(line: bytes, conn: int, report: _socket.socket) -> NoReturn:
    """The worker's whole life (in the child the monitor forked): create, report, exit."""
    code = 1
    log_fd, created_log = -1, False
    bound: list[str] = []
    req: dict[str, Any] = {}
    answer: dict[str, Any] | None = None  # the error, sent once everything is undone
    try:
        try:
            req = parse_request(line)
            os.chdir(req["state_dir"])
            log_fd, created_log = open_log(req["log_path"])
            attach = _listen(ATTACH_SOCKET, _socket.SOCK_SEQPACKET, 16)
            bound.append(ATTACH_SOCKET)
            ctl = _listen(CTL_SOCKET, _socket.SOCK_SEQPACKET, 16)
            bound.append(CTL_SOCKET)
            worker = Worker(req)
            pid, oom = worker.run(conn)
            atomic_write(MONITOR_PID, b"%d\n" % os.getppid())
            fds = [log_fd, attach.fileno(), ctl.fileno(), *worker.ends]
            report.sendmsg([encode_report(req, pid, oom)], pack_fds(fds))
            code = 0
        except Cancelled:
            undo_create(req)
            kill_children()
        except Refused as e:
            answer = {"error": str(e), "kind": KIND_INVALID}
        except CreateFailed as e:
            kill_children()
            kind = KIND_TIMEOUT if isinstance(e, CreateTimedOut) else KIND_RUNTIME
            answer = {"error": str(e), "kind": kind}
        except Exception as e:
            kill_children()
            answer = {"error": f"monitor: {describe(e)}", "kind": KIND_INTERNAL}
        if code != 0:
            for name in bound:
                _unlink(name)
            try:
                if created_log and os.fstat(log_fd).st_size == 0:
                    os.unlink(req["log_path"])
            except OSError:
                pass
        if answer is not None:
            reply(conn, answer)
    finally:
        os._exit(code)
