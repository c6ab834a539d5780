"""Child processes started off the event loop: the drop-in for ``create_subprocess_exec``.

``asyncio.create_subprocess_exec`` forks and execs on the event-loop thread (~3 ms per
spawn in the daemon, during which no RPC is served: the "List during a pull" stalls of
docs/performance.md) and starts one more thread per child to wait for it. :func:`spawn`
runs ``subprocess.Popen`` (fork, exec, and the wait for the exec to succeed) in a small
thread pool of its own, and awaits the exit through a pidfd on the loop; pipes are read
and written on the loop with non-blocking I/O. Never ``preexec_fn``: the daemon has threads.

A child inherits the network namespace of the thread that forks it, and a pool thread that
of the thread that started it: so there is one pool per network namespace of the callers
(the daemon's loop never changes namespace, so it has one; tests move their loop's thread
into namespaces of their own). Should a pool thread ever be in another namespace than its
caller, the spawn happens on the calling thread, as ``create_subprocess_exec`` would.

A :class:`Process` has the ``pid``, ``returncode``, ``wait()``, ``communicate()``,
``send_signal()`` and ``kill()`` of ``asyncio.subprocess.Process``, with the same meanings
(``returncode`` is ``-N`` for a death by signal ``N``, ``None`` until the child is reaped,
so its pid cannot name another process while it is ``None``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL

#: Spawns in flight at once: each is a fork+exec of a few ms; a pool of its own keeps them
#: from queueing behind slow ``asyncio.to_thread`` work (storage, records).
SPAWN_THREADS = 4
_pools: dict[int, ThreadPoolExecutor] = {}
_CHUNK = 65536


def _executor(netns: int) -> ThreadPoolExecutor:
    """The pool for callers in network namespace ``netns``: its threads are started by
    those callers' submissions, so they are in that namespace too."""
    pool = _pools.get(netns)
    if pool is None:
        pool = _pools[netns] = ThreadPoolExecutor(SPAWN_THREADS,
                                                  thread_name_prefix="moorage-spawn")
    return pool


def _netns() -> int:
    """The calling thread's network namespace (its inode)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def _popen_in(netns: int, argv: Sequence[str], kwargs: dict[str, Any]
              ) -> tuple[subprocess.Popen[bytes], int] | None:
    """:func:`_popen` from a pool thread; None when that thread is in another network
    namespace than ``netns`` (the caller's)."""
    if _netns() != netns:
        return None
    return _popen(argv, kwargs)


def _popen(argv: Sequence[str], kwargs: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int]:
    popen = subprocess.Popen(argv, **kwargs)
    try:
        # Our unreaped child: its pid names it until we wait for it.
        pidfd = os.pidfd_open(popen.pid)
    except BaseException:
        with contextlib.suppress(OSError):
            popen.kill()
        popen.wait()
        _close(popen)
        raise
    return popen, pidfd


def _close(popen: subprocess.Popen[bytes]) -> None:
    for f in (popen.stdin, popen.stdout, popen.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


async def spawn(
    argv: Sequence[str],
    *,
    stdin: int | None = DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    start_new_session: bool = False,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Process:
    """Start ``argv`` from a worker thread; raises ``OSError`` as Popen does (missing or
    non-executable binary, ...). ``stdin``/``stdout``/``stderr``: :data:`PIPE`,
    :data:`DEVNULL`, a file descriptor (the caller keeps and closes it) or None (inherit).

    If the awaiting task is cancelled while the spawn runs, the child is killed and reaped
    in the background: no process is left behind that nobody waits for.
    """
    kwargs: dict[str, Any] = {
        "stdin": stdin, "stdout": stdout, "stderr": stderr,
        "start_new_session": start_new_session, "cwd": cwd,
        "env": dict(env) if env is not None else None, "close_fds": True,
    }
    loop = asyncio.get_running_loop()
    argv = list(argv)
    netns = _netns()
    future = loop.run_in_executor(_executor(netns), _popen_in, netns, argv, kwargs)
    try:
        spawned = await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_kill_orphan)
        raise
    if spawned is None:  # the caller is in a network namespace of its own: fork here
        spawned = _popen(argv, kwargs)
    popen, pidfd = spawned
    return Process(popen, pidfd, loop)


def _kill_orphan(
        future: asyncio.Future[tuple[subprocess.Popen[bytes], int] | None]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    spawned = future.result()
    if spawned is None:  # the caller would have spawned it itself: nothing was started
        return
    popen, pidfd = spawned
    proc = Process(popen, pidfd, asyncio.get_running_loop())  # reaps it when it exits
    proc.kill()
    _close(popen)


class Process:
    """A child started by :func:`spawn`; its exit is awaited on ``loop`` through a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self._pidfd = pidfd
        self._loop = loop
        self.pid = popen.pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = loop.create_future()
        loop.add_reader(pidfd, self._on_exit)  # a pidfd is readable once the child exited

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        # Exited: the wait only reaps the zombie (it cannot block).
        self.returncode = self._popen.wait()
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        """Signal the child; ``ProcessLookupError`` once it has been reaped."""
        if self.returncode is not None:
            raise ProcessLookupError(errno.ESRCH, "the process has exited")
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes, bytes]:
        """Write ``input`` to stdin (then close it), read stdout and stderr to their end,
        wait for the exit. Streams that are not pipes give ``b""``."""
        p = self._popen
        try:
            jobs = [_write_all(self._loop, p.stdin, input or b""), _read_all(self._loop, p.stdout),
                    _read_all(self._loop, p.stderr)]
            _, out, err = await asyncio.gather(*jobs)
            await self.wait()
        finally:
            _close(p)
        return out or b"", err or b""


async def _read_all(loop: asyncio.AbstractEventLoop, f: IO[bytes] | None) -> bytes | None:
    if f is None:
        return None
    fd = f.fileno()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            data = b""
            if not done.done():
                done.set_exception(e)
        if data:
            chunks.append(data)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


async def _write_all(loop: asyncio.AbstractEventLoop, f: IO[bytes] | None, data: bytes
                     ) -> None:
    """Write ``data`` and close; a reader that went away (EPIPE) ends it quietly, as
    ``Popen.communicate`` does."""
    if f is None:
        return
    fd = f.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)
    done: asyncio.Future[None] = loop.create_future()

    def writable() -> None:
        nonlocal view
        try:
            while view:
                view = view[os.write(fd, view):]
        except (BlockingIOError, InterruptedError):
            return
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError as e:
            if not done.done():
                done.set_exception(e)
            return
        if not done.done():
            done.set_result(None)

    writable()
    if not done.done():
        loop.add_writer(fd, writable)
        try:
            await done
        finally:
            loop.remove_writer(fd)
    else:
        await done
    with contextlib.suppress(OSError):
        f.close()
