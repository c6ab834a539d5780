"""The namespace pinner: a helper program that creates a pod's namespaces and pins them.

Two commands (the daemon side is :mod:`moorage.sandbox.namespaces`):

``python -m moorage.sandbox.pinns --dir DIR --id ID [--net] [--ipc] [--uts] [--hostname NAME]
[--sysctl KEY=VALUE ...]``
    ``unshare()`` the requested namespaces in the helper's own process, set the hostname in
    the new UTS namespace, write each sysctl under ``/proc/sys`` (from inside the new
    namespaces, so the values land there), then bind-mount ``/proc/thread-self/ns/<type>``
    onto ``DIR/<type>/ID``. The mount namespace is not unshared: the pins are host mounts and
    outlive the helper. ``lo`` is left down (CNI's loopback plugin brings it up).

    - exit 0: ``{"net": path, "ipc": path, "uts": path}`` (only the namespaces created)
    - exit 2: ``{"error": "..."}``: the request was refused (a sysctl that is not namespaced,
      or whose namespace was not asked for, or that the kernel refused; a bad hostname or id)
    - exit 1: ``{"error": "..."}``: the machine failed (unshare, mount, an existing pin)

    On failure every pin already made is unmounted and removed before the answer.

``python -m moorage.sandbox.pinns infra [--net-ns PATH] [--ipc-ns PATH] [--uts-ns PATH]
[--cgroup-procs FILE ...] -- COMMAND [ARG ...]``
    ``setns()`` into the given namespaces, ``unshare(CLONE_NEWPID)`` and fork: the child is
    PID 1 of the new PID namespace. It starts a session, moves itself into every
    ``cgroup.procs`` file given (cgroup v1 has one per controller), points stdio at
    ``/dev/null`` and execs COMMAND. The helper waits for the exec (a close-on-exec pipe
    reports a failure before it) and exits without waiting for the child, which is then
    reparented to init (or the nearest subreaper): it is never a child of the daemon.

    - exit 0: ``{"pid": <host pid>, "pid_ns": "/proc/<pid>/ns/pid"}``
    - exit 1 or 2: ``{"error": "..."}`` as above; no process is left running.

This module is imported by the helper and by the daemon; it imports nothing (the helper must
start fast), and holds the rules both sides apply to sysctl names.
"""

#: Sysctls that belong to the IPC namespace: exact names and prefixes.
IPC_SYSCTLS = ("kernel.sem",)
IPC_SYSCTL_PREFIXES = ("kernel.shm", "kernel.msg", "fs.mqueue.")
#: Sysctls that belong to the network namespace.
NET_SYSCTL_PREFIXES = ("net.",)

#: The namespace types the pinner creates, in the order it pins them.
NAMESPACE_TYPES = ("net", "ipc", "uts")

#: Linux's HOST_NAME_MAX.
HOST_NAME_MAX = 64


def sysctl_problem(key: str, value: str) -> str | None:
    """Why a sysctl name or value is malformed (``None`` if it is well formed).

    Names use dots (``net.ipv4.ping_group_range``); slashes are refused, so a name always
    maps to one file under ``/proc/sys``.
    """
    if not key:
        return "sysctl with an empty name"
    if "/" in key or "\0" in key or "=" in key:
        return f"sysctl name {key!r} must be dot-separated, without '/', '=' or NUL"
    if any(part in ("", "..") for part in key.split(".")):
        return f"sysctl name {key!r} has an empty component"
    if "\0" in value or "\n" in value:
        return f"sysctl {key!r}: value {value!r} contains a NUL or a newline"
    return None


def sysctl_namespace(key: str) -> str | None:
    """``"net"`` or ``"ipc"``: the namespace a sysctl belongs to; ``None`` if not namespaced."""
    if key in IPC_SYSCTLS or key.startswith(IPC_SYSCTL_PREFIXES):
        return "ipc"
    if key.startswith(NET_SYSCTL_PREFIXES):
        return "net"
    return None


def id_problem(sandbox_id: str) -> str | None:
    """Why ``sandbox_id`` cannot be a pin's file name (``None`` if it can)."""
    if sandbox_id in ("", ".", "..") or "/" in sandbox_id or "\0" in sandbox_id:
        return f"sandbox id {sandbox_id!r} is not a plain file name"
    if len(sandbox_id.encode("utf-8", "surrogateescape")) > 255:
        return f"sandbox id {sandbox_id[:16]!r}... is longer than 255 bytes"
    return None


def hostname_problem(hostname: str) -> str | None:
    """Why the kernel would refuse ``hostname`` (``None`` if it would take it)."""
    size = len(hostname.encode("utf-8", "surrogateescape"))
    if size > HOST_NAME_MAX:
        return f"hostname {hostname!r} is longer than {HOST_NAME_MAX} bytes"
    if "\0" in hostname:
        return f"hostname {hostname!r} contains NUL"
    return None
