"""The front: the thread that serves gRPC, with an event loop of its own.

kubelet relists every second and asks the status of whatever changed; its PLEG marks the
runtime unhealthy when that takes too long, and every pod's status waits on it. On the
daemon's event loop those calls queued behind everything else the loop was doing (a pod's
setup, a pull's reads): tens to hundreds of milliseconds while pods start. So the gRPC
server runs here instead: read RPCs are answered on this loop from the managers' published
state (``state.published``) and only compete for the interpreter lock, which the daemon
hands over often (``daemon.SWITCH_INTERVAL``), and for a CPU, on which this thread comes
first (:data:`NICE`); every other RPC is forwarded to the daemon's loop
(``server/rpc.py``). grpc.aio binds itself to the loop it is first used on:
nothing else in the daemon uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from moorage.server.rpc import on_loop

T = TypeVar("T")

#: The nice value of the front's thread (and of the grpc threads started from it): a busy
#: node (runc, CNI plugins, a pull's helpers) delays the reads kubelet's PLEG waits on much
#: less. The thread only serves calls, so it cannot starve the node. Without the right
#: (CAP_SYS_NICE) it keeps the daemon's priority.
NICE = -10


class Front:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="moorage-grpc", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self) -> None:
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the front's loop and wait for it (from the daemon's loop)."""
        return await on_loop(self.loop, coro)

    def stop(self) -> None:
        """End the loop (once nothing runs on it: stop the server first) and the thread."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
