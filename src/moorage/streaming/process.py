"""A streaming exec: ``<runtime> exec`` wired to a client's streams.

Without a terminal the command gets pipes for what the client asked for (``/dev/null``
for the rest) straight from the runtime, which passes its stdio on. With a terminal the
runtime gets the slave of a pty made here as its stdio and runs ``exec --tty`` in the
foreground: it makes the container's terminal and relays between the two, and it applies
our terminal's size to the container's on start and on ``SIGWINCH``. So a resize is
``TIOCSWINSZ`` on our master plus ``SIGWINCH`` to the runtime. (``--console-socket``
would hand us the container's terminal directly, but runc accepts it only with
``--detach``, and a detached exec's exit status goes to its reaper, which the daemon is
not.)

The runtime's exit status is the command's (128+N for a death by signal N). Whether the
command started at all is told by the ``--pid-file`` the runtime writes once it has; if it
is missing, the runtime's error (from its ``--log``) is raised as :class:`BackendError`.
Output is copied until EOF (while it keeps coming after the exit, e.g. from a background
child holding the pipe; it stops when nothing came for ``drain_grace`` seconds).
Cancellation, or ``kill`` being set, kills the command with SIGKILL (and the runtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import struct
import tempfile
import termios
import tty as ttymod
from collections.abc import AsyncIterator, Sequence

from moorage import log
from moorage.oci.runtime import OciRuntime, parse_runc_error
from moorage.streaming.api import BackendError, Reader, Stdio, TerminalSize, Writer
from moorage.util.proc import DEVNULL, Process, spawn
from moorage.util.tasks import cancel_and_wait

_log = log.get("moorage.streaming")

READ_SIZE = 32 * 1024
#: After the exit, output is read while it keeps coming, until it pauses this long.
DRAIN_GRACE = 5.0
#: How long a killed runtime gets to reap its command and exit before its group is killed.
KILL_GRACE = 5.0


async def run_exec(
    runtime: OciRuntime,
    container_id: str,
    cmd: Sequence[str],
    stdio: Stdio,
    *,
    kill: asyncio.Event | None = None,
    drain_grace: float = DRAIN_GRACE,
) -> int:
    """Run ``cmd`` in the container through ``runtime``; its exit code (see module doc)."""
    if not cmd:
        raise BackendError("exec: the command is empty")
    tmpdir = await asyncio.to_thread(tempfile.mkdtemp, prefix="moorage-exec-",
                                     dir=runtime.exec_dir)
    pid_file = os.path.join(tmpdir, "pid")
    log_file = os.path.join(tmpdir, "log")
    args = ["--log", log_file, "--log-format", "json", "exec", "--pid-file", pid_file]
    if stdio.tty:
        args.append("--tty")
    argv = runtime.argv(*args, container_id, *cmd)
    ours = _Fds()  # descriptors to close at the end
    theirs: list[int] = []  # the child's ends, closed once it has them
    try:
        if stdio.tty:
            master, slave = os.openpty()
            ours.append(master)
            theirs.append(slave)
            ttymod.setraw(slave)
            os.set_blocking(master, False)
            child = (slave, slave, slave)
            outputs = [(master, stdio.stdout)]
            stdin_fd = master if stdio.stdin is not None else -1
        else:
            child_fds: list[int] = []
            outputs = []
            stdin_fd = -1
            for i, want in enumerate((stdio.stdin, stdio.stdout, stdio.stderr)):
                if want is None:
                    child_fds.append(DEVNULL)
                    continue
                r, w = os.pipe2(os.O_CLOEXEC)
                mine, child_end = (w, r) if i == 0 else (r, w)
                ours.append(mine)
                theirs.append(child_end)
                os.set_blocking(mine, False)
                child_fds.append(child_end)
                if i == 0:
                    stdin_fd = mine
                else:
                    outputs.append((mine, stdio.stdout if i == 1 else stdio.stderr))
            child = (child_fds[0], child_fds[1], child_fds[2])
        try:
            proc = await spawn(argv, stdin=child[0], stdout=child[1], stderr=child[2],
                               start_new_session=True)
        except OSError as e:
            raise BackendError(f"cannot run {argv[0]}: {e.strerror or e}") from e
        finally:
            for fd in theirs:
                os.close(fd)
            theirs.clear()
        return await _supervise(proc, pid_file, log_file, stdio, outputs, stdin_fd, ours,
                                kill, drain_grace, container_id)
    finally:
        ours.close_all()
        for fd in theirs:
            with contextlib.suppress(OSError):
                os.close(fd)
        await asyncio.to_thread(shutil.rmtree, tmpdir, True)


async def _supervise(proc: Process, pid_file: str, log_file: str,
                     stdio: Stdio, outputs: list[tuple[int, Writer | None]], stdin_fd: int,
                     fds: _Fds, kill: asyncio.Event | None, drain_grace: float,
                     container_id: str) -> int:
    loop = asyncio.get_running_loop()
    progress = [loop.time()]
    copiers = [asyncio.ensure_future(_copy_out(fd, w, progress)) for fd, w in outputs]
    helpers: list[asyncio.Future[None]] = []
    if stdio.stdin is not None and stdin_fd >= 0:
        helpers.append(asyncio.ensure_future(
            _copy_in(stdio.stdin, stdin_fd, fds if not stdio.tty else None)))
    if stdio.tty and stdio.resizes is not None and outputs:
        helpers.append(asyncio.ensure_future(_resize(stdio.resizes, outputs[0][0], proc.pid)))
    if kill is not None:
        helpers.append(asyncio.ensure_future(_kill_when(kill, proc, pid_file)))
    try:
        code = await proc.wait()
        while copiers:
            _done, pending = await asyncio.wait(copiers, timeout=drain_grace)
            copiers = list(pending)
            if pending and loop.time() - progress[0] >= drain_grace:
                break
        for c in copiers:
            c.cancel()
    except BaseException:
        await asyncio.shield(_kill(proc, pid_file))
        raise
    finally:
        await cancel_and_wait([*copiers, *helpers])
    if not _pid_of(pid_file):
        message = await asyncio.to_thread(_runtime_error, log_file)
        raise BackendError(f"exec in container {container_id} failed: "
                           f"{message or f'exit status {code}'}")
    return 128 - code if code < 0 else code


def _runtime_error(log_file: str) -> str:
    try:
        with open(log_file, "rb") as f:
            return parse_runc_error(f.read(256 * 1024))
    except OSError:
        return ""


def _pid_of(pid_file: str) -> int:
    try:
        with open(pid_file, "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


class _Fds:
    """Our descriptors of one exec; each closed once, whoever closes it first."""

    def __init__(self) -> None:
        self._open: set[int] = set()

    def append(self, fd: int) -> None:
        self._open.add(fd)

    def close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def close_all(self) -> None:
        for fd in list(self._open):
            self.close(fd)


# -- copying ---------------------------------------------------------------------------------


async def _ready(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _copy_out(fd: int, writer: Writer | None, progress: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            await _ready(fd, writable=False)
            continue
        except OSError as e:
            if e.errno == errno.EIO:  # a pty whose other side is all closed
                return
            raise
        if not data:
            return
        progress[0] = loop.time()
        if writer is not None:
            await writer.write(data)


async def _copy_in(reader: Reader, fd: int, closer: _Fds | None) -> None:
    """Client bytes to ``fd``; at the client's EOF the pipe is closed (``closer``), so the
    command reads EOF. A terminal has no EOF of its own (``closer`` None): nothing is done."""
    broken = False
    while data := await reader.read():
        view = memoryview(data)
        while view and not broken:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                await _ready(fd, writable=True)
            except OSError:  # EPIPE: the command closed its stdin; the rest is dropped
                broken = True
    if closer is not None:
        closer.close(fd)


async def _resize(resizes: AsyncIterator[TerminalSize], master: int, runtime_pid: int) -> None:
    async for size in resizes:
        if not (size.width and size.height):
            continue
        with contextlib.suppress(OSError):
            fcntl.ioctl(master, termios.TIOCSWINSZ,
                        struct.pack("HHHH", size.height, size.width, 0, 0))
            os.kill(runtime_pid, signal.SIGWINCH)


# -- killing ---------------------------------------------------------------------------------


async def _kill_when(event: asyncio.Event, proc: Process,
                     pid_file: str) -> None:
    await event.wait()
    await _kill(proc, pid_file)


async def _kill(proc: Process, pid_file: str) -> None:
    """SIGKILL the exec'd command (its process group: runc's init made it a session
    leader), then make sure the runtime is gone too."""
    if proc.returncode is not None:
        return
    pid = _pid_of(pid_file)
    if pid:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    else:
        # Not started yet (or the pid file is being written): stop the runtime's group so
        # no child moves on, kill its children and their groups, then the runtime's group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGSTOP)
        for child in _children(proc.pid):
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILL_GRACE):
            await proc.wait()
            return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    return kids
