"""Small things done inside a pod's network namespace without forking.

A thread may ``setns(2)`` into another network namespace without affecting the rest of the
process. We do it only in a fresh thread that exits right after, so no thread of the daemon
(the event loop, the default executor, grpc's threads) ever changes namespace, and no thread
has to find its way back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def is_netns(path: str) -> bool:
    """Whether ``path`` is a network namespace (an nsfs inode, such as a pinned bind mount)."""
    try:
        target = os.stat(path)
        own = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return target.st_dev == own.st_dev


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


async def run_in_netns(path: str, func: Callable[[], T]) -> T:
    """Run ``func`` in a new thread that first enters the namespace at ``path``."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def worker() -> None:
        try:
            _enter(path)
            value = func()
        except BaseException as e:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(deliver, None, e)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, value, None)
        # The thread ends here, still in the pod's namespace: nothing else runs on it.

    threading.Thread(target=worker, name="moorage-netns", daemon=True).start()
    return await future


async def loopback_up(path: str) -> None:
    """Bring ``lo`` up in the network namespace at ``path`` (what ocicni does for every pod)."""
    await run_in_netns(path, _loopback_up)
