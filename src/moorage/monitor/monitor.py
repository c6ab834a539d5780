"""One container's monitor: its stdio or pty, the CRI log, attach, ctl, and its exit.

:func:`run` is called in a process forked for one container (by the monitor server, or by
``python -m moorage.monitor run``) and never returns. That process is its own session, its
parent is init, it holds no descriptor of the daemon, and it lives as long as the container:

1. it becomes a child subreaper, makes the container's pipes, and forks a worker
   (:mod:`moorage.monitor.create`) that runs ``runtime create`` and exits;
2. it binds ``attach`` and ``ctl`` in the state directory, writes ``monitor.pid`` and
   answers the requester;
3. its event loop (``epoll``) logs the container's output, serves attach and ctl clients
   and reaps children (``SIGCHLD`` through a wakeup pipe);
4. when the container's init exits it reads the output left, writes the exit file, exits.

Memory is the design constraint (see ``docs/monitor.md``): each page this process writes is
its own copy of the server's page. So the one-off work is done in the worker, the inherited
objects are frozen out of the garbage collector, the loop uses C functions (``os``,
``epoll``, ``_signal``) rather than their Python wrappers, reads :data:`READ_SIZE` bytes at
a time and holds at most ``log_max_line`` bytes of a partial line per stream.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: no enum wrappers
import contextlib
import ctypes
import errno
import fcntl
import gc
import os
import select
import socket
import struct
import termios
import time

from moorage.monitor import crilog
from moorage.monitor.create import (
    LOG_FLAGS,
    LOG_MODE,
    Stdio,
    describe,
    kill_children,
    reply,
    work,
)
from moorage.monitor.protocol import (
    ATTACH_SOCKET,
    CTL_SOCKET,
    EXIT_FILE,
    KIND_INTERNAL,
    MAX_CTL,
    MONITOR_PID,
    STREAM_STDERR,
    STREAM_STDOUT,
    encode_exit,
    exit_code_of,
    oom_killed,
    parse_ctl,
    read_oom_kills,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

#: Bytes read from the container's output (and from an attach client) at a time; conmon's
#: buffer size. Small buffers keep the monitor's heap, so its private memory, small.
READ_SIZE = 8192
#: A partial line waits this long for its end before it is logged as a ``P`` entry.
PARTIAL_FLUSH_NS = 1_000_000_000
#: At most this many attach and ctl clients at once; more are refused.
MAX_CLIENTS = 64
#: Output read after the container's exit (from processes still holding its pipes) is capped.
MAX_DRAIN = 16 * 1024 * 1024

_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HUP = select.EPOLLHUP | select.EPOLLERR
_NONBLOCK = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_CMSG_FDS = socket.CMSG_SPACE(4 * struct.calcsize("i"))


def _on_signal(signum: int, frame: object) -> None:
    """SIGCHLD: the wakeup descriptor has the byte the event loop needs."""


def _say(cid: str, message: str) -> None:
    """A diagnostic line for the server log (the monitor's stderr)."""
    with contextlib.suppress(OSError):
        os.write(2, f"monitor {os.getpid()} {cid[:12]}: {message}\n".encode("utf-8", "replace"))


def _atomic_write(name: str, data: bytes) -> None:
    tmp = name + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, name)


def _listen(name: str) -> socket.socket:
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
        self.reading = True  # until it shuts its sending side down


class Monitor:
    """The state of the monitor process (one instance per process)."""

    def __init__(self, req: dict[str, Any]) -> None:
        self.req = req
        self.cid: str = req["id"]
        self.tty: bool = bool(req.get("tty"))
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
        self.log_errors = 0
        #: Output descriptors: fd -> stream id (the pty master is stdout).
        self.outputs: dict[int, int] = {}
        self.master = -1  # the pty master (tty), for resize
        self.stdin_fd = -1  # where attach input goes (-1: none, or closed for good)
        self.stdin_pending = b""
        self.stdin_closing = False
        self.stdin_owner: _Client | None = None
        self.clients_paused = False
        self.clients: dict[int, _Client] = {}
        self.ctl_clients: dict[int, socket.socket] = {}
        self.attach_sock: socket.socket | None = None
        self.ctl_sock: socket.socket | None = None
        self.container_pid = -1
        self.exit_status: int | None = None
        self.exited_at = 0
        self.oom_before: int | None = None

    # -- setting up ----------------------------------------------------------------------

    def setup_process(self) -> None:
        os.chdir(self.req["state_dir"])
        if _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
        # _signal, not signal: its wrappers would run (and copy) the enum machinery.
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)  # the server's handler is not ours
        for sig in (_signal.SIGHUP, _signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT):
            _signal.signal(sig, _signal.SIG_IGN)
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, _on_signal)
        self.ep.register(self.wake_r, _IN)

    def create(self, conn: socket.socket) -> bool:
        """Fork the worker that runs ``runtime create``; False if it failed (it answered)."""
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        theirs = [null]  # the container's ends, closed here once the worker has them
        if self.tty:
            stdio = Stdio(null, null, null, -1)
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            theirs += [out_w, err_w]
            stdin = null
            if self.req.get("stdin"):
                stdin, self.stdin_fd = os.pipe2(os.O_CLOEXEC)
                theirs.append(stdin)
                os.set_blocking(self.stdin_fd, False)
            for fd in (out_r, err_r):
                os.set_blocking(fd, False)
            self.outputs = {out_r: STREAM_STDOUT, err_r: STREAM_STDERR}
            stdio = Stdio(stdin, out_w, err_w, err_r)
        report, theirs_report = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the worker)
            try:
                report.close()
                work(self.req, conn, stdio, theirs_report)
            finally:
                os._exit(1)
        theirs_report.close()
        for fd in theirs:
            os.close(fd)
        try:
            msg, ancdata, _, _ = report.recvmsg(64, _CMSG_FDS)
        except OSError:
            msg, ancdata = b"", []
        report.close()
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(data) // 4
                fds += struct.unpack(f"{n}i", data[: n * 4])
        words = msg.split()
        if len(words) != 3 or words[0] != b"ok":
            for fd in fds:
                os.close(fd)
            kill_children()  # the worker, and what the runtime left to us
            return False
        self.container_pid = int(words[1])
        oom = int(words[2])
        self.oom_before = None if oom < 0 else oom
        if self.tty:
            if not fds:
                kill_children()
                return False
            self.master = fds.pop(0)
            os.set_blocking(self.master, False)
            self.outputs = {self.master: STREAM_STDOUT}
            if self.req.get("stdin"):
                self.stdin_fd = os.dup(self.master)  # its own epoll registration
        for fd in fds:
            os.close(fd)
        return True

    def listen(self) -> None:
        """The log, the attach and ctl sockets, ``monitor.pid``; all registered with the loop."""
        self.log_fd = os.open(self.log_path, LOG_FLAGS, LOG_MODE)  # the worker made it
        self.attach_sock = _listen(ATTACH_SOCKET)
        self.ctl_sock = _listen(CTL_SOCKET)
        self.ep.register(self.attach_sock.fileno(), _IN)
        self.ep.register(self.ctl_sock.fileno(), _IN)
        for fd in self.outputs:
            self.ep.register(fd, _IN)
        if self.stdin_fd >= 0:
            self.ep.register(self.stdin_fd, 0)
        _atomic_write(MONITOR_PID, b"%d\n" % os.getpid())

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
        elif fd in self.clients:
            self._on_client(self.clients[fd], mask)
        elif fd == self.stdin_fd:
            self._flush_stdin()
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
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)
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
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: the pty has no other side any more
                raise
            data = b""
        sid = self.outputs[fd]
        if data:
            self._output(sid, data)
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
            data = data[n:]

    def reopen_log(self) -> None:
        parent = os.path.dirname(self.log_path)
        if parent:
            os.makedirs(parent, mode=0o750, exist_ok=True)
        fd = os.open(self.log_path, LOG_FLAGS, LOG_MODE)
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
        return _IN if client.reading and not self.clients_paused else 0

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

    def _on_ctl(self, sock: socket.socket) -> None:
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
                    data = os.read(fd, READ_SIZE * 8)
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
        oom = oom_killed(self.oom_before, read_oom_kills(self.memory_dir))
        _atomic_write(EXIT_FILE, encode_exit(code, self.exited_at, oom, sig))
        for name in (ATTACH_SOCKET, CTL_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        for client in self.clients.values():
            client.sock.close()


def warm_up(rounds: int = 40) -> None:
    """Run the monitor's steady-state code on dummy data, in the server, before any fork.

    Python 3.11 rewrites ("quickens" and specializes) a function's bytecode in place during
    its first executions, and builds attribute caches and shared dict keys on first use.
    Done here once, those writes land in the server's pages, which every monitor shares;
    done in each monitor, each would get its own copy of every page they touch.
    """
    req = {"id": "warm-up", "log_path": os.devnull, "log_max_line": 64, "state_dir": "/"}
    out_r, out_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    chunks = (b"a line\n", b"two\nlines\n", b"x" * 200 + b"\n", b"partial ", b"more\n", b"tail")
    try:
        mine.setblocking(False)
        peer.setblocking(False)
        for _i in range(rounds):
            mon = Monitor(req)
            try:
                mon.log_fd = null
                mon.wake_r = wake_r
                mon.outputs = {out_r: STREAM_STDOUT}
                mon.clients = {mine.fileno(): _Client(mine)}
                mon.ep.register(mine.fileno(), _IN)
                for chunk in chunks:
                    os.write(out_w, chunk)
                    mon._dispatch(out_r, _IN)
                    with contextlib.suppress(OSError):
                        peer.recv(READ_SIZE)
                mon._dispatch(out_r, _IN)  # nothing to read: EAGAIN
                os.write(wake_w, b"x")
                mon._dispatch(wake_r, _IN)  # no child: ChildProcessError
                mon._flush_stale()
                for splitter in mon.splitters.values():
                    splitter.pending_since -= PARTIAL_FLUSH_NS
                mon._flush_stale()
                peer.send(b"input")
                mon._dispatch(mine.fileno(), _IN)  # no stdin: dropped
            finally:
                mon.ep.close()
    finally:
        for fd in (out_r, out_w, wake_r, wake_w, null):
            os.close(fd)
        mine.close()
        peer.close()


def _reply(conn: socket.socket, data: bytes) -> None:
    try:
        conn.settimeout(5)
        conn.sendall(data)
    except OSError:
        pass  # the requester is gone; the container is created, so the monitor goes on


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
            created = mon.create(conn)
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
        conn.close()
        mon.loop()
        mon.finish()
    except BaseException as e:  # pragma: no cover (a bug): say what, and still exit
        _say(mon.cid, f"monitor failed: {describe(e)}")
        code = 1
    os._exit(code)
