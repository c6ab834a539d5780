"""Dial a TCP port on localhost inside a network namespace, without forking.

A socket belongs to the network namespace it was created in, whatever thread uses it
later. So a short-lived thread of our own (never a pooled one: its namespace changes for
good) enters the pod's namespace with ``setns(2)``, creates the socket and exits; the
event loop then connects it to ``127.0.0.1`` (or ``::1`` when IPv4 refuses) like any
other socket. ``None`` as the namespace means the host's (host-network pods).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import threading

#: How long a connect may take (a full accept queue makes it wait).
CONNECT_TIMEOUT = 10.0
_CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_setns.restype = ctypes.c_int


def _socket_in(netns: str, family: int) -> socket.socket:
    """A new TCP socket of ``netns`` (runs in the calling thread, which it moves there)."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


async def socket_in(netns: str | None, family: int) -> socket.socket:
    """A non-blocking TCP socket of the namespace ``netns`` (None: ours)."""
    if netns is None:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    else:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[socket.socket] = loop.create_future()

        def settle(result: socket.socket | None, error: BaseException | None) -> None:
            if done.cancelled():
                if result is not None:
                    result.close()
            elif error is not None:
                done.set_exception(error)
            else:
                assert result is not None
                done.set_result(result)

        def work() -> None:
            try:
                sock = _socket_in(netns, family)
            except BaseException as e:
                loop.call_soon_threadsafe(settle, None, e)
            else:
                loop.call_soon_threadsafe(settle, sock, None)

        threading.Thread(target=work, name="moorage-netns-socket", daemon=True).start()
        sock = await done
    sock.setblocking(False)
    return sock


async def dial(netns: str | None, port: int, timeout: float = CONNECT_TIMEOUT
               ) -> socket.socket:
    """A connected non-blocking socket to ``localhost:port`` in ``netns``; OSError if
    neither 127.0.0.1 nor ::1 takes the connection."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = await socket_in(netns, family)
        except OSError as e:
            if e.errno == errno.EAFNOSUPPORT:
                continue
            raise
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
        except TimeoutError:
            sock.close()
            raise OSError(errno.ETIMEDOUT, f"connect to localhost:{port} timed out") from None
        except OSError as e:
            sock.close()
            code = e.errno or errno.ECONNREFUSED
            error = OSError(code, f"connect to {host} port {port}: {os.strerror(code)}")
            last = last or error  # the IPv4 answer is the one worth telling
            if code in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH):
                continue
            raise error from None
        except BaseException:
            sock.close()
            raise
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    assert last is not None
    raise last
