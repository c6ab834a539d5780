"""A streaming attach: a client joined to the container's monitor.

The monitor (see ``docs/monitor.md``) serves a ``SOCK_SEQPACKET`` attach socket in the
container's state directory: each packet it sends is one stream byte (1 stdout, 2 stderr)
and the bytes the container wrote from then on; each packet it receives is stdin; our
``shutdown(SHUT_WR)`` detaches stdin (and closes the container's stdin when it was created
with ``stdin_once``); an empty read means the container has exited, or the monitor dropped
us for not keeping up (it never blocks the container on a slow client). Terminal resizes go
to the monitor's control socket.

When the client's stdin ends (:func:`ends_on_stdin_eof`): the session ends at once for a
container with stdin, not ``stdin_once`` and no tty, which keeps running with its stdin
open (``kubectl run --attach --stdin --leave-stdin-open``: CRI-O's and containerd's rule);
otherwise it goes on until the container exits (``stdin_once``: the monitor closes the
container's stdin, so a shell reading it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from moorage.errors import MoorageError
from moorage.monitor.client import open_attach
from moorage.monitor.protocol import STREAM_STDERR
from moorage.streaming.api import BackendError, Stdio
from moorage.util.tasks import cancel_and_wait

#: The monitor reads at most 8 KiB of a packet (the rest of a longer one would be lost).
STDIN_PACKET = 4096
#: Packets from the monitor are at most 64 KiB and a stream byte.
RECV_SIZE = 128 * 1024
#: After the client's stdin ended, output is still copied until none came for this long.
STDIN_EOF_LINGER = 0.5

Resize = Callable[[int, int], Awaitable[None]]


def ends_on_stdin_eof(stdin: bool, stdin_once: bool, tty: bool) -> bool:
    """Whether an attach session ends with its client's stdin, for a container created with
    these ``stdin``, ``stdin_once`` and ``tty`` (CRI-O's rule; containerd's too without a
    tty, where it also ends the session of a tty container)."""
    return stdin and not stdin_once and not tty


async def run_attach(state_dir: Path, stdio: Stdio, resize: Resize | None = None, *,
                     end_on_stdin_eof: bool = False) -> None:
    """Copy until the container exits (or the monitor drops us), or, with
    ``end_on_stdin_eof``, until the client's stdin ends; cancellation detaches."""
    try:
        sock = await open_attach(state_dir)
    except MoorageError as e:
        raise BackendError(e.message) from None
    except OSError as e:
        raise BackendError(f"cannot attach: {e.strerror or e}") from None
    loop = asyncio.get_running_loop()
    packets = 0

    async def output() -> None:
        nonlocal packets
        while True:
            try:
                packet = await loop.sock_recv(sock, RECV_SIZE)
            except OSError:
                return
            if not packet:
                return
            packets += 1
            writer = stdio.stderr if packet[0] == STREAM_STDERR else stdio.stdout
            if writer is None and stdio.tty:
                writer = stdio.stdout
            if writer is not None and len(packet) > 1:
                await writer.write(packet[1:])

    async def stdin() -> None:
        assert stdio.stdin is not None
        while data := await stdio.stdin.read():
            for off in range(0, len(data), STDIN_PACKET):
                await loop.sock_sendall(sock, data[off:off + STDIN_PACKET])
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    async def resizes() -> None:
        assert stdio.resizes is not None and resize is not None
        async for size in stdio.resizes:
            if size.width and size.height:
                with contextlib.suppress(MoorageError, OSError):
                    await resize(size.width, size.height)

    helpers: list[asyncio.Future[None]] = []
    try:
        copying = asyncio.ensure_future(output())
        helpers.append(copying)
        ends: list[asyncio.Future[None]] = [copying]
        if stdio.stdin is not None:
            helpers.append(asyncio.ensure_future(stdin()))
            if end_on_stdin_eof:
                ends.append(helpers[-1])
        if stdio.tty and stdio.resizes is not None and resize is not None:
            helpers.append(asyncio.ensure_future(resizes()))
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        # The client's stdin ended: what the container answers to the last of it still
        # goes out, until its output pauses (``echo x | kubectl attach`` prints x).
        while not copying.done():
            before = packets
            await asyncio.wait([copying], timeout=STDIN_EOF_LINGER)
            if packets == before:
                break
        if copying.done():
            copying.result()
    finally:
        await cancel_and_wait(helpers)
        sock.close()
