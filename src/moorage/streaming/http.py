"""HTTP/1.1 for the streaming server: read one request head with h11, answer in plain bytes.

The server answers every connection once: an upgrade (the connection then carries SPDY or
WebSocket, and the bytes h11 read past the head go to that protocol) or an error, after
which the connection is closed. Protocol negotiation helpers live here too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11

#: The largest request head accepted.
MAX_HEAD = 16 * 1024
#: A request body (none is expected) is read and dropped up to this size.
MAX_BODY = 64 * 1024

REASONS = {101: "Switching Protocols", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Request Entity Too Large", 500: "Internal Server Error"}


class BadRequest(Exception):
    """A request that is not HTTP/1.1 we can read; the message says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]  # names lower case, in order
    #: Bytes read past the head (the start of the upgraded protocol's stream).
    leftover: bytes = b""
    path: str = field(init=False)
    query: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.target)
        self.path = parts.path
        self.query = parse_qs(parts.query, keep_blank_values=True)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def get(self, name: str) -> str:
        values = self.get_all(name)
        return values[0] if values else ""

    def tokens(self, name: str) -> list[str]:
        """The comma-separated values of every ``name`` header, trimmed, in order."""
        return [t.strip() for v in self.get_all(name) for t in v.split(",") if t.strip()]

    def has_token(self, name: str, token: str) -> bool:
        return any(t.lower() == token.lower() for t in self.tokens(name))

    @property
    def wants_upgrade(self) -> bool:
        return self.has_token("connection", "upgrade")

    @property
    def is_websocket(self) -> bool:
        return self.wants_upgrade and self.get("upgrade").strip().lower() == "websocket"

    @property
    def is_spdy(self) -> bool:
        return self.wants_upgrade and self.get("upgrade").strip().lower() == "spdy/3.1"


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request's head (its body, if any, read and dropped); None on a clean EOF.

    :class:`BadRequest` for anything h11 refuses or a head/body over the limits.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    request: Request | None = None
    body = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise BadRequest(f"malformed request: {e}", e.error_status_hint) from None
        if event is h11.NEED_DATA:
            chunk = await reader.read(65536)
            try:
                conn.receive_data(chunk)
            except h11.RemoteProtocolError as e:
                raise BadRequest(f"malformed request: {e}") from None
            continue
        if isinstance(event, h11.Request):
            request = Request(
                method=event.method.decode("ascii", "replace"),
                target=event.target.decode("ascii", "replace"),
                headers=[(k.decode("latin-1").lower(), v.decode("latin-1"))
                         for k, v in event.headers],
            )
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY:
                raise BadRequest("request body too large", 413)
        elif isinstance(event, h11.ConnectionClosed):
            if request is None:
                return None
            raise BadRequest("connection closed inside the request")
        elif event is h11.PAUSED or (isinstance(event, h11.EndOfMessage)
                                     and not (request and request.wants_upgrade)):
            break
    assert request is not None
    request.leftover = bytes(conn.trailing_data[0])
    return request


def negotiate(offered: list[str], supported: list[str]) -> str | None:
    """The first of the client's protocols (in its order) that we support."""
    for proto in offered:
        if proto in supported:
            return proto
    return None


def response(status: int, headers: list[tuple[str, str]] | None = None, body: str = ""
             ) -> bytes:
    """A complete response that ends the connection."""
    raw = body.encode("utf-8")
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if status != 101:
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(raw)}",
                  "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + raw
