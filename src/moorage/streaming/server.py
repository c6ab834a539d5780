"""The streaming server: the HTTP endpoint behind the URLs of Exec, Attach and PortForward.

``get_exec``/``get_attach``/``get_port_forward`` check a request, keep it under a
single-use token (:mod:`.tokens`) and return ``<scheme>://<address>:<port>/<kind>/<token>``.
A connection to that URL is read with h11, its token consumed (unknown, used or expired:
404), and upgraded to SPDY/3.1 (``X-Stream-Protocol-Version`` negotiation; none offered:
400; none we speak: 403 with ``X-Accepted-Stream-Protocol-Versions``) or to WebSocket
(``Sec-WebSocket-Protocol``; none we speak: 400). Then :mod:`.remotecommand` or
:mod:`.portforward` runs the session against the :class:`~.api.Backend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

from moorage import log
from moorage.errors import InvalidArgument
from moorage.streaming import portforward, remotecommand
from moorage.streaming.api import (
    AttachRequest,
    Backend,
    ExecRequest,
    PortForwardRequest,
    Request,
    Stdio,
)
from moorage.streaming.http import BadRequest, negotiate, read_request, response
from moorage.streaming.http import Request as HttpRequest
from moorage.streaming.tokens import TokenCache
from moorage.streaming.websocket import MAX_MESSAGE, WsConnection
from moorage.util.tasks import cancel_and_wait

_log = log.get("moorage.streaming")

HEADER_PROTOCOL = "X-Stream-Protocol-Version"
HEADER_ACCEPTED = "X-Accepted-Stream-Protocol-Versions"
_KINDS = {"exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}


@dataclass(frozen=True)
class StreamingConfig:
    address: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_ttl: float = 60.0
    max_in_flight: int = 1000
    #: How long the client may take to open a session's streams (and port-forward pairs).
    stream_creation_timeout: float = 30.0
    #: A connection with no traffic either way for this long is closed (as the reference).
    idle_timeout: float = 4 * 3600.0
    #: How long a client may take to send its request head.
    request_timeout: float = 30.0


class StreamingServer:
    def __init__(self, backend: Backend, config: StreamingConfig | None = None) -> None:
        self.backend = backend
        self.config = config or StreamingConfig()
        self.tokens: TokenCache[Request] = TokenCache(self.config.token_ttl,
                                                      self.config.max_in_flight)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        context = None
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("streaming TLS needs both a certificate and a key")
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        self._server = await asyncio.start_server(
            self._on_connection, host=cfg.address or None, port=cfg.port, ssl=context,
            limit=64 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        _log.info("streaming.started", url=self.base_url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await cancel_and_wait(self._connections)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        host = self.config.address or "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and ip.is_unspecified:
            ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
        if ip is not None:
            host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{scheme}://{host}:{self.port}"

    # -- the RPCs' half ------------------------------------------------------------------

    def get_exec(self, req: ExecRequest) -> str:
        if not req.container_id:
            raise InvalidArgument("container_id is required")
        if not req.cmd:
            raise InvalidArgument("cmd is required")
        _check_streams(req.tty, req.stdin, req.stdout, req.stderr)
        return self._url("exec", req)

    def get_attach(self, req: AttachRequest) -> str:
        if not req.container_id:
            raise InvalidArgument("container_id is required")
        _check_streams(req.tty, req.stdin, req.stdout, req.stderr)
        return self._url("attach", req)

    def get_port_forward(self, req: PortForwardRequest) -> str:
        if not req.sandbox_id:
            raise InvalidArgument("pod_sandbox_id is required")
        for port in req.ports:
            if not 0 < port < 65536:
                raise InvalidArgument(f"port: {port} is not a TCP port")
        return self._url("portforward", req)

    def _url(self, kind: str, req: Request) -> str:
        return f"{self.base_url}/{kind}/{self.tokens.insert(req)}"

    # -- connections ---------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the session was ended (its exec killed); end quietly
        except Exception:
            _log.exception("streaming.connection_failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.config.request_timeout):
                req = await read_request(reader)
        except TimeoutError:
            await _reply(writer, 408, body="request head not received in time")
            return
        except BadRequest as e:
            await _reply(writer, e.status, body=str(e))
            return
        if req is None:
            return
        parts = req.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in _KINDS or not parts[1]:
            await _reply(writer, 404, body="not found")
            return
        if req.method not in ("GET", "POST"):
            await _reply(writer, 405, [("Allow", "GET, POST")], "method not allowed")
            return
        kind, token = parts
        request = self.tokens.consume(token)
        if request is None or not isinstance(request, _KINDS[kind]):
            await _reply(writer, 404, body="token not found, used or expired")
            return
        start = time.monotonic()
        outcome = await self._session(req, request, reader, writer)
        if outcome:
            _log.info("streaming.session", kind=kind, transport="websocket"
                      if req.is_websocket else "spdy", outcome=outcome,
                      duration_s=round(time.monotonic() - start, 3),
                      **_ids(request))

    async def _session(self, req: HttpRequest, request: Request,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        cfg = self.config
        if isinstance(request, PortForwardRequest):
            spdy_protocols = portforward.SPDY_PROTOCOLS
            ws_protocols = portforward.WEBSOCKET_PROTOCOLS
        else:
            spdy_protocols = remotecommand.SPDY_PROTOCOLS
            ws_protocols = remotecommand.WEBSOCKET_PROTOCOLS
        if req.is_websocket:
            protocol = await self._negotiate_websocket(req, ws_protocols, writer)
            if protocol is None:
                return "refused"
            tunnel = protocol == portforward.TUNNEL
            ports: list[int] = []
            if isinstance(request, PortForwardRequest) and not tunnel:
                try:
                    ports = portforward.websocket_ports(request.ports,
                                                        req.query.get("port", []))
                except ValueError as e:
                    await _reply(writer, 400, body=str(e))
                    return "bad request"
            accepted = await self._accept_websocket(req, protocol, writer)
            if accepted is None:
                return "refused"
            conn = WsConnection(
                reader, writer, accepted, base64_codec="base64" in protocol,
                close_signal=protocol == remotecommand.V5, initial=req.leftover,
                idle_timeout=cfg.idle_timeout, raw=tunnel)
            if isinstance(request, PortForwardRequest) and tunnel:
                return await portforward.serve_tunnel(
                    conn, self.backend, request.sandbox_id,
                    creation_timeout=cfg.stream_creation_timeout)
            if isinstance(request, PortForwardRequest):
                return await portforward.serve_websocket(conn, self.backend,
                                                         request.sandbox_id, ports)
            opts, run = self._runner(request)
            return await remotecommand.serve_websocket(conn, protocol, opts, run)
        if not req.is_spdy:
            await _reply(writer, 400, body="unable to upgrade: missing upgrade headers in "
                         "request (SPDY/3.1 or websocket)")
            return "refused"
        offered = req.tokens(HEADER_PROTOCOL)
        if not offered:
            await _reply(writer, 400, body=f"unable to upgrade: {HEADER_PROTOCOL} is required")
            return "refused"
        spdy_protocol = negotiate(offered, spdy_protocols)
        if spdy_protocol is None:
            await _reply(writer, 403, [(HEADER_ACCEPTED, p) for p in spdy_protocols],
                         f"unable to upgrade: unable to negotiate protocol: client supports "
                         f"{offered}, server accepts {spdy_protocols}")
            return "refused"
        writer.write(response(101, [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                                    (HEADER_PROTOCOL, spdy_protocol)]))
        await writer.drain()
        if isinstance(request, PortForwardRequest):
            return await portforward.serve_spdy(
                reader, writer, self.backend, request.sandbox_id, initial=req.leftover,
                creation_timeout=cfg.stream_creation_timeout, idle_timeout=cfg.idle_timeout)
        opts, run = self._runner(request)
        return await remotecommand.serve_spdy(
            reader, writer, spdy_protocol, opts, run, initial=req.leftover,
            creation_timeout=cfg.stream_creation_timeout, idle_timeout=cfg.idle_timeout)

    def _runner(self, request: ExecRequest | AttachRequest
                ) -> tuple[remotecommand.Options, remotecommand.Runner]:
        backend = self.backend
        if isinstance(request, ExecRequest):
            exec_req = request

            async def run_exec(stdio: Stdio) -> int | None:
                return await backend.exec(exec_req, stdio)

            opts = remotecommand.Options(request.stdin, request.stdout, request.stderr,
                                         request.tty, request.cmd)
            return opts, run_exec
        attach_req = request

        async def run_attach(stdio: Stdio) -> int | None:
            await backend.attach(attach_req, stdio)
            return None

        opts = remotecommand.Options(request.stdin, request.stdout, request.stderr, request.tty)
        return opts, run_attach

    @staticmethod
    async def _negotiate_websocket(req: HttpRequest, supported: list[str],
                                   writer: asyncio.StreamWriter) -> str | None:
        """The subprotocol to answer with ("" where the client offers none); None once
        400 was answered (it offers only others)."""
        offered = req.tokens("sec-websocket-protocol")
        negotiated = negotiate(offered, supported) if offered else ""
        if negotiated is None:
            await _reply(writer, 400, body=f"unable to upgrade: none of the WebSocket "
                         f"subprotocols {offered} is supported; the server accepts {supported}")
        return negotiated

    async def _accept_websocket(self, req: HttpRequest, chosen: str,
                                writer: asyncio.StreamWriter) -> ServerProtocol | None:
        protocol = ServerProtocol(
            select_subprotocol=lambda _conn, _offered: chosen or None,  # type: ignore[arg-type,return-value]
            max_size=MAX_MESSAGE)
        # The protocol object parses the handshake itself (its parser starts there): give it
        # the head h11 read, re-serialised, less the subprotocols, negotiated already: its
        # parser wants RFC 6455 tokens, and KEP-4006's "SPDY/3.1+portforward.k8s.io" (what
        # Go's gorilla/websocket sends) is not one.
        head = [f"GET {req.target} HTTP/1.1", *(f"{k}: {v}" for k, v in req.headers
                                                if k.lower() != "sec-websocket-protocol")]
        protocol.receive_data(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        events = protocol.events_received()
        if len(events) != 1 or not isinstance(events[0], WsRequest):
            await _reply(writer, 400, body="malformed WebSocket handshake")
            return None
        answer = protocol.accept(events[0])
        protocol.send_response(answer)
        for chunk in protocol.data_to_send():
            writer.write(chunk)
        await writer.drain()
        if answer.status_code != 101:
            return None
        return protocol


def _check_streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")


def _ids(request: Request) -> dict[str, str]:
    if isinstance(request, PortForwardRequest):
        return {"pod_sandbox_id": request.sandbox_id}
    return {"container_id": request.container_id}


async def _reply(writer: asyncio.StreamWriter, status: int,
                 headers: list[tuple[str, str]] | None = None, body: str = "") -> None:
    writer.write(response(status, headers, body + "\n" if body else ""))
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
