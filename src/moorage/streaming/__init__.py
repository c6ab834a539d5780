"""The streaming server of Exec, Attach and PortForward (see ``docs/streaming.md``)."""

from moorage.streaming.api import (
    AttachRequest,
    Backend,
    BackendError,
    ExecRequest,
    PortForwardRequest,
    Stdio,
    TerminalSize,
)
from moorage.streaming.server import StreamingConfig, StreamingServer

__all__ = [
    "AttachRequest",
    "Backend",
    "BackendError",
    "ExecRequest",
    "PortForwardRequest",
    "Stdio",
    "StreamingConfig",
    "StreamingServer",
    "TerminalSize",
]
