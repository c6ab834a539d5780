"""The streaming server's backend on the real runtime: containers from the
:class:`~moorage.container.manager.ContainerManager`, execs through their OCI runtime,
attach through their monitor, port-forward into their pod's network namespace.

Exec'd commands are killed when their session ends (the client left) and when their
container stops or is removed (the manager's ``stopped``/``deleted`` events); the session
then reports the kill's exit code (137).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable

from moorage.container.manager import ContainerManager
from moorage.container.model import Container, State
from moorage.errors import MoorageError
from moorage.sandbox.model import State as SandboxState
from moorage.streaming.api import AttachRequest, BackendError, ExecRequest, Stdio
from moorage.streaming.attach import ends_on_stdin_eof, run_attach
from moorage.streaming.dial import dial
from moorage.streaming.process import run_exec


class ContainerBackend:
    def __init__(self, containers: ContainerManager) -> None:
        self.containers = containers
        #: container id -> the kill switches of its running execs
        self._execs: dict[str, set[asyncio.Event]] = {}
        containers.listeners.append(self._on_event)

    def _on_event(self, event: str, c: Container) -> None:
        if event in ("stopped", "deleted"):
            for kill in self._execs.get(c.id, ()):
                kill.set()

    def _running(self, container_id: str) -> Container:
        try:
            c = self.containers.get(container_id)
        except MoorageError as e:
            raise BackendError(e.message) from None
        if c.state != State.RUNNING:
            raise BackendError(f"container {c.id} is {c.state.value}, not running")
        return c

    async def exec(self, request: ExecRequest, stdio: Stdio) -> int:
        c = self._running(request.container_id)
        runtime = self.containers.runtimes.get(c.runtime_handler)
        if runtime is None:
            raise BackendError(f"runtime handler {c.runtime_handler!r} is not configured")
        kill = asyncio.Event()
        self._execs.setdefault(c.id, set()).add(kill)
        try:
            return await run_exec(runtime, c.id, request.cmd, stdio, kill=kill)
        finally:
            kills = self._execs.get(c.id)
            if kills is not None:
                kills.discard(kill)
                if not kills:
                    del self._execs[c.id]

    async def attach(self, request: AttachRequest, stdio: Stdio) -> None:
        c = self._running(request.container_id)
        state_dir = self.containers.state_dir(c)

        def resize(width: int, height: int) -> Awaitable[None]:
            return self.containers.monitor.resize(state_dir, width, height)

        await run_attach(state_dir, stdio, resize if c.spec.tty else None,
                         end_on_stdin_eof=ends_on_stdin_eof(c.spec.stdin, c.spec.stdin_once,
                                                            c.spec.tty))

    async def dial(self, sandbox_id: str, port: int) -> socket.socket:
        sandboxes = self.containers.sandboxes
        try:
            sb = sandboxes.get(sandbox_id)
        except MoorageError as e:
            raise BackendError(e.message) from None
        if sb.state != SandboxState.READY:
            raise BackendError(f"pod sandbox {sb.id} is not ready")
        return await dial(sandboxes.pinned(sb).net, port)
