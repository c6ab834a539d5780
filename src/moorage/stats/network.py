"""Network counters of pods: ``/proc/net/dev`` read inside each pod's network namespace.

The daemon never forks (grpc's threads would not survive it) and no thread of its pools may
change namespace. So one short-lived thread is started per collection: it ``setns(2)``-es
into each pod's pinned network namespace in turn, reads ``/proc/thread-self/net/dev``
(``/proc/self/net`` would show the namespace of the process's main thread), and ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["InterfaceStats", "parse_net_dev", "read_namespaces", "read_netns_sync"]

CLONE_NEWNET = 0x40000000
DEFAULT_INTERFACE = "eth0"

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class InterfaceStats:
    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


def parse_net_dev(text: str) -> list[InterfaceStats]:
    """``/proc/net/dev``: two header lines, then ``name: <8 rx fields> <8 tx fields>``.

    The receive fields are bytes packets errs drop fifo frame compressed multicast; the
    transmit ones bytes packets errs drop fifo colls carrier compressed.
    """
    out = []
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        if len(fields) < 16 or not all(f.isdigit() for f in fields[:16]):
            continue
        v = [int(f) for f in fields[:16]]
        out.append(InterfaceStats(
            name=name.strip(), rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2],
            rx_dropped=v[3], tx_bytes=v[8], tx_packets=v[9], tx_errors=v[10],
            tx_dropped=v[11],
        ))
    return out


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def read_netns_sync(paths: Sequence[str]) -> dict[str, list[InterfaceStats] | OSError]:
    """Read every namespace in ``paths`` from the calling thread, which is left in the last
    one: call it only on a thread that ends right after (see :func:`read_namespaces`)."""
    out: dict[str, list[InterfaceStats] | OSError] = {}
    for path in paths:
        try:
            _setns(path)
            with open("/proc/thread-self/net/dev") as f:
                out[path] = parse_net_dev(f.read())
        except OSError as e:
            out[path] = e
    return out


async def read_namespaces(paths: Sequence[str]) -> dict[str, list[InterfaceStats] | OSError]:
    """Interface counters of each network namespace (a pinned path) in ``paths``; a
    namespace that cannot be entered maps to its OSError."""
    if not paths:
        return {}
    loop = asyncio.get_running_loop()
    future: asyncio.Future[dict[str, list[InterfaceStats] | OSError]] = loop.create_future()

    def deliver(result: dict[str, list[InterfaceStats] | OSError] | None,
                error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def worker() -> None:
        try:
            result = read_netns_sync(list(paths))
        except BaseException as e:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(deliver, None, e)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, result, None)
        # The thread ends here, inside a pod's namespace: nothing else ever runs on it.

    threading.Thread(target=worker, name="moorage-netstats", daemon=True).start()
    return await future


def default_interface(interfaces: Sequence[InterfaceStats]) -> InterfaceStats | None:
    """``eth0`` (what CNI plugins name the pod's interface), else the first that is not
    ``lo``."""
    others = [i for i in interfaces if i.name != "lo"]
    for iface in others:
        if iface.name == DEFAULT_INTERFACE:
            return iface
    return others[0] if others else None
