"""One container's monitor: ``runtime create``, stdio or pty, the CRI log, attach, ctl, exit.

:func:`run` is called in a process forked for one container (by the monitor server, or by
``python -m moorage.monitor run``): it never returns. The process is its own session, its
parent is init, it holds no descriptor of the daemon, and it lives as long as the container.

Memory is the design constraint (see ``docs/monitor.md``): everything is imported and set up
before the fork, the child freezes the inherited objects out of the garbage collector, reads
at most :data:`READ_SIZE` bytes at a time and keeps at most ``log_max_line`` bytes of a
partial line per stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
import time
from typing import Any, NoReturn

from moorage.monitor import crilog
from moorage.monitor.protocol import (
    ATTACH_SOCKET,
    CONSOLE_SOCKET,
    CTL_SOCKET,
    DEFAULT_CREATE_TIMEOUT,
    EXIT_FILE,
    KIND_INTERNAL,
    KIND_RUNTIME,
    MAX_CTL,
    MONITOR_PID,
    PIDFILE,
    STREAM_STDERR,
    STREAM_STDOUT,
    encode_exit,
    exit_code_of,
    oom_killed,
    parse_ctl,
    read_oom_kills,
    runtime_argv,
)

#: Bytes read from the container's output (and from an attach client) at a time; conmon's
#: buffer size. Small buffers keep the monitor's heap, so its private memory, small.
READ_SIZE = 8192
#: A partial line waits this long for its end before it is logged as a ``P`` entry.
PARTIAL_FLUSH_NS = 1_000_000_000
#: At most this many attach and ctl clients at once; more are refused.
MAX_CLIENTS = 64
#: Output read after the container's exit (from processes still holding its pipes) is capped.
MAX_DRAIN = 16 * 1024 * 1024
#: How much of the runtime's stderr a failure reports.
MAX_ERROR = 8192
#: The runtime's environment: no PYTHONPATH or other variables of the daemon's.
RUNTIME_ENV = {
    "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}
#: Signals that the monitor ignores and that the runtime (and the container) must not inherit
#: as ignored.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGHUP, signal.SIGXFSZ, signal.SIGINT, signal.SIGCHLD)
_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG_MODE = 0o640

_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HUP = select.EPOLLHUP | select.EPOLLERR
_NONBLOCK = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class CreateFailed(Exception):
    """``runtime create`` failed; the message is the runtime's own words."""


class Cancelled(Exception):
    """The requester went away before the answer: undo and exit quietly."""


def _on_signal(signum: int, frame: object) -> None:
    """SIGCHLD: the wakeup descriptor has the byte the event loop needs."""


def _say(cid: str, message: str) -> None:
    """A diagnostic line for the server log (the monitor's stderr)."""
    with contextlib.suppress(OSError):
        os.write(2, f"monitor {os.getpid()} {cid[:12]}: {message}\n".encode("utf-8", "replace"))


def _read_all(fd: int, limit: int) -> bytes:
    """What can be read from a non-blocking ``fd`` now, up to ``limit`` bytes."""
    chunks = []
    total = 0
    while total < limit:
        try:
            chunk = os.read(fd, min(READ_SIZE, limit - total))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # EIO: the pty's other side is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _atomic_write(name: str, data: bytes) -> None:
    tmp = name + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, name)


def _bind_seqpacket(name: str) -> socket.socket:
    """A listening ``SOCK_SEQPACKET`` socket at ``name`` (relative: in the state dir)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.bind(name)
    sock.listen(16)
    sock.setblocking(False)
    return sock


class _Client:
    """An attach client."""

    __slots__ = ("reading", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reading = True  # until it shuts its side down


class Monitor:
    """The state of one monitor process (one instance per process)."""

    def __init__(self, req: dict[str, Any]) -> None:
        self.req = req
        self.cid: str = req["id"]
        self.tty: bool = bool(req.get("tty"))
        self.want_stdin: bool = bool(req.get("stdin"))
        self.stdin_once: bool = bool(req.get("stdin_once"))
        self.log_path: str = req["log_path"]
        self.memory_dir: str = req.get("cgroup_memory_dir", "")
        max_line = int(req.get("log_max_line", crilog.DEFAULT_MAX_LINE))
        self.splitters = {
            STREAM_STDOUT: crilog.LineSplitter(crilog.STDOUT, max_line),
            STREAM_STDERR: crilog.LineSplitter(crilog.STDERR, max_line),
        }
        self.ep = select.epoll()
        self.wake_r = -1
        self.log_fd = -1
        self.created_log = False
        self.log_errors = 0
        #: Output descriptors: fd -> stream id (the pty master is stdout).
        self.outputs: dict[int, int] = {}
        self.master = -1  # the pty master (tty), for resize
        self.stdin_fd = -1  # where attach input goes (-1: none, or closed for good)
        self.stdin_pending = b""
        self.stdin_closing = False
        self.stdin_owner: _Client | None = None
        self.clients: dict[int, _Client] = {}
        self.ctl_clients: dict[int, socket.socket] = {}
        self.attach_sock: socket.socket | None = None
        self.ctl_sock: socket.socket | None = None
        self.runtime_pid = -1
        self.container_pid = -1
        self.reaped: dict[int, int] = {}
        self.exit_status: int | None = None
        self.exited_at = 0
        self.oom_before: int | None = None

    # -- setting up ----------------------------------------------------------------------

    def setup_process(self) -> None:
        os.chdir(self.req["state_dir"])
        if _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's handler is not ours
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _on_signal)
        self.ep.register(self.wake_r, _IN)

    def open_log(self) -> None:
        path = self.log_path
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=0o750, exist_ok=True)
        self.created_log = not os.path.lexists(path)
        self.log_fd = os.open(path, _LOG_FLAGS, _LOG_MODE)

    def create(self, conn: socket.socket) -> None:
        """Run ``runtime create`` with the container's stdio; raises CreateFailed/Cancelled."""
        closers: list[int] = []  # our copies of the container's ends
        console: socket.socket | None = None
        err_r = -1
        try:
            null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            closers.append(null)
            if self.tty:
                console = _bind_seqpacket_stream(CONSOLE_SOCKET)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                closers.append(err_w)
                stdio = (null, null, err_w)
            else:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                closers += [out_w, err_w]
                stdin_src = null
                if self.want_stdin:
                    in_r, self.stdin_fd = os.pipe2(os.O_CLOEXEC)
                    closers.append(in_r)
                    stdin_src = in_r
                    os.set_blocking(self.stdin_fd, False)
                stdio = (stdin_src, out_w, err_w)
                for fd in (out_r, err_r):
                    os.set_blocking(fd, False)
                self.outputs = {out_r: STREAM_STDOUT, err_r: STREAM_STDERR}
            os.set_blocking(err_r, False)
            argv = runtime_argv(self.req, CONSOLE_SOCKET if self.tty else None)
            self.runtime_pid = os.posix_spawn(
                argv[0],
                argv,
                RUNTIME_ENV,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(stdio)],
                setsigmask=(),
                setsigdef=_RESET_SIGNALS,
            )
            for fd in closers:
                os.close(fd)
            closers = []
            self._wait_runtime(conn, console, err_r if self.tty else -1)
        finally:
            for fd in closers:
                os.close(fd)
            if console is not None:
                console.close()
                _unlink(CONSOLE_SOCKET)
        status = self.reaped.pop(self.runtime_pid)
        if status != 0 or (self.tty and self.master < 0):
            message = _read_all(err_r, MAX_ERROR).decode("utf-8", "replace").strip()
            if status != 0:
                code, sig = exit_code_of(status)
                what = f"killed by {sig}" if sig else f"exit status {code}"
                raise CreateFailed(message or f"{argv[0]} create failed ({what})")
            raise CreateFailed(message or f"{argv[0]} create did not send the console")
        if self.tty:
            os.close(err_r)
        with open(PIDFILE) as f:
            self.container_pid = int(f.read().strip())
        self.oom_before = read_oom_kills(self.memory_dir)
        if self.container_pid in self.reaped:  # it died already
            self._container_exited(self.reaped.pop(self.container_pid))

    def _wait_runtime(self, conn: socket.socket, console: socket.socket | None, err_r: int) -> None:
        """Until the runtime exits: take the console, keep its stderr, watch the requester."""
        ep = select.epoll()
        try:
            ep.register(self.wake_r, _IN)
            ep.register(conn.fileno(), _IN | select.EPOLLRDHUP)
            if console is not None:
                ep.register(console.fileno(), _IN)
            deadline = time.monotonic() + float(self.req.get("timeout", DEFAULT_CREATE_TIMEOUT))
            while self.runtime_pid not in self.reaped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._kill_children()
                    raise CreateFailed(
                        f"{self.req['runtime']} create did not finish in "
                        f"{self.req.get('timeout', DEFAULT_CREATE_TIMEOUT)}s; killed"
                    )
                for fd, _ in ep.poll(remaining):
                    if fd == self.wake_r:
                        self._reap()
                    elif console is not None and fd == console.fileno():
                        self._take_console(console)
                    elif fd == conn.fileno():
                        self._kill_children()
                        raise Cancelled()
            if console is not None and self.master < 0:
                self._take_console(console)  # it connected, sent and exited between polls
        finally:
            ep.close()

    def _take_console(self, console: socket.socket) -> None:
        try:
            conn, _ = console.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(5)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        for fd in fds[1:]:
            os.close(fd)
        if fds and self.master < 0:
            self.master = fds[0]
            os.set_inheritable(self.master, False)
            os.set_blocking(self.master, False)
            self.outputs = {self.master: STREAM_STDOUT}
            if self.want_stdin:
                self.stdin_fd = os.dup(self.master)  # its own epoll registration
        else:
            for fd in fds:
                os.close(fd)

    def listen(self) -> None:
        """The attach and ctl sockets, ``monitor.pid``; output registered with the loop."""
        self.attach_sock = _bind_seqpacket(ATTACH_SOCKET)
        self.ctl_sock = _bind_seqpacket(CTL_SOCKET)
        self.ep.register(self.attach_sock.fileno(), _IN)
        self.ep.register(self.ctl_sock.fileno(), _IN)
        for fd in self.outputs:
            self.ep.register(fd, _IN)
        if self.stdin_fd >= 0:
            self.ep.register(self.stdin_fd, 0)
        _atomic_write(MONITOR_PID, b"%d\n" % os.getpid())

    # -- children ------------------------------------------------------------------------

    def _reap(self) -> None:
        try:
            while os.read(self.wake_r, 64):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.container_pid:
                self._container_exited(status)
            elif pid == self.runtime_pid or self.container_pid < 0:
                self.reaped[pid] = status
            # else: an orphan of the container, reparented to us (subreaper): reaped.

    def _container_exited(self, status: int) -> None:
        if self.exit_status is None:
            self.exit_status = status
            self.exited_at = time.time_ns()

    def _kill_children(self) -> None:
        """SIGKILL and reap every child (the runtime and whatever it left to us)."""
        for _ in range(100):
            children = _children()
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            self.reaped[pid] = status

    # -- the loop ------------------------------------------------------------------------

    def loop(self) -> None:
        while self.exit_status is None:
            timeout = self._flush_stale()
            try:
                events = self.ep.poll(timeout)
            except InterruptedError:
                continue
            for fd, mask in events:
                try:
                    self._dispatch(fd, mask)
                except Exception as e:  # never die of one bad descriptor
                    _say(self.cid, f"error on fd {fd}: {type(e).__name__}: {e}")
                    self._forget(fd)

    def _dispatch(self, fd: int, mask: int) -> None:
        if fd == self.wake_r:
            self._reap()
        elif fd in self.outputs:
            self._on_output(fd)
        elif fd in self.clients:
            self._on_client(self.clients[fd], mask)
        elif fd == self.stdin_fd:
            self._flush_stdin()
        elif fd in self.ctl_clients:
            self._on_ctl(self.ctl_clients[fd], mask)
        elif self.attach_sock is not None and fd == self.attach_sock.fileno():
            self._accept_attach()
        elif self.ctl_sock is not None and fd == self.ctl_sock.fileno():
            self._accept_ctl()
        else:
            self.ep.unregister(fd)

    def _forget(self, fd: int) -> None:
        """Stop watching a descriptor whose handler failed."""
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)
        client = self.clients.pop(fd, None)
        if client is not None:
            client.sock.close()
        ctl = self.ctl_clients.pop(fd, None)
        if ctl is not None:
            ctl.close()
        if self.outputs.pop(fd, None) is not None:
            os.close(fd)

    def _flush_stale(self) -> float:
        """Log partial lines that waited long enough; the poll timeout until the next one."""
        timeout = -1.0
        now = 0
        for splitter in self.splitters.values():
            if not splitter.pending:
                continue
            now = now or time.monotonic_ns()
            age = now - splitter.pending_since
            if age >= PARTIAL_FLUSH_NS:
                self._write_log(splitter.flush(crilog.timestamp(time.time_ns())))
            else:
                left = (PARTIAL_FLUSH_NS - age) / 1e9
                timeout = left if timeout < 0 else min(timeout, left)
        return timeout

    # -- output --------------------------------------------------------------------------

    def _on_output(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: the pty has no other side any more
                raise
            data = b""
        sid = self.outputs[fd]
        if not data:
            self.ep.unregister(fd)
            del self.outputs[fd]
            if fd != self.master:
                os.close(fd)
            self._write_log(self.splitters[sid].flush(crilog.timestamp(time.time_ns())))
            return
        self._output(sid, data)

    def _output(self, sid: int, data: bytes) -> None:
        splitter = self.splitters[sid]
        self._write_log(splitter.feed(data, crilog.timestamp(time.time_ns()), time.monotonic_ns()))
        if self.clients:
            frame = bytes((sid,)) + data
            for client in list(self.clients.values()):
                try:
                    client.sock.send(frame, _NONBLOCK)
                except OSError:  # it does not keep up (EAGAIN), or it is gone: drop it
                    self._drop_client(client)

    def _write_log(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.log_fd, view)
            except InterruptedError:
                continue
            except OSError as e:
                # A full or broken disk: drop the entries, never stop reading the container.
                self.log_errors += 1
                if self.log_errors == 1 or self.log_errors % 1000 == 0:
                    _say(self.cid, f"cannot write the log ({self.log_errors} times): {e}")
                return
            view = view[n:]

    def reopen_log(self) -> None:
        parent = os.path.dirname(self.log_path)
        if parent:
            os.makedirs(parent, mode=0o750, exist_ok=True)
        fd = os.open(self.log_path, _LOG_FLAGS, _LOG_MODE)
        old, self.log_fd = self.log_fd, fd
        os.close(old)

    # -- attach --------------------------------------------------------------------------

    def _accept_attach(self) -> None:
        assert self.attach_sock is not None
        while True:
            try:
                sock, _ = self.attach_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            if len(self.clients) + len(self.ctl_clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock)
            self.clients[sock.fileno()] = client
            self.ep.register(sock.fileno(), self._client_mask(client))

    def _client_mask(self, client: _Client) -> int:
        # While stdin input waits for the container, clients are not read (they wait).
        return _IN if client.reading and not self.stdin_pending else 0

    def _on_client(self, client: _Client, mask: int) -> None:
        if mask & _IN and client.reading:
            try:
                data = client.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                self._stdin(client, data)
                return
            client.reading = False  # it shut its side down: no more input from it
            if client is self.stdin_owner and self.stdin_once:
                self._close_stdin()
            self.ep.modify(client.sock.fileno(), 0)
        elif mask & _HUP:
            self._drop_client(client)

    def _drop_client(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self.clients.pop(fd, None) is None:
            return
        self.ep.unregister(fd)
        client.sock.close()
        if client is self.stdin_owner and self.stdin_once:
            self._close_stdin()

    def _stdin(self, client: _Client, data: bytes) -> None:
        if self.stdin_fd < 0 or self.stdin_closing:
            return  # no stdin, or closed for good: dropped
        if self.stdin_owner is None:
            self.stdin_owner = client
        self.stdin_pending += data
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        if self.stdin_fd >= 0 and self.stdin_pending:
            try:
                n = os.write(self.stdin_fd, self.stdin_pending)
                self.stdin_pending = self.stdin_pending[n:]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # EPIPE: the container closed its stdin
                self.stdin_pending = b""
                self.stdin_closing = True
        if self.stdin_pending:
            self.ep.modify(self.stdin_fd, _OUT)
            self._update_clients()
            return
        if self.stdin_fd >= 0:
            self.ep.modify(self.stdin_fd, 0)
        if self.stdin_closing:
            self._close_stdin()
        self._update_clients()

    def _update_clients(self) -> None:
        for fd, client in self.clients.items():
            self.ep.modify(fd, self._client_mask(client))

    def _close_stdin(self) -> None:
        """Close the container's stdin for good (once what is pending is written)."""
        self.stdin_closing = True
        if self.stdin_pending or self.stdin_fd < 0:
            return
        self.ep.unregister(self.stdin_fd)
        # A pipe: the container reads EOF. A pty: input just stops (as in conmon and
        # containerd; closing our copy of the master does not hang the terminal up).
        os.close(self.stdin_fd)
        self.stdin_fd = -1

    # -- ctl -----------------------------------------------------------------------------

    def _accept_ctl(self) -> None:
        assert self.ctl_sock is not None
        while True:
            try:
                sock, _ = self.ctl_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            if len(self.clients) + len(self.ctl_clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            self.ctl_clients[sock.fileno()] = sock
            self.ep.register(sock.fileno(), _IN)

    def _on_ctl(self, sock: socket.socket, mask: int) -> None:
        try:
            raw = sock.recv(MAX_CTL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            raw = b""
        if not raw:
            self._forget(sock.fileno())
            return
        try:
            command, height, width = parse_ctl(raw)
            if command == "resize":
                if self.master < 0:
                    raise ValueError("the container has no terminal")
                winsize = struct.pack("HHHH", height, width, 0, 0)
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, winsize)
            else:
                self.reopen_log()
            reply = b"ok"
        except (ValueError, OSError) as e:
            reply = b"error " + str(e).encode("utf-8", "replace")
        try:
            sock.send(reply, _NONBLOCK)
        except OSError:
            self._forget(sock.fileno())

    # -- the end -------------------------------------------------------------------------

    def finish(self) -> None:
        """The container has exited: drain its output, log, write the exit file."""
        drained = 0
        for fd, sid in list(self.outputs.items()):
            while drained < MAX_DRAIN:
                data = _read_all(fd, READ_SIZE * 8)
                if not data:
                    break
                drained += len(data)
                self._output(sid, data)
        ts = crilog.timestamp(time.time_ns())
        for splitter in self.splitters.values():
            self._write_log(splitter.flush(ts))
        status = self.exit_status if self.exit_status is not None else 0
        code, sig = exit_code_of(status)
        oom = oom_killed(self.oom_before, read_oom_kills(self.memory_dir))
        _atomic_write(EXIT_FILE, encode_exit(code, self.exited_at, oom, sig))
        for name in (ATTACH_SOCKET, CTL_SOCKET):
            _unlink(name)
        for client in self.clients.values():
            client.sock.close()

    def fail_cleanup(self) -> None:
        """After a failed create: no child left, no empty log file we made."""
        self._kill_children()
        if self.log_fd >= 0 and self.created_log:
            try:
                if os.fstat(self.log_fd).st_size == 0:
                    os.unlink(self.log_path)
            except OSError:
                pass


def _bind_seqpacket_stream(name: str) -> socket.socket:
    """The console socket: runc connects with ``SOCK_STREAM``."""
    _unlink(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(name)
    sock.listen(1)
    sock.setblocking(False)
    return sock


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def _children() -> list[int]:
    """This process's children (``/proc/self/task/*/children``)."""
    out: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def _reply(conn: socket.socket, doc: dict[str, Any]) -> None:
    try:
        conn.settimeout(5)
        conn.sendall(json.dumps(doc).encode() + b"\n")
    except OSError:
        pass  # the requester is gone; the monitor goes on (or has failed anyway)


def run(conn: socket.socket, req: dict[str, Any]) -> NoReturn:
    """Be the monitor of ``req``'s container, answering on ``conn``; exits the process.

    Called in a fresh child (the caller closed everything else it had open). The inherited
    heap is frozen out of the garbage collector so that collections do not copy its pages.
    """
    gc.freeze()
    code = 0
    mon = Monitor(req)
    try:
        try:
            mon.setup_process()
            mon.open_log()
            mon.create(conn)
            mon.listen()
        except Cancelled:
            mon.fail_cleanup()
            os._exit(0)
        except CreateFailed as e:
            mon.fail_cleanup()
            _reply(conn, {"error": str(e), "kind": KIND_RUNTIME})
            os._exit(1)
        except Exception as e:
            mon.fail_cleanup()
            _reply(conn, {"error": f"monitor: {_describe(e)}", "kind": KIND_INTERNAL})
            os._exit(1)
        _reply(conn, {"pid": mon.container_pid, "monitor_pid": os.getpid()})
        conn.close()
        mon.loop()
        mon.finish()
    except BaseException as e:  # pragma: no cover (a bug): say what, and still exit
        _say(mon.cid, f"monitor failed: {_describe(e)}")
        code = 1
    try:
        sys.stderr.flush()
    finally:
        os._exit(code)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return f"{type(e).__name__}: {e}"
