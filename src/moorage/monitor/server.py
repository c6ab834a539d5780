"""The monitor server: one exec'd process per node that forks a monitor per container.

Started by the daemon (:meth:`moorage.monitor.client.MonitorClient.ensure_server`) as
``python -P -S -m moorage.monitor server --runroot DIR``. The exec'd process forks the server
and exits, so the server's parent is init; the server starts its own session, listens on
``DIR/monitor/server.sock`` (``SOCK_STREAM``) and reads one line per connection:

- ``ping`` -> ``{"pid": N, "digest": "...", "version": 1}``
- ``shutdown`` -> ``{"ok": true}``; the server removes its socket and exits (running monitors
  are not affected)
- a JSON object (a create request, see ``docs/monitor.md``) -> the template (below) forks
  twice; the grandchild, whose parent is init once the middle process has exited, becomes
  the container's monitor and answers on the same connection:
  ``{"pid": P, "monitor_pid": M}`` or ``{"error": "...", "kind": K}``.

Two processes: the server proper accepts connections and reads the lines; the *template*,
forked from it once everything a monitor runs is imported and has run
(:func:`moorage.monitor.monitor.warm_up`), does nothing but receive create requests (the line
and the connection, over a socket pair) and fork. Monitors are forked from the template, so
they share its pages copy-on-write; a page that the template writes after forking a monitor
stops being shared with it, which is why the template does so little (and never decodes a
request: the monitor's worker does). The template exits when the server does; the server
exits if the template dies (the next request starts a new pair). See ``docs/monitor.md``.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: no enum wrappers
import _socket
import gc
import os
import select
import sys
import time

from moorage.monitor import monitor
from moorage.monitor.create import pack_fds
from moorage.monitor.protocol import (
    KIND_INTERNAL,
    KIND_INVALID,
    MAX_REQUEST,
    PROTOCOL_VERSION,
    SERVER_DIR,
    SERVER_LOG,
    SERVER_PID,
    SERVER_SOCKET,
    code_digest,
    dumps,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

#: A connection that has not sent its request line in this time is closed.
REQUEST_TIMEOUT = 30.0


class _Stop(Exception):
    pass


def _on_term(signum: int, frame: object) -> None:
    raise _Stop()


def _send(fd: int, data: bytes) -> None:
    try:
        os.set_blocking(fd, True)
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass


def _error(kind: str, message: str) -> bytes:
    return dumps({"error": message, "kind": kind}).encode() + b"\n"


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:  # noqa: SIM105 (no contextlib here)
        os.write(2, f"{stamp} monitor server {os.getpid()}: {message}\n".encode())
    except OSError:
        pass


_CMSG_FD = _socket.CMSG_SPACE(4)


#: A handoff process exits with this when the server has closed its end: the template ends.
_EXIT_SERVER_GONE = 3


def template(requests: _socket.socket) -> NoReturn:
    """The template's life: for each request (a packet: the line, the connection attached),
    fork twice; the grandchild becomes the monitor. Exits when the server closes its end.

    It does as little as it can: each page it writes after forking a monitor's ancestor
    becomes that monitor's own copy. (Measured: this loop, with the SIGCHLD handler set here
    and the child's code inline, leaves monitors the fewest private pages of the variants
    tried; see ``docs/monitor.md``.)
    """
    monitor.prepare_signals()  # inherited by every monitor
    monitor.catch_children()
    buf = bytearray(MAX_REQUEST)
    recvmsg_into = requests.recvmsg_into
    fork = os.fork
    while True:
        try:
            n, ancdata, _, _ = recvmsg_into((buf,), _CMSG_FD)
        except InterruptedError:
            continue
        except OSError:
            os._exit(1)
        if not ancdata:
            os._exit(0)  # the server is gone (or sent garbage)
        conn = int.from_bytes(ancdata[0][2][:4], sys.byteorder, signed=True)
        pid = fork()
        if pid == 0:  # pragma: no cover (a child)
            try:
                os.setsid()
                if fork() == 0:
                    monitor.run(conn, bytes(buf[:n]))
            except BaseException as e:
                _send(conn, _error(KIND_INTERNAL, f"monitor: {e}"))
            os._exit(0)
        os.close(conn)
        try:  # noqa: SIM105 (no context manager objects in this loop: fewer writes)
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


class Server:
    def __init__(self, listener: _socket.socket, digest: str) -> None:
        self.listener = listener
        self.lfd = listener.fileno()
        self.digest = digest
        self.ping = dumps(
            {"pid": os.getpid(), "digest": digest, "version": PROTOCOL_VERSION}
        ).encode()
        self.ep = select.epoll()
        self.ep.register(self.lfd, select.EPOLLIN)
        #: Connections whose request line is not complete: fd -> (bytes so far, since).
        self.pending: dict[int, tuple[bytes, float]] = {}
        self.ino = os.stat(SERVER_SOCKET).st_ino
        self.template: _socket.socket | None = None
        self.template_pid = -1

    def fork_template(self) -> None:
        """Fork the template (once everything is warm); watch for its end."""
        mine, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the template)
            try:
                mine.close()
                self.listener.close()
                self.ep.close()
                _null_stdio(0, 1)  # the daemon reads the server's stdout to its end
                template(theirs)
            finally:
                os._exit(1)
        theirs.close()
        self.template, self.template_pid = mine, pid
        self.ep.register(mine.fileno(), select.EPOLLIN)

    def loop(self) -> None:
        while True:
            for fd, _ in self.ep.poll(REQUEST_TIMEOUT if self.pending else -1):
                if fd == self.lfd:
                    self._accept()
                elif self.template is not None and fd == self.template.fileno():
                    raise RuntimeError("the template process is gone")
                else:
                    self._read(fd)
            if self.pending:
                self._expire()

    def _accept(self) -> None:
        while True:
            try:
                fd, _ = self.listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: try again on the next event
                _log(f"accept: {e}")
                return
            os.set_blocking(fd, False)
            self.pending[fd] = (b"", time.monotonic())
            self.ep.register(fd, select.EPOLLIN)

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, (_, since) in list(self.pending.items()):
            if now - since > REQUEST_TIMEOUT:
                self._close(fd)

    def _close(self, fd: int) -> None:
        del self.pending[fd]
        self.ep.unregister(fd)
        os.close(fd)

    def _read(self, fd: int) -> None:
        buf, since = self.pending[fd]
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(fd)
            return
        buf += chunk
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_REQUEST:
                _send(fd, _error(KIND_INVALID, "request too long"))
                self._close(fd)
            else:
                self.pending[fd] = (buf, since)
            return
        line = buf[:end]
        try:
            if line == b"ping":
                _send(fd, self.ping + b"\n")
            elif line == b"shutdown":
                self._unlink_socket()
                _send(fd, b'{"ok": true}\n')
                raise _Stop()
            else:
                self._spawn(fd, line)
        finally:
            self._close(fd)

    def _spawn(self, fd: int, line: bytes) -> None:
        """Hand the request and its connection to the template, which forks the monitor."""
        assert self.template is not None
        try:
            self.template.sendmsg([line], pack_fds([fd]))
        except OSError as e:
            _send(fd, _error(KIND_INTERNAL, f"monitor server: the template is gone: {e}"))
            raise RuntimeError("the template process is gone") from None

    def _unlink_socket(self) -> None:
        """Remove ``server.sock`` if it is still ours (a new server may have replaced it)."""
        try:
            if os.stat(SERVER_SOCKET).st_ino == self.ino:
                os.unlink(SERVER_SOCKET)
        except OSError:
            pass


def _null_stdio(*fds: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(null, fd)
    os.close(null)


def serve(runroot: str) -> NoReturn:
    """The ``server`` command: answer on stdout once listening (or failed), then serve."""
    directory = os.path.join(runroot, SERVER_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chdir(directory)  # socket names are relative: runroot may be long
    if os.fork() != 0:
        os._exit(0)  # the daemon reaps this one; the server is reparented to init
    os.setsid()
    os.umask(0o022)
    _signal.signal(_signal.SIGTERM, _on_term)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)
    log = os.open(SERVER_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.dup2(log, 2)
    os.close(log)
    try:
        try:  # noqa: SIM105 (no contextlib here)
            os.unlink(SERVER_SOCKET)
        except FileNotFoundError:
            pass
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        listener.bind(SERVER_SOCKET)
        listener.listen(128)
        listener.setblocking(False)
        server = Server(listener, code_digest())
        with open(SERVER_PID, "w") as f:
            f.write(f"{os.getpid()}\n")
        # Everything a monitor runs is imported; run it once here, then keep it all out of
        # later collections.
        monitor.warm_up()
        gc.collect()
        gc.freeze()
        monitor.trim_heap()  # what the imports and the warm-up freed: not in any monitor
        server.fork_template()
    except Exception as e:
        os.write(1, dumps({"error": f"monitor server: {e}"}).encode() + b"\n")
        os._exit(1)
    os.write(1, server.ping + b"\n")
    _null_stdio(0, 1)
    _log(f"listening (digest {server.digest})")
    try:
        server.loop()
    except _Stop:
        server._unlink_socket()
        _log("stopped")
        os._exit(0)
    except BaseException as e:
        server._unlink_socket()
        _log(f"failed: {type(e).__name__}: {e}")
        os._exit(1)
    os._exit(0)
