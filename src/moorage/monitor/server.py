"""The monitor server: one exec'd process per node that forks a monitor per container.

Started by the daemon (:meth:`moorage.monitor.client.MonitorClient.ensure_server`) as
``python -P -S -m moorage.monitor server --runroot DIR``. The exec'd process forks the server
and exits, so the server's parent is init; the server starts its own session, listens on
``DIR/monitor/server.sock`` and answers one JSON line with one JSON line:

- ``{"op": "ping"}`` -> ``{"pid": N, "digest": "...", "version": 1}``
- ``{"op": "shutdown"}`` -> ``{"ok": true}``; the server removes its socket and exits
  (running monitors are not affected)
- ``{"op": "create", <request>}`` -> the server forks twice; the grandchild (its parent is
  init once the middle process has exited) becomes the container's monitor and answers on the
  same connection, ``{"pid": P, "monitor_pid": M}`` or ``{"error": "...", "kind": K}``.

The server has imported all that a monitor runs before it forks one, so monitors share its
pages copy-on-write (see ``docs/monitor.md`` for what that saves).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import time

from moorage.monitor import monitor
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
    request_problem,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

#: A connection that has not sent its request line in this time is closed.
REQUEST_TIMEOUT = 30.0


class _Stop(Exception):
    pass


def _on_term(signum: int, frame: object) -> None:
    raise _Stop()


def _send(sock: socket.socket, doc: dict[str, Any]) -> None:
    try:
        sock.settimeout(5)
        sock.sendall(json.dumps(doc).encode() + b"\n")
    except OSError:
        pass


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with contextlib.suppress(OSError):
        os.write(2, f"{stamp} monitor server {os.getpid()}: {message}\n".encode())


class Server:
    def __init__(self, listener: socket.socket, digest: str) -> None:
        self.listener = listener
        self.digest = digest
        self.ep = select.epoll()
        self.ep.register(listener.fileno(), select.EPOLLIN)
        #: Connections whose request line is not complete: fd -> (socket, bytes, since).
        self.pending: dict[int, tuple[socket.socket, bytes, float]] = {}
        self.ino = os.stat(SERVER_SOCKET).st_ino

    def loop(self) -> None:
        while True:
            timeout = REQUEST_TIMEOUT if self.pending else -1
            for fd, _ in self.ep.poll(timeout):
                if fd == self.listener.fileno():
                    self._accept()
                else:
                    self._read(fd)
            self._expire()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: try again on the next event
                _log(f"accept: {e}")
                return
            sock.setblocking(False)
            self.pending[sock.fileno()] = (sock, b"", time.monotonic())
            self.ep.register(sock.fileno(), select.EPOLLIN)

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, (sock, _, since) in list(self.pending.items()):
            if now - since > REQUEST_TIMEOUT:
                self._drop(fd)
                sock.close()

    def _drop(self, fd: int) -> socket.socket:
        sock = self.pending.pop(fd)[0]
        self.ep.unregister(fd)
        return sock

    def _read(self, fd: int) -> None:
        sock, buf, since = self.pending[fd]
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(fd).close()
            return
        buf += chunk
        if b"\n" not in buf:
            if len(buf) > MAX_REQUEST:
                self._drop(fd)
                _send(sock, {"error": "request too long", "kind": KIND_INVALID})
                sock.close()
            else:
                self.pending[fd] = (sock, buf, since)
            return
        self._drop(fd)
        try:
            self._handle(sock, buf.split(b"\n", 1)[0])
        finally:
            sock.close()

    def _handle(self, sock: socket.socket, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError as e:
            _send(sock, {"error": f"the request is not JSON: {e}", "kind": KIND_INVALID})
            return
        op = req.get("op", "create") if isinstance(req, dict) else None
        if op == "ping":
            _send(sock, {"pid": os.getpid(), "digest": self.digest, "version": PROTOCOL_VERSION})
        elif op == "shutdown":
            self._unlink_socket()
            _send(sock, {"ok": True})
            raise _Stop()
        elif op == "create":
            problem = request_problem(req)
            if problem:
                _send(sock, {"error": problem, "kind": KIND_INVALID})
            else:
                self._spawn(sock, req)
        else:
            _send(sock, {"error": f"unknown op {op!r}", "kind": KIND_INVALID})

    def _spawn(self, sock: socket.socket, req: dict[str, Any]) -> None:
        """Fork the monitor (twice, so that its parent is init) and hand it ``sock``."""
        try:
            pid = os.fork()
        except OSError as e:
            _send(sock, {"error": f"monitor server: fork: {e.strerror}", "kind": KIND_INTERNAL})
            return
        if pid == 0:  # pragma: no cover (a child)
            try:
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                self._become_monitor(sock)
                monitor.run(sock, req)
            except BaseException as e:
                _send(sock, {"error": f"monitor: {e}", "kind": KIND_INTERNAL})
            os._exit(1)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        if status != 0:
            _send(sock, {"error": "monitor server: cannot fork a monitor", "kind": KIND_INTERNAL})

    def _become_monitor(self, keep: socket.socket) -> None:
        """In the monitor: close what belongs to the server, reset its signal handlers."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.listener.close()
        self.ep.close()
        for other, _, _ in self.pending.values():
            other.close()
        fd = keep.fileno()
        os.closerange(3, fd)
        os.closerange(fd + 1, 1 << 20)
        keep.setblocking(True)

    def _unlink_socket(self) -> None:
        """Remove ``server.sock`` if it is still ours (a new server may have replaced it)."""
        try:
            if os.stat(SERVER_SOCKET).st_ino == self.ino:
                os.unlink(SERVER_SOCKET)
        except OSError:
            pass


def _null_stdio(*fds: int) -> None:
    null = os.open("/dev/null", os.O_RDWR)
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
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log = os.open(SERVER_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.dup2(log, 2)
    os.close(log)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SERVER_SOCKET)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(SERVER_SOCKET)
        listener.listen(128)
        listener.setblocking(False)
        server = Server(listener, code_digest())
        with open(SERVER_PID, "w") as f:
            f.write(f"{os.getpid()}\n")
    except Exception as e:
        os.write(1, json.dumps({"error": f"monitor server: {e}"}).encode() + b"\n")
        os._exit(1)
    # Everything a monitor needs is imported and warm; keep it out of later collections.
    monitor.warm_up()
    gc.collect()
    gc.freeze()
    answer = {"pid": os.getpid(), "digest": server.digest, "version": PROTOCOL_VERSION}
    os.write(1, json.dumps(answer).encode() + b"\n")
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
