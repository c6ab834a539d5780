"""User namespaces for pods: what a request may ask for, and whether this node can do it.

A pod asks with ``namespace_options.userns_options`` (CRI ``UserNamespace``): mode NODE (or
no options) runs it in the host's user namespace; mode POD gives it a new one with exactly
the uid and gid mappings given (kubelet sends one mapping each: container id 0, length
65536, a host id that is a multiple of 65536). CONTAINER and TARGET are not defined for user
namespaces (the CRI says so; kubelet never sends them): INVALID_ARGUMENT. A pod that uses
the host's network, PID or IPC namespace cannot have one (Kubernetes refuses ``hostUsers:
false`` with any of them, and we advertise no ``user_namespaces_host_network``): the kernel
would not let the pod's root mount ``/sys``, ``/proc`` or ``mqueue`` for namespaces that
its user namespace does not own.

Support (``Status`` features, and a FAILED_PRECONDITION for a pod that asks when it is
missing) is found out once, by :func:`probe`: the kernel has user namespaces, a real user
namespace can be created and pinned by the pinner, and an idmapped overlay works where the
containers' root filesystems live (:func:`moorage.storage.overlay.idmap_problem`); the
directories that runc, inside the user namespace, must walk through to reach a root
filesystem or a pod file are searchable by others. Whether a runtime handler can join a
user namespace is the runtime's ``features`` (``linux.namespaces`` lists ``user``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.sandbox import namespaces
from moorage.sandbox.model import Mode, UserNamespace
from moorage.sandbox.pinns import mappings_problem
from moorage.storage.overlay import idmap_problem
from moorage.util.idmap import IdMapping, MappedUserNamespace

__all__ = [
    "FIELD",
    "check_support",
    "mapped",
    "probe",
    "same",
    "validate",
]

#: Where the options are in a RunPodSandbox request (and in a container's config).
FIELD = "config.linux.security_context.namespace_options.userns_options"
#: The probe's user namespace maps its root to this host uid (no process ever runs in it).
_PROBE_HOST_ID = 2**31
_PROBE_ID = "userns-probe"


def validate(
    userns: UserNamespace,
    *,
    host_network: bool,
    host_pid: bool,
    host_ipc: bool,
    field: str = FIELD,
) -> None:
    """Refuse what a pod cannot have (module docstring), naming the field."""
    if userns.mode in (Mode.CONTAINER, Mode.TARGET):
        raise InvalidArgument(
            f"{field}.mode: {userns.mode.name} is not supported for user namespaces "
            "(only POD and NODE)"
        )
    if userns.mode != Mode.POD:
        if userns.uids or userns.gids:
            raise InvalidArgument(
                f"{field}: uids/gids mappings are given, but mode is NODE (no user namespace)"
            )
        return
    for kind, mappings in (("uids", userns.uids), ("gids", userns.gids)):
        problem = mappings_problem(
            kind, [(m.container_id, m.host_id, m.length) for m in mappings]
        )
        if problem:
            raise InvalidArgument(f"{field}.{problem}")
    for host, what in ((host_network, "network"), (host_pid, "pid"), (host_ipc, "ipc")):
        if host:
            raise InvalidArgument(
                f"{field}: a pod with its own user namespace (mode POD) cannot use the "
                f"host's {what} namespace (namespace_options.{what} is NODE)"
            )


def same(container: UserNamespace, pod: UserNamespace) -> bool:
    """Whether a container's options say what its pod's do (kubelet repeats them)."""
    return (container.mode == Mode.POD) == pod.pod and (
        not pod.pod or (container.uids, container.gids) == (pod.uids, pod.gids)
    )


def mapped(userns: UserNamespace, fd: int) -> MappedUserNamespace:
    """The pod's open user namespace ``fd`` with its mappings."""
    return MappedUserNamespace(fd=fd, uids=userns.uids, gids=userns.gids)


def check_support(problem: str | None) -> None:
    """FAILED_PRECONDITION when :func:`probe` found a problem."""
    if problem is not None:
        raise FailedPrecondition(
            f"{FIELD}: user namespaces are not supported on this node: {problem}"
        )


def _kernel_problem() -> str | None:
    if not os.path.exists("/proc/self/ns/user"):
        return "the kernel has no user namespaces (/proc/self/ns/user is missing)"
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text().strip())
    except (OSError, ValueError) as e:
        return f"cannot read /proc/sys/user/max_user_namespaces: {e}"
    if limit <= 0:
        return "user namespaces are disabled (/proc/sys/user/max_user_namespaces is 0)"
    return None


def _search_problem(directories: Iterable[Path]) -> str | None:
    """A directory on the way to ``directories`` that others cannot search (runc, in the
    pod's user namespace, is "others" for every host-owned directory)."""
    for d in directories:
        for parent in [d, *Path(os.path.abspath(d)).parents]:
            try:
                mode = os.stat(parent).st_mode
            except FileNotFoundError:
                continue
            except OSError as e:
                return f"cannot stat {parent}: {e.strerror}"
            if not mode & stat.S_IXOTH:
                return (
                    f"{parent} (mode {stat.S_IMODE(mode):04o}) cannot be searched by others: "
                    f"runc in the pod's user namespace must reach {d} through it"
                )
    return None


async def probe(ns_dir: Path, storage_dir: Path, walk: Iterable[Path]) -> str | None:
    """Why pods cannot have user namespaces here; None when they can (module docstring).

    ``ns_dir`` is where the pinner pins namespaces, ``storage_dir`` where containers' root
    filesystems are mounted, ``walk`` the directories runc must reach from inside.
    """
    problem = _kernel_problem() or _search_problem([storage_dir, *walk])
    if problem:
        return problem
    mapping = (IdMapping(0, _PROBE_HOST_ID, 1),)
    # A fixed id (one daemon per runroot): a pin left by a killed probe is removed first.
    await namespaces.unpin(namespaces.PinnedNamespaces(user=str(ns_dir / "user" / _PROBE_ID)))
    try:
        pinned = await namespaces.pin(
            ns_dir, _PROBE_ID, net=False, ipc=False, uts=False,
            user=namespaces.UserMappings(uids=mapping, gids=mapping),
        )
    except (InvalidArgument, namespaces.NamespaceError) as e:
        return f"cannot create a user namespace: {e.message}"
    try:
        assert pinned.user is not None
        fd = os.open(pinned.user, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await asyncio.to_thread(
                idmap_problem, storage_dir, MappedUserNamespace(fd, mapping, mapping)
            )
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(namespaces.NamespaceError):
            await namespaces.unpin(pinned)
