"""A pod's namespaces, created by the exec'd pinner and pinned by bind mounts; its infra process.

The daemon never unshares or forks itself (grpc's threads do not survive a bare fork): it
fork+execs ``python -m moorage.sandbox.pinns`` (see that package for the two commands and
their JSON answers) and turns the answer into a :class:`PinnedNamespaces`, a pid, an
:class:`~moorage.errors.InvalidArgument` (the helper refused the request) or a
:class:`NamespaceError` (the machine failed).

Pins live at ``<ns_dir>/<type>/<sandbox id>``: a path is known from the id alone, so a
daemon killed at any point leaves only pins that :func:`unpin` of those paths removes.
Unpinning and stopping the infra process are a few syscalls, done in the daemon (a thread
for the unmounts; a pidfd on the event loop for the wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import signal
import stat
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from moorage.errors import Internal, InvalidArgument
from moorage.sandbox.pinns import __main__ as pinns_helper
from moorage.sandbox.pinns import (
    hostname_problem,
    id_problem,
    sysctl_namespace,
    sysctl_problem,
)
from moorage.util.helper import helper_env
from moorage.util.idmap import IdMapping
from moorage.util.proc import DEVNULL, PIPE, spawn

HELPER_MODULE = "moorage.sandbox.pinns"
#: Exit code of the helper when it refused the request (1 is a failure of the machine).
EXIT_REFUSED = 2
#: How long :func:`stop_infra` waits for a SIGKILLed infra process to exit.
STOP_TIMEOUT = 10.0
#: How long a cancelled :func:`start_infra` lets the helper finish (so its child is known).
_CANCEL_GRACE = 5.0
_STDERR_TAIL = 2000
_MNT_DETACH = 2
_NO_SYSCTLS: Mapping[str, str] = MappingProxyType({})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class NamespaceError(Internal):
    """Namespaces could not be created, pinned, unpinned, or the infra process handled."""


@dataclass(frozen=True)
class PinnedNamespaces:
    """Paths of a pod's pinned namespaces; ``None`` where the pod uses the host's."""

    net: str | None = None
    ipc: str | None = None
    uts: str | None = None
    #: The pod's user namespace (it owns the others); None: the host's.
    user: str | None = None

    def paths(self) -> list[str]:
        """Every pin, the user namespace last (the others hold a reference to it anyway)."""
        return [p for p in (self.net, self.ipc, self.uts, self.user) if p is not None]


@dataclass(frozen=True)
class UserMappings:
    """The uid and gid mappings of a new user namespace."""

    uids: tuple[IdMapping, ...]
    gids: tuple[IdMapping, ...]


# -- validation ------------------------------------------------------------------------------


def validate_sysctls(sysctls: Mapping[str, str], *, host_network: bool, host_ipc: bool) -> None:
    """Refuse sysctls a pod may not set, naming the first one.

    Only namespaced sysctls are allowed: ``net.*`` (not with the host network), and
    ``kernel.shm*``, ``kernel.msg*``, ``kernel.sem``, ``fs.mqueue.*`` (not with host IPC).
    Whether the kernel knows the name, and takes the value, is for the pinner to find out.
    """
    for key, value in sysctls.items():
        problem = sysctl_problem(key, value)
        if problem:
            raise InvalidArgument(f"config.linux.sysctls: {problem}")
        ns = sysctl_namespace(key)
        if ns is None:
            raise InvalidArgument(
                f"config.linux.sysctls: sysctl {key!r} is not namespaced; a pod may set only "
                "net.*, kernel.shm*, kernel.msg*, kernel.sem and fs.mqueue.*"
            )
        if ns == "net" and host_network:
            raise InvalidArgument(
                f"config.linux.sysctls: sysctl {key!r} cannot be set in a pod that uses the "
                "host network namespace"
            )
        if ns == "ipc" and host_ipc:
            raise InvalidArgument(
                f"config.linux.sysctls: sysctl {key!r} cannot be set in a pod that uses the "
                "host IPC namespace"
            )


def pin_argv(
    ns_dir: Path,
    sandbox_id: str,
    *,
    net: bool,
    ipc: bool,
    uts: bool,
    hostname: str = "",
    sysctls: Mapping[str, str] = _NO_SYSCTLS,
    user: UserMappings | None = None,
) -> list[str]:
    """The helper's arguments (after ``-m moorage.sandbox.pinns``) for :func:`pin`."""
    argv = ["--dir", str(ns_dir), "--id", sandbox_id]
    if user is not None:
        argv.append("--user")
        for option, mappings in (("--uid-map", user.uids), ("--gid-map", user.gids)):
            for m in mappings:
                argv += [option, f"{m.container_id}:{m.host_id}:{m.length}"]
    argv += [f"--{t}" for t, wanted in (("net", net), ("ipc", ipc), ("uts", uts)) if wanted]
    if hostname:
        argv += ["--hostname", hostname]
    for key, value in sysctls.items():
        argv += ["--sysctl", f"{key}={value}"]
    return argv


def infra_argv(
    pinned: PinnedNamespaces, cgroup_procs: Sequence[Path], command: Sequence[str]
) -> list[str]:
    """The helper's arguments for :func:`start_infra`."""
    argv = ["infra"]
    for option, path in (
        ("--user-ns", pinned.user),
        ("--net-ns", pinned.net),
        ("--ipc-ns", pinned.ipc),
        ("--uts-ns", pinned.uts),
    ):
        if path is not None:
            argv += [option, path]
    for procs in cgroup_procs:
        argv += ["--cgroup-procs", str(procs)]
    return [*argv, "--", *command]


# -- pinning ---------------------------------------------------------------------------------


async def pin(
    ns_dir: Path,
    sandbox_id: str,
    *,
    net: bool,
    ipc: bool,
    uts: bool,
    hostname: str = "",
    sysctls: Mapping[str, str] = _NO_SYSCTLS,
    user: UserMappings | None = None,
) -> PinnedNamespaces:
    """Create the asked-for namespaces and pin them at ``ns_dir/<type>/<sandbox_id>``.

    ``ns_dir`` must be absolute; its ``<type>`` subdirectories are created (mode 0700).
    With ``user``, a user namespace with those mappings is created first and owns the
    others (pinned at ``ns_dir/user/<sandbox_id>``).

    ``hostname`` is set in the new UTS namespace and ``sysctls`` in the new network and IPC
    namespaces (each must belong to one of them). On any failure, and on cancellation,
    nothing stays pinned. Raises :class:`InvalidArgument` for a request the kernel or the
    rules refuse, :class:`NamespaceError` when the machine fails.
    """
    problem = id_problem(sandbox_id) or hostname_problem(hostname)
    if problem:
        raise InvalidArgument(problem)
    if hostname and not uts:
        raise InvalidArgument(f"hostname {hostname!r} needs a new UTS namespace")
    validate_sysctls(sysctls, host_network=not net, host_ipc=not ipc)
    if not ns_dir.is_absolute():
        raise InvalidArgument(f"namespace directory {ns_dir} is not an absolute path")
    expected = PinnedNamespaces(
        net=str(ns_dir / "net" / sandbox_id) if net else None,
        ipc=str(ns_dir / "ipc" / sandbox_id) if ipc else None,
        uts=str(ns_dir / "uts" / sandbox_id) if uts else None,
        user=str(ns_dir / "user" / sandbox_id) if user is not None else None,
    )
    if not expected.paths():
        return expected
    argv = pin_argv(
        ns_dir, sandbox_id, net=net, ipc=ipc, uts=uts, hostname=hostname, sysctls=sysctls,
        user=user,
    )
    what = f"pinning namespaces of sandbox {sandbox_id}"
    # Without a user namespace the helper's work runs in a fresh thread of this process
    # (net, IPC and UTS namespaces are per thread; the thread ends once they are pinned):
    # no interpreter to start per pod.
    run = _run_helper if user is not None else _run_in_thread
    try:
        returncode, answer, stderr = await run(argv)
    except BaseException:
        # Killed half-way (cancelled): its pins are where they would be. A few syscalls.
        _unpin_paths(expected.paths(), strict=False)
        raise
    if returncode == 0 and answer is not None:
        got = PinnedNamespaces(
            net=_str_or_none(answer.get("net")),
            ipc=_str_or_none(answer.get("ipc")),
            uts=_str_or_none(answer.get("uts")),
            user=_str_or_none(answer.get("user")),
        )
        if got == expected:
            return got
        await unpin(expected)
        raise NamespaceError(f"{what}: the helper pinned {got}, not {expected}")
    if answer is None or not isinstance(answer.get("error"), str):
        # Crashed or killed without an answer: clean its deterministic paths.
        await unpin(expected)
        raise NamespaceError(_no_answer(what, returncode, stderr))
    if returncode == EXIT_REFUSED:
        raise InvalidArgument(f"sandbox {sandbox_id}: {answer['error']}")
    raise NamespaceError(f"{what}: {answer['error']}")


async def unpin(pinned: PinnedNamespaces) -> None:
    """Unmount (lazily) and remove every pin; missing or unmounted paths are fine."""
    paths = pinned.paths()
    if paths:
        await asyncio.to_thread(_unpin_paths, paths, strict=True)


def _unpin_paths(paths: Sequence[str], *, strict: bool) -> None:
    failures: list[str] = []
    for path in paths:
        try:
            for _ in range(8):  # a path pinned twice needs two unmounts
                if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
                    err = ctypes.get_errno()
                    if err in (errno.EINVAL, errno.ENOENT):
                        break
                    raise OSError(err, os.strerror(err), path)
            # Removing the file also drops copies of the mount in other mount namespaces.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as e:
            failures.append(f"{path}: {e.strerror}")
    if failures and strict:
        raise NamespaceError(f"cannot unpin namespaces: {'; '.join(failures)}")


def is_pinned(path: str) -> bool:
    """True if ``path`` is a namespace bind mount (not a symlink such as ``/proc/1/ns/net``).

    Every namespace file lives on the one nsfs superblock: a path whose device is that of
    ``/proc/self/ns/net`` (``statfs`` would say ``NSFS_MAGIC``) is a mounted namespace.
    """
    try:
        st = os.lstat(path)
        nsfs = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return not stat.S_ISLNK(st.st_mode) and st.st_dev == nsfs.st_dev


# -- the infra process -----------------------------------------------------------------------


async def start_infra(
    pinned: PinnedNamespaces, cgroup_procs: Sequence[Path], command: Sequence[str]
) -> int:
    """Start ``command`` (e.g. ``catatonit -P``) as PID 1 of a new PID namespace.

    It joins the pinned namespaces and every ``cgroup.procs`` file given, and is not a child
    of the daemon. Returns its host pid; record :func:`process_start_time` of it right away
    to guard :func:`stop_infra` against pid reuse. If cancelled, the helper is let finish
    and whatever it started is stopped.
    """
    if not command or not os.path.isabs(command[0]):
        raise InvalidArgument(f"infra command {list(command)!r} must start with an absolute path")
    argv = infra_argv(pinned, cgroup_procs, command)
    what = "starting the infra process"
    task = asyncio.ensure_future(_run_helper(argv))
    try:
        returncode, answer, stderr = await asyncio.shield(task)
    except asyncio.CancelledError:
        await _stop_cancelled_infra(task)
        raise
    pid = _infra_pid(answer) if returncode == 0 else None
    if pid is not None:
        return pid
    if answer is None or not isinstance(answer.get("error"), str):
        raise NamespaceError(_no_answer(what, returncode, stderr))
    if returncode == EXIT_REFUSED:
        raise InvalidArgument(f"{what}: {answer['error']}")
    raise NamespaceError(f"{what}: {answer['error']}")


async def _stop_cancelled_infra(task: asyncio.Future[tuple[int | None, Any, bytes]]) -> None:
    """The helper takes milliseconds: wait for its answer, then stop what it started."""
    try:
        returncode, answer, _ = await asyncio.wait_for(task, _CANCEL_GRACE)
    except BaseException:  # too slow (its run is killed by wait_for) or cancelled again
        return
    pid = _infra_pid(answer) if returncode == 0 else None
    if pid is not None:
        with contextlib.suppress(NamespaceError):
            await stop_infra(pid)


def _infra_pid(answer: dict[str, Any] | None) -> int | None:
    pid = answer.get("pid") if answer is not None else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


async def stop_infra(pid: int, start_time: int | None = None) -> None:
    """SIGKILL the infra process ``pid`` (and so its whole PID namespace); wait for its exit.

    With ``start_time`` (from :func:`process_start_time`), a process that has a different
    start time is another one that reused the pid, and is left alone. A process already
    gone is fine. Raises :class:`NamespaceError` if it has not exited after
    :data:`STOP_TIMEOUT` seconds.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError as e:
        raise NamespaceError(f"cannot open infra process {pid}: {e.strerror}") from None
    try:
        # Checked after pidfd_open: the pidfd now names this very process.
        if start_time is not None and process_start_time(pid) != start_time:
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return
        except OSError as e:
            raise NamespaceError(f"cannot kill infra process {pid}: {e.strerror}") from None
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)  # a pidfd is readable once the process has exited
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await exited
        except TimeoutError:
            raise NamespaceError(
                f"infra process {pid} has not exited {STOP_TIMEOUT:g}s after SIGKILL"
            ) from None
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks after boot); None if it has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold anything, ")" included.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):  # a zombie has exited
        return None
    return int(fields[19])


# -- running the helper ----------------------------------------------------------------------


async def _run_helper(args: Sequence[str]) -> tuple[int | None, dict[str, Any] | None, bytes]:
    """Run the helper to its end: (exit code, its JSON answer if any, stderr).

    If the awaiting task is cancelled, the helper is killed and reaped before this returns.
    """
    argv = [
        sys.executable,
        "-P",  # never import from the daemon's working directory
        "-S",  # nor from site-packages: the helper needs only the standard library
        "-m",
        HELPER_MODULE,
        *args,
    ]
    try:
        proc = await spawn(argv, stdin=DEVNULL, stdout=PIPE, stderr=PIPE, cwd="/",
                           env=helper_env())
    except OSError as e:
        raise NamespaceError(f"cannot start the namespace helper: {e.strerror}") from None
    try:
        stdout, stderr = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        raise
    answer: Any = None
    lines = stdout.strip().splitlines()
    if lines:
        with contextlib.suppress(ValueError):
            answer = json.loads(lines[-1])
    return proc.returncode, answer if isinstance(answer, dict) else None, stderr



async def _run_in_thread(args: Sequence[str]) -> tuple[int | None, dict[str, Any] | None, bytes]:
    """:func:`_run_helper`'s contract, with the helper's code run in a thread of its own
    that ends after it (its namespaces are not this process's). If the awaiting task is
    cancelled, the thread is waited for (a few syscalls) before this returns."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, dict[str, Any]]] = loop.create_future()

    def work() -> None:
        result = pinns_helper.run(args, in_thread=True)
        loop.call_soon_threadsafe(_settle, done, result)

    thread = threading.Thread(target=work, name="moorage-pinns", daemon=True)
    thread.start()
    try:
        code, answer = await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.to_thread(thread.join)
        raise
    return code, answer, b""


def _settle(future: asyncio.Future[tuple[int, dict[str, Any]]],
            result: tuple[int, dict[str, Any]]) -> None:
    if not future.done():
        future.set_result(result)


def _no_answer(what: str, returncode: int | None, stderr: bytes) -> str:
    tail = stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
    return f"{what}: the helper exited with {returncode} and no answer: {tail}"


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
