"""What the streaming layers share: the requests a token stands for, the byte streams a
session hands to the backend, and the backend's interface.

Transports (SPDY, WebSocket) turn their streams and channels into :class:`Reader` and
:class:`Writer`; the protocols (remote command, port forward) put them together as
:class:`Stdio` or data/error pairs; the :class:`Backend` runs the command, joins the
container's output, or dials the pod's port. None of these types knows a socket format.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: tuple[str, ...]
    tty: bool = False
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    #: The ports the caller named (may be empty: SPDY clients name a port per stream).
    ports: tuple[int, ...] = ()


Request = ExecRequest | AttachRequest | PortForwardRequest


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


class Reader(Protocol):
    """Bytes from the client (stdin, port-forward data)."""

    async def read(self) -> bytes:
        """The next bytes; ``b""`` once the client has closed its side (or is gone)."""
        ...


class Writer(Protocol):
    """Bytes to the client (stdout, stderr, status, port-forward data)."""

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while the connection's send buffer is full. Data for a
        stream the client has reset, or a connection that is gone, is dropped."""
        ...

    async def close(self) -> None:
        """Half-close: the client reads EOF (a no-op where the transport has no such
        signal). Idempotent."""
        ...


@dataclass
class Stdio:
    """The client's side of a command's standard streams, as the request asked for them."""

    stdin: Reader | None
    stdout: Writer | None
    stderr: Writer | None
    #: Terminal sizes from the client, in order (tty sessions only).
    resizes: AsyncIterator[TerminalSize] | None
    tty: bool = False


class BackendError(Exception):
    """The backend could not do what a session asked (sent to the client as an error)."""


class Backend(Protocol):
    """What the streaming server needs of the rest of the runtime."""

    async def exec(self, request: ExecRequest, stdio: Stdio) -> int:
        """Run the command with ``stdio`` until it exits; its exit code. Cancellation
        kills it. :class:`BackendError` if it cannot be started."""
        ...

    async def attach(self, request: AttachRequest, stdio: Stdio) -> None:
        """Join the container's streams until it exits or the client leaves."""
        ...

    async def dial(self, sandbox_id: str, port: int) -> socket.socket:
        """A connected non-blocking TCP socket to ``localhost:port`` in the pod's network
        namespace; :class:`BackendError` (or ``OSError``) if it cannot be had."""
        ...
