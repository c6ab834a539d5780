"""The port-forward protocol: TCP connections to a pod's ports over SPDY or WebSocket.

SPDY (``portforward.k8s.io``): for each connection the client opens two streams with one
``requestid``, ``streamtype: error`` and ``streamtype: data``, both with a ``port``
header. When the pair is complete the port is dialled in the pod's network namespace and
bytes are copied both ways; a failure is written as text on the error stream. A pair that
is not complete ``creation_timeout`` after its first stream is dropped. Many pairs run at
once on one connection, which lasts until the client closes it.

WebSocket (``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io``, ``portforward.k8s.io``
or none): the ports are those of the PortForward request that made the URL (kubelet
proxies the upgrade without the client's query, as the reference server takes them from
the CRI request too); a ``?port=`` query may narrow them, or name them when the request
named none (:func:`websocket_ports`). Channel ``2i`` carries port ``i``'s data both ways
and ``2i+1`` its errors; the server first writes the port number (two bytes, little
endian) on both. One TCP connection per port; the WebSocket ends when they all have.

SPDY over WebSocket (KEP-4006, ``SPDY/3.1+portforward.k8s.io``: what client-go's
``NewSPDYOverWebsocketDialer`` speaks, so crictl's and critest's WebSocket port-forward):
the SPDY protocol above, its bytes in binary WebSocket messages (:func:`serve_tunnel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from moorage import log
from moorage.streaming.api import Backend, BackendError, Reader, Writer
from moorage.streaming.spdy.connection import SpdyConnection, SpdyStream
from moorage.streaming.websocket import WsConnection
from moorage.util.tasks import cancel_and_wait

_log = log.get("moorage.streaming")

PROTOCOL = "portforward.k8s.io"
#: KEP-4006: SPDY tunnelled through a WebSocket, the subprotocol client-go offers.
TUNNEL = "SPDY/3.1+" + PROTOCOL
SPDY_PROTOCOLS = [PROTOCOL]
WEBSOCKET_PROTOCOLS = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io", PROTOCOL, TUNNEL]
READ_SIZE = 32 * 1024


def parse_ports(values: list[str]) -> list[int]:
    """Ports of ``?port=`` query values (each may be a comma-separated list, as kubelet
    reads them); ValueError."""
    ports = []
    for value in values:
        if not value:
            raise ValueError("query parameter 'port' cannot be empty")
        for item in value.split(","):
            if not item.isdigit() or not 0 < int(item) < 65536:
                raise ValueError(f"{item!r} is not a port")
            ports.append(int(item))
    return ports


def websocket_ports(granted: tuple[int, ...], query: list[str]) -> list[int]:
    """The ports of a WebSocket port-forward: ``granted``, the PortForward request's, or
    the query's ``port`` values where a direct client sends some: those may only narrow the
    granted ones (any port, where the request named none). ValueError says why not."""
    asked = parse_ports(query)
    if not granted:
        if not asked:
            raise ValueError("no ports to forward: the PortForward request named none and "
                             "the query has no 'port' parameter")
        return asked
    outside = [p for p in asked if p not in granted]
    if outside:
        raise ValueError(f"port {outside[0]} was not in the PortForward request (ports "
                         f"{', '.join(map(str, granted))})")
    return asked or list(granted)


async def pump(sock: socket.socket, inbound: Reader, outbound: Writer) -> None:
    """Copy ``inbound`` to the socket and the socket to ``outbound`` until the target closes;
    OSError when reading from the target fails (a reset), which the caller reports on the
    error stream, as kubelet's own server does. The client's half-close shuts the socket's
    sending side down."""
    loop = asyncio.get_running_loop()

    async def up() -> None:
        while data := await inbound.read():
            await loop.sock_sendall(sock, data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    async def down() -> None:
        while data := await loop.sock_recv(sock, READ_SIZE):
            await outbound.write(data)

    sending = asyncio.ensure_future(up())
    try:
        await down()
    finally:
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending


async def forward(backend: Backend, sandbox_id: str, port: int, data_in: Reader,
                  data_out: Writer, error: Writer) -> None:
    """One forwarded connection; errors go to ``error`` as text. Closes the writers."""
    try:
        try:
            sock = await backend.dial(sandbox_id, port)
        except (BackendError, OSError) as e:
            reason = str(e.strerror if isinstance(e, OSError) and e.strerror else e)
            await error.write(
                f"error forwarding port {port} to pod {sandbox_id}: {reason}".encode())
            return
        try:
            await pump(sock, data_in, data_out)
        except OSError as e:
            await error.write(f"error forwarding port {port} to pod {sandbox_id}: "
                              f"{e.strerror or e}".encode())
        finally:
            sock.close()
    finally:
        for w in (data_out, error):
            with contextlib.suppress(Exception):
                await w.close()


@dataclass
class _Pair:
    created: float
    data: SpdyStream | None = None
    error: SpdyStream | None = None
    streams: list[SpdyStream] = field(default_factory=list)


async def serve_spdy(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    backend: Backend,
    sandbox_id: str,
    *,
    initial: bytes = b"",
    creation_timeout: float = 30.0,
    idle_timeout: float | None = None,
) -> str:
    """Port forwarding on an upgraded SPDY connection until the client closes it."""
    loop = asyncio.get_running_loop()
    pairs: dict[str, _Pair] = {}
    tasks: set[asyncio.Task[None]] = set()
    count = 0

    def on_stream(stream: SpdyStream) -> bool:
        nonlocal count
        kind = stream.header("streamtype")
        if kind not in ("data", "error"):
            return False
        rid = stream.header("requestid") or str(stream.id if kind == "error" else stream.id - 2)
        pair = pairs.setdefault(rid, _Pair(created=loop.time()))
        if kind == "error":
            stream.discard_input()
            if pair.error is not None:
                return False
            pair.error = stream
        else:
            if pair.data is not None:
                return False
            pair.data = stream
        if pair.data is not None and pair.error is not None:
            del pairs[rid]
            count += 1
            task = loop.create_task(_forward_pair(backend, sandbox_id, pair.data, pair.error))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return True

    conn = SpdyConnection(reader, writer, on_stream, initial=initial,
                          idle_timeout=idle_timeout)
    reading = asyncio.ensure_future(conn.run())
    try:
        while not conn.is_lost:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(creation_timeout, 1.0)):
                    await conn.lost.wait()
            now = loop.time()
            for rid, pair in list(pairs.items()):
                if now - pair.created >= creation_timeout:
                    del pairs[rid]
                    for stream in (pair.error, pair.data):
                        if stream is not None:
                            if stream is pair.error:
                                await stream.write(b"timed out waiting for streams")
                            await stream.close()
        return f"{count} connections"
    finally:
        await cancel_and_wait(tasks)
        await conn.close()
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading


async def _forward_pair(backend: Backend, sandbox_id: str, data: SpdyStream,
                        error: SpdyStream) -> None:
    port_text = data.header("port") or error.header("port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        await error.write(f"invalid port {port_text!r}".encode())
        await error.close()
        await data.close()
        return
    try:
        await forward(backend, sandbox_id, int(port_text), data, data, error)
    except Exception as e:  # never take the connection down for one stream
        _log.warning("portforward.failed", port=port_text, error=repr(e))


async def serve_websocket(conn: WsConnection, backend: Backend, sandbox_id: str,
                          ports: list[int]) -> str:
    """Port forwarding on an accepted WebSocket, one connection per port of the query."""
    reading = asyncio.ensure_future(conn.run())
    try:
        jobs = []
        for i, port in enumerate(ports):
            data_in, data_out, error = conn.input(2 * i), conn.output(2 * i), \
                conn.output(2 * i + 1)
            prefix = struct.pack("<H", port)
            await conn.send(2 * i, prefix)
            await conn.send(2 * i + 1, prefix)
            jobs.append(forward(backend, sandbox_id, port, data_in, data_out, error))
        work: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*jobs))
        gone: asyncio.Future[Any] = asyncio.ensure_future(conn.lost.wait())
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
        return f"{len(ports)} ports"
    finally:
        await conn.close()
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading


async def serve_tunnel(conn: WsConnection, backend: Backend, sandbox_id: str, *,
                       creation_timeout: float = 30.0, idle_timeout: float | None = None
                       ) -> str:
    """SPDY port forwarding inside an accepted raw-mode WebSocket (KEP-4006).

    The SPDY server of :func:`serve_spdy` runs unchanged on one end of a socket pair; the
    other end is copied to and from the WebSocket's binary messages, with the socket
    pair's and the WebSocket's own back pressure. The client's close ends the SPDY
    connection (EOF); the SPDY connection's end closes the WebSocket.
    """
    inner, outer = socket.socketpair()
    try:
        spdy_reader, spdy_writer = await asyncio.open_connection(sock=inner)
        ws_reader, ws_writer = await asyncio.open_connection(sock=outer)
    except BaseException:
        inner.close()
        outer.close()
        raise
    reading = asyncio.ensure_future(conn.run())

    async def up() -> None:
        source = conn.input(0)
        while data := await source.read():
            ws_writer.write(data)
            await ws_writer.drain()
        with contextlib.suppress(OSError):
            ws_writer.write_eof()

    async def down() -> None:
        while data := await ws_reader.read(READ_SIZE):
            await conn.send_raw(data)

    pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        return await serve_spdy(spdy_reader, spdy_writer, backend, sandbox_id,
                                creation_timeout=creation_timeout, idle_timeout=idle_timeout)
    finally:
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(5):
                await pumps[1]  # what the SPDY side wrote last (GOAWAY) reaches the client
        await cancel_and_wait(pumps)
        ws_writer.close()
        await conn.close()
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
