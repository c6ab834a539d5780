"""One container's monitor: its stdio or pty, the CRI log, attach, ctl, and its exit.

:func:`run` is called in a process forked for one container (by the monitor server, or by
``python -m moorage.monitor run``) and never returns. That process is its own session, its
parent is init, it holds no descriptor of the daemon, and it lives as long as the container:

1. it becomes a child subreaper and forks a worker (:mod:`moorage.monitor.create`) that
   decodes the request, opens the log, binds the ``attach`` and ``ctl`` sockets, makes the
   container's pipes, runs ``runtime create``, writes ``monitor.pid``, reports (with those
   descriptors) and exits;
2. it answers the requester;
3. its event loop (``epoll``) logs the container's output, serves attach and ctl clients
   and reaps children (``SIGCHLD`` through a wakeup pipe);
4. when the container's init exits it reads the output left, writes the exit file, exits.

Memory is the design constraint (see ``docs/monitor.md``): each page this process writes is
its own copy of the server's page. So the one-off work is done in the worker, the inherited
objects are frozen out of the garbage collector, the server has run this code before forking
(:func:`warm_up`), the monitor calls C functions (``os``, ``epoll``, ``_signal``,
``_socket``) rather than their Python wrappers, reads :data:`READ_SIZE` bytes at a time and
holds at most ``log_max_line`` bytes of a partial line per stream.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: no enum wrappers
import _socket
import ctypes
import errno
import fcntl
import gc
import os
import select
import sys
import termios
import time

from moorage.monitor import crilog
from moorage.monitor.create import (
    LOG_FLAGS,
    LOG_MODE,
    atomic_write,
    describe,
    kill_children,
    pack_fds,
    reply,
    unpack_fds,
    work,
)
from moorage.monitor.protocol import (
    ATTACH_SOCKET,
    CTL_SOCKET,
    EXIT_FILE,
    KIND_INTERNAL,
    MAX_CTL,
    MAX_INPUT_PACKET,
    MAX_OUTPUT_FRAME,
    STREAM_STDERR,
    STREAM_STDOUT,
    encode_exit,
    exit_code_of,
    oom_kill_count,
    oom_killed,
    parse_ctl,
    read_oom_kills,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

#: Bytes read from the container's output (and from an attach client) at a time; conmon's
#: buffer size. Small buffers keep the monitor's heap, so its private memory, small.
READ_SIZE = 8192
#: A partial line waits this long for its end before it is logged as a ``P`` entry.
PARTIAL_FLUSH_NS = 1_000_000_000
#: At most this many attach and ctl clients at once; more are refused.
MAX_CLIENTS = 64
#: Output read after the container's exit (from processes still holding its pipes) is capped.
MAX_DRAIN = 16 * 1024 * 1024

#: Every read of the container's output lands here first (no 8 KiB allocation per read). It
#: is made before the fork: a monitor copies only the pages of it that its reads fill.
_READ_BUF = bytearray(READ_SIZE)
_READ_BUFS = (_READ_BUF,)
_READ_VIEW = memoryview(_READ_BUF)

_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HUP = select.EPOLLHUP | select.EPOLLERR
_NONBLOCK = _socket.MSG_DONTWAIT | _socket.MSG_NOSIGNAL
_CMSG_FDS = _socket.CMSG_SPACE(8 * 4)  # the worker sends at most 6
_REPORT_MAX = 64 * 1024
#: The highest descriptor number :func:`run` closes up to (the server's, inherited).
_MAX_FD = 1 << 20


def _on_signal(signum: int, frame: object) -> None:
    """SIGCHLD: the wakeup descriptor has the byte the event loop needs."""


def prepare_signals() -> None:
    """The signal dispositions of a monitor, but for SIGCHLD (see :func:`catch_children`).

    SIGHUP, SIGPIPE, SIGXFSZ and SIGINT are ignored (a monitor never dies of a closed pipe or
    a terminal); SIGTERM kills. Set once in the process monitors are forked from, so that
    each monitor inherits them. (``_signal``, not ``signal``: the wrappers would run the enum
    machinery.)
    """
    for sig in (_signal.SIGHUP, _signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT):
        _signal.signal(sig, _signal.SIG_IGN)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)


def catch_children() -> None:
    """SIGCHLD runs a no-op Python handler; :meth:`Monitor.setup_process` gives it a wakeup
    descriptor. Set in the process monitors are forked from."""
    _signal.signal(_signal.SIGCHLD, _on_signal)


def _say(cid: str, message: str) -> None:
    """A diagnostic line for the server log (the monitor's stderr)."""
    try:  # noqa: SIM105 (no contextlib here)
        os.write(2, f"monitor {os.getpid()} {cid[:12]}: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def _accept(listener: _socket.socket) -> _socket.socket | None:
    """A non-blocking connection from ``listener``; None if none is waiting."""
    try:
        fd, _ = listener._accept()  # type: ignore[attr-defined]
    except (BlockingIOError, InterruptedError):
        return None
    sock = _socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


class _Client:
    """An attach client."""

    __slots__ = ("reading", "sock")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.reading = True  # until it shuts its sending side down


class Monitor:
    """The state of the monitor process (one instance per process)."""

    def __init__(self, cid: str, max_line: int = crilog.DEFAULT_MAX_LINE) -> None:
        self.cid = cid
        self.tty = False
        self.stdin_once = False
        self.log_path = ""
        self.memory_dir = ""
        self.splitters = {
            STREAM_STDOUT: crilog.LineSplitter(crilog.STDOUT, max_line),
            STREAM_STDERR: crilog.LineSplitter(crilog.STDERR, max_line),
        }
        self.ep = select.epoll()
        self.wake_r = -1
        self.log_fd = -1
        self.log_errors = 0
        #: A write stopped inside a line (the disk filled up): the line must be ended
        #: before the next one, or the two are glued into one that kubelet cannot parse.
        self.log_cut = False
        #: Output descriptors: fd -> stream id (the pty master is stdout).
        self.outputs: dict[int, int] = {}
        self.master = -1  # the pty master (tty), for resize
        self.stdin_fd = -1  # where attach input goes (-1: none, or closed for good)
        self.stdin_pending = b""
        self.stdin_closing = False
        self.stdin_owner: _Client | None = None
        self.clients_paused = False
        self.clients: dict[int, _Client] = {}
        self.ctl_clients: dict[int, _socket.socket] = {}
        self.attach_sock: _socket.socket | None = None
        self.ctl_sock: _socket.socket | None = None
        self.container_pid = -1
        self.exit_status: int | None = None
        self.exited_at = 0
        self.oom_before: int | None = None
        #: cgroup v2 ``memory.events``, watched while the container runs (see listen).
        self.events_fd = -1
        self.oom_seen: int | None = None
        #: The OOM kill count of the cgroup above the container's (the pod's), at start.
        self.pod_oom_before: int | None = None

    # -- setting up ----------------------------------------------------------------------

    def setup_process(self) -> None:
        """Become a subreaper; SIGCHLD through a wakeup pipe (see :func:`prepare_signals`)."""
        if _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.ep.register(self.wake_r, _IN)

    def create(self, conn: int, line: bytes) -> bool:
        """Fork the worker that runs ``runtime create``; False if it failed (it answered)."""
        report, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the worker)
            try:
                report.close()
                work(line, conn, theirs)
            finally:
                os._exit(1)
        theirs.close()
        try:
            msg, ancdata, _, _ = report.recvmsg(_REPORT_MAX, _CMSG_FDS)
        except OSError:
            msg, ancdata = b"", []
        report.close()
        if self.take_report(msg, ancdata):
            return True
        kill_children()  # the worker, and whatever the runtime left to us
        if msg:  # the worker thought it done: nobody has answered
            reply(
                conn, {"error": "monitor: the worker's report is malformed", "kind": KIND_INTERNAL}
            )
        return False

    def take_report(self, msg: bytes, ancdata: list[tuple[int, int, bytes]]) -> bool:
        """Adopt what the worker reported, or close what it sent if it failed (False).

        The descriptors: the log, the attach and ctl sockets, then stdout, stderr and stdin
        (if asked for) pipes, or the pty master (twice with stdin).
        """
        fds = unpack_fds(ancdata)
        fields = msg.split(b"\0")
        if len(fields) != 11 or fields[0] != b"ok":
            for fd in fds:
                os.close(fd)
            return False
        self.tty = fields[3] == b"1"
        want_stdin = fields[4] == b"1"
        if len(fds) != 3 + (1 if self.tty else 2) + want_stdin:
            for fd in fds:
                os.close(fd)
            return False
        self.log_fd = fds[0]
        self.attach_sock = _socket.socket(fileno=fds[1])
        self.ctl_sock = _socket.socket(fileno=fds[2])
        self.attach_sock.setblocking(False)
        self.ctl_sock.setblocking(False)
        self.container_pid = int(fields[1])
        oom = int(fields[2])
        self.oom_before = None if oom < 0 else oom
        self.stdin_once = fields[5] == b"1"
        max_line = int(fields[6])
        self.cid = fields[7].decode("utf-8", "surrogateescape")
        self.log_path = fields[9].decode("utf-8", "surrogateescape")
        self.memory_dir = fields[10].decode("utf-8", "surrogateescape")
        for splitter in self.splitters.values():
            splitter.max_line = max_line
        os.chdir(fields[8])
        for fd in fds[3:]:
            os.set_blocking(fd, False)
        if self.tty:
            self.master = fds[3]
            self.outputs = {fds[3]: STREAM_STDOUT}
        else:
            self.outputs = {fds[3]: STREAM_STDOUT, fds[4]: STREAM_STDERR}
        if want_stdin:
            self.stdin_fd = fds[-1]  # a pipe, or the second copy of the pty master
        return True

    def listen(self) -> None:
        """Register the attach and ctl sockets, the output and stdin with the loop."""
        assert self.attach_sock is not None and self.ctl_sock is not None
        self.ep.register(self.attach_sock.fileno(), _IN)
        self.ep.register(self.ctl_sock.fileno(), _IN)
        for fd in self.outputs:
            self.ep.register(fd, _IN)
        if self.stdin_fd >= 0:
            self.ep.register(self.stdin_fd, 0)
        self._watch_memory_events()

    def _watch_memory_events(self) -> None:
        """cgroup v2: watch the container's ``memory.events`` (the kernel signals each
        change, as POLLPRI) and keep the last OOM kill count read. Its cgroup may be gone by
        the time the container has exited and been reaped (the systemd driver's scope is
        removed by systemd as soon as it is empty), so the count is read while it lives,
        as conmon does. v1 has no such events; its cgroup stays until the runtime's delete.
        """
        if not self.memory_dir:
            return
        try:
            self.events_fd = os.open(os.path.join(self.memory_dir, "memory.events"),
                                     os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            self.ep.register(self.events_fd, select.EPOLLPRI)
        except OSError:  # not a cgroup file (EPERM: no poll support)
            os.close(self.events_fd)
            self.events_fd = -1
            return
        self._on_memory_events()
        self.pod_oom_before = read_oom_kills(os.path.dirname(self.memory_dir))

    def _on_memory_events(self) -> None:
        """Re-read ``memory.events`` (which also re-arms its POLLPRI); stop watching once
        the cgroup is gone."""
        try:
            count = oom_kill_count(os.pread(self.events_fd, 4096, 0).decode("ascii", "replace"))
        except OSError:
            self.ep.unregister(self.events_fd)
            os.close(self.events_fd)
            self.events_fd = -1
            return
        if count is not None:
            self.oom_seen = max(count, self.oom_seen or 0)

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
                    _say(self.cid, f"error on fd {fd}: {describe(e)}")
                    self._forget(fd)

    def _dispatch(self, fd: int, mask: int) -> None:
        if fd in self.outputs:
            self._on_output(fd)
        elif fd == self.wake_r:
            self._reap()
        elif fd == self.events_fd:
            self._on_memory_events()
        elif fd in self.clients:
            self._on_client(self.clients[fd], mask)
        elif fd == self.stdin_fd:
            self._on_stdin(mask)
        elif fd in self.ctl_clients:
            self._on_ctl(self.ctl_clients[fd])
        elif self.attach_sock is not None and fd == self.attach_sock.fileno():
            self._accept_attach()
        elif self.ctl_sock is not None and fd == self.ctl_sock.fileno():
            self._accept_ctl()
        else:
            self.ep.unregister(fd)

    def _forget(self, fd: int) -> None:
        """Stop watching a descriptor whose handler failed."""
        try:  # noqa: SIM105 (no contextlib here)
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        client = self.clients.pop(fd, None)
        if client is not None:
            client.sock.close()
        ctl = self.ctl_clients.pop(fd, None)
        if ctl is not None:
            ctl.close()
        if self.outputs.pop(fd, None) is not None and fd != self.master:
            os.close(fd)

    def _reap(self) -> None:
        try:
            while os.read(self.wake_r, 64):
                pass
        except OSError:  # EAGAIN: drained
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.container_pid and self.exit_status is None:
                self.exit_status = status
                self.exited_at = time.time_ns()
                if self.events_fd >= 0:
                    self._on_memory_events()  # before systemd can remove the cgroup
            # Others: the worker, or orphans of the container reparented to us (subreaper).

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
            n = os.readv(fd, _READ_BUFS)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: the pty has no other side any more
                raise
            n = 0
        sid = self.outputs[fd]
        if n:
            self._output(sid, _READ_VIEW[:n].tobytes())
            return
        self.ep.unregister(fd)
        del self.outputs[fd]
        if fd != self.master:
            os.close(fd)
        self._write_log(self.splitters[sid].flush(crilog.timestamp(time.time_ns())))

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
        if self.log_cut and data:
            data = b"\n" + data
        while data:
            try:
                n = os.write(self.log_fd, data)
            except InterruptedError:
                continue
            except OSError as e:
                # A full or broken disk: drop the entries, never stop reading the container.
                self.log_errors += 1
                if self.log_errors == 1 or self.log_errors % 1000 == 0:
                    _say(self.cid, f"cannot write the log ({self.log_errors} times): {e}")
                return
            self.log_cut = n < len(data)
            if self.log_cut and data[n - 1:n] == b"\n":
                self.log_cut = False  # stopped between two lines
            data = data[n:]

    def reopen_log(self) -> None:
        parent = os.path.dirname(self.log_path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)  # as kubelet makes log dirs
        fd = os.open(self.log_path, LOG_FLAGS, LOG_MODE)
        old, self.log_fd = self.log_fd, fd
        os.close(old)

    # -- attach --------------------------------------------------------------------------

    def _accept_attach(self) -> None:
        assert self.attach_sock is not None
        while (sock := _accept(self.attach_sock)) is not None:
            if len(self.clients) + len(self.ctl_clients) >= MAX_CLIENTS:
                sock.close()
                continue
            client = _Client(sock)
            self.clients[sock.fileno()] = client
            self.ep.register(sock.fileno(), self._client_mask(client))

    def _client_mask(self, client: _Client) -> int:
        # While stdin input waits for the container, clients are not read (they wait).
        return _IN if client.reading and not self.clients_paused else 0

    def _on_client(self, client: _Client, mask: int) -> None:
        if mask & _IN and client.reading:
            try:
                data = client.sock.recv(MAX_INPUT_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                self._stdin(client, data)
                return
            client.reading = False  # it shut its side down: no more input from it
            self.ep.modify(client.sock.fileno(), 0)
            if client is self.stdin_owner and self.stdin_once:
                self._close_stdin()
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

    def _on_stdin(self, mask: int) -> None:
        if mask & _HUP and not mask & _OUT:
            # Nobody reads the container's stdin any more (or its terminal is gone): epoll
            # would report this again and again.
            self.stdin_pending = b""
            self._close_stdin()
            self._pause_clients(False)
        else:
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
            self._pause_clients(True)
            return
        if self.stdin_fd >= 0:
            self.ep.modify(self.stdin_fd, 0)
        self._pause_clients(False)
        if self.stdin_closing:
            self._close_stdin()

    def _pause_clients(self, paused: bool) -> None:
        """Stop (or resume) reading attach clients while their input waits."""
        if paused == self.clients_paused:
            return
        self.clients_paused = paused
        for fd, client in self.clients.items():
            self.ep.modify(fd, self._client_mask(client))

    def _close_stdin(self) -> None:
        """Close the container's stdin for good (once what is pending is written)."""
        self.stdin_closing = True
        if self.stdin_pending or self.stdin_fd < 0:
            return
        self.ep.unregister(self.stdin_fd)
        # A pipe: the container reads EOF. A pty: input just stops (as in conmon and
        # containerd; our copy of the master is a dup, so the terminal is not hung up).
        os.close(self.stdin_fd)
        self.stdin_fd = -1

    # -- ctl -----------------------------------------------------------------------------

    def _accept_ctl(self) -> None:
        assert self.ctl_sock is not None
        while (sock := _accept(self.ctl_sock)) is not None:
            if len(self.clients) + len(self.ctl_clients) >= MAX_CLIENTS:
                sock.close()
                continue
            self.ctl_clients[sock.fileno()] = sock
            self.ep.register(sock.fileno(), _IN)

    def _on_ctl(self, sock: _socket.socket) -> None:
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
                winsize = b"%s%s\0\0\0\0" % (
                    height.to_bytes(2, sys.byteorder),
                    width.to_bytes(2, sys.byteorder),
                )
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, winsize)
            else:
                self.reopen_log()
            reply = b"ok"
        except ValueError as e:
            reply = b"error " + str(e).encode("utf-8", "replace")
        except OSError as e:
            reply = b"error " + describe(e).encode("utf-8", "replace")
        try:
            sock.send(reply, _NONBLOCK)
        except OSError:
            self._forget(sock.fileno())

    # -- the end -------------------------------------------------------------------------

    def finish(self) -> None:
        """The container has exited: read its output left, log it, write the exit file."""
        drained = 0
        for fd, sid in list(self.outputs.items()):
            while drained < MAX_DRAIN:
                try:
                    data = os.read(fd, MAX_OUTPUT_FRAME - 1)
                except OSError:  # EAGAIN: nothing left now; EIO: the pty is hung up
                    break
                if not data:
                    break
                drained += len(data)
                self._output(sid, data)
        ts = crilog.timestamp(time.time_ns())
        for splitter in self.splitters.values():
            self._write_log(splitter.flush(ts))
        status = self.exit_status if self.exit_status is not None else 0
        code, sig = exit_code_of(status)
        if self.events_fd >= 0:
            self._on_memory_events()
        after = read_oom_kills(self.memory_dir)
        gone = after is None
        if after is None or (self.oom_seen is not None and self.oom_seen > after):
            after = self.oom_seen  # the cgroup went with the container
        oom = oom_killed(self.oom_before, after)
        if not oom and gone and sig == _signal.SIGKILL and self.pod_oom_before is not None:
            # The cgroup was removed (the systemd driver's scope, as soon as it emptied)
            # before its count could be read. The kernel counts a kill in every ancestor
            # too: one in the pod's cgroup while this container, killed by SIGKILL, lived
            # is taken for its own; nothing finer is left to read.
            oom = oom_killed(self.pod_oom_before,
                             read_oom_kills(os.path.dirname(self.memory_dir)))
        atomic_write(EXIT_FILE, encode_exit(code, self.exited_at, oom, sig))
        for name in (ATTACH_SOCKET, CTL_SOCKET):
            try:  # noqa: SIM105 (no contextlib here)
                os.unlink(name)
            except FileNotFoundError:
                pass
        for client in self.clients.values():
            client.sock.close()


def warm_up(rounds: int = 40) -> None:
    """Run the monitor's steady-state code on dummy data, in the server, before any fork.

    Python 3.11 rewrites ("quickens" and specializes) a function's bytecode in place during
    its first executions, and builds attribute caches and shared dict keys on first use.
    Done here once, those writes land in the server's pages, which every monitor shares;
    done in each monitor, each would get its own copy of every page they touch. Runs in the
    server's directory (it binds and removes ``warm-up.sock`` there).
    """
    _prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)  # the ctypes call path (the server is none)
    out_r, out_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    mine, peer = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    chunks = (b"a line\n", b"two\nlines\n", b"x" * 200 + b"\n", b"partial ", b"more\n", b"tail")
    try:
        mine.setblocking(False)
        peer.setblocking(False)
        for _i in range(rounds):
            mon = Monitor("warm-up", 64)
            try:
                mon.log_fd = null
                mon.wake_r = wake_r
                mon.outputs = {out_r: STREAM_STDOUT}
                mon.clients = {mine.fileno(): _Client(mine)}
                mon.ep.register(mine.fileno(), _IN)
                for chunk in chunks:
                    os.write(out_w, chunk)
                    mon._dispatch(out_r, _IN)
                    try:  # noqa: SIM105 (no contextlib here)
                        peer.recv(READ_SIZE)
                    except OSError:
                        pass
                mon._dispatch(out_r, _IN)  # nothing to read: EAGAIN
                os.write(wake_w, b"x")
                mon._dispatch(wake_r, _IN)  # no child: ChildProcessError
                mon._flush_stale()
                for splitter in mon.splitters.values():
                    splitter.pending_since -= PARTIAL_FLUSH_NS
                mon._flush_stale()
                peer.send(b"input")
                mon._dispatch(mine.fileno(), _IN)  # no stdin: dropped
                _warm_setup(mon)
            finally:
                mon.ep.close()
    finally:
        for fd in (out_r, out_w, wake_r, wake_w, null):
            os.close(fd)
        mine.close()
        peer.close()


def trim_heap() -> None:
    """Give the C heap's free memory back to the kernel (glibc ``malloc_trim``), if any."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _warm_setup(mon: Monitor) -> None:
    """The monitor's one-off steps after the worker's report, on dummy descriptors."""
    out, err, stdin = os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)
    report = b"\0".join([b"ok", b"1", b"-1", b"0", b"1", b"0", b"64", b"w", b".", b"w", b""])
    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    fds = [null, a.detach(), b.detach(), out[0], err[0], stdin[1]]
    mon.take_report(report, pack_fds(fds))
    mon.listen()
    assert mon.attach_sock is not None and mon.ctl_sock is not None
    mon.attach_sock.close()
    mon.ctl_sock.close()
    for fd in (null, out[0], out[1], err[0], err[1], stdin[0], stdin[1]):
        os.close(fd)
    _reply(-1, b"")


def _reply(conn: int, data: bytes) -> None:
    try:
        os.set_blocking(conn, True)
        while data:
            data = data[os.write(conn, data) :]
    except OSError:
        pass  # the requester is gone; the container is created, so the monitor goes on


def run(conn: int, line: bytes) -> NoReturn:
    """Be the monitor of the container the request ``line`` asks for; exits the process.

    Called in a fresh child of the server (or of ``python -m moorage.monitor run``) whose
    open descriptors it does not know: all but stdio and ``conn`` (the requester's
    connection) are closed here. The inherited heap is frozen out of the garbage collector
    so that collections do not copy its pages.
    """
    gc.freeze()
    os.closerange(3, conn)
    os.closerange(conn + 1, _MAX_FD)
    code = 0
    mon = Monitor("-")
    try:
        try:
            mon.setup_process()
            created = mon.create(conn, line)
        except Exception as e:
            kill_children()
            reply(conn, {"error": f"monitor: {describe(e)}", "kind": KIND_INTERNAL})
            os._exit(1)
        if not created:
            os._exit(1)  # the worker answered (or the requester went away)
        try:
            mon.listen()
        except Exception as e:
            kill_children()  # the container too: nobody could know of it
            reply(conn, {"error": f"monitor: {describe(e)}", "kind": KIND_INTERNAL})
            os._exit(1)
        _reply(conn, b'{"pid": %d, "monitor_pid": %d}\n' % (mon.container_pid, os.getpid()))
        os.close(conn)
        mon.loop()
        mon.finish()
    except BaseException as e:  # pragma: no cover (a bug): say what, and still exit
        _say(mon.cid, f"monitor failed: {describe(e)}")
        code = 1
    os._exit(code)
