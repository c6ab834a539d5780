"""The namespace pinner: a helper program that creates a pod's namespaces and pins them.

Two commands (the daemon side is :mod:`moorage.sandbox.namespaces`):

``python -m moorage.sandbox.pinns --dir DIR --id ID [--user --uid-map C:H:L ... --gid-map
C:H:L ...] [--net] [--ipc] [--uts] [--hostname NAME] [--sysctl KEY=VALUE ...]``
    ``unshare()`` the requested namespaces in the helper's own process, set the hostname in
    the new UTS namespace, write each sysctl under ``/proc/sys`` (from inside the new
    namespaces, so the values land there), then bind-mount ``/proc/thread-self/ns/<type>``
    onto ``DIR/<type>/ID``. The mount namespace is not unshared: the pins are host mounts and
    outlive the helper. ``lo`` is left down (CNI's loopback plugin brings it up).

    With ``--user`` (CRI-O's pinns does the same) a forked child unshares a user namespace;
    the helper, from outside, writes its ``gid_map`` and ``uid_map`` (each ``--uid-map`` /
    ``--gid-map`` is one line; ``setgroups`` stays allowed: the helper holds CAP_SETGID
    outside, so the kernel takes the gid map without ``deny``, and runc needs setgroups(2)
    for supplementary groups); the child becomes root of it and unshares the other
    namespaces, which are then *owned* by the user namespace (root in the pod holds
    CAP_NET_ADMIN over its own network namespace), sets the hostname and sysctls, and the
    helper pins ``/proc/<child>/ns/<type>`` (``user`` first) before the child exits.

    - exit 0: ``{"user": path, "net": path, "ipc": path, "uts": path}`` (only those created)
    - exit 2: ``{"error": "..."}``: the request was refused (a sysctl that is not namespaced,
      or whose namespace was not asked for, or that the kernel refused; a bad hostname or id)
    - exit 1: ``{"error": "..."}``: the machine failed (unshare, mount, an existing pin)

    On failure every pin already made is unmounted and removed before the answer.

``python -m moorage.sandbox.pinns infra [--user-ns PATH] [--net-ns PATH] [--ipc-ns PATH]
[--uts-ns PATH] [--cgroup-procs FILE ...] -- COMMAND [ARG ...]``
    ``setns()`` into the given namespaces (the user namespace first, so that the PID
    namespace is owned by it too), ``unshare(CLONE_NEWPID)`` and fork: the child is
    PID 1 of the new PID namespace. It starts a session, moves itself into every
    ``cgroup.procs`` file given (cgroup v1 has one per controller), becomes root of the
    user namespace when one was given (uid, gid 0, no supplementary groups), points stdio at
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
NAMESPACE_TYPES = ("user", "net", "ipc", "uts")
#: The largest id a mapping may reach: (uid_t)-1 means "no id".
MAX_ID = 2**32 - 2
#: The kernel takes at most this many lines in a uid_map or gid_map (since Linux 4.15).
MAX_MAPPINGS = 340

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


def parse_mapping(text: str) -> tuple[int, int, int] | None:
    """``"C:H:L"`` (container id, host id, length) as a triple; None if malformed."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() for p in parts):
        return None
    c, h, n = (int(p) for p in parts)
    return c, h, n


def mappings_problem(kind: str, mappings: list[tuple[int, int, int]]) -> str | None:
    """Why the kernel would refuse (or we would not use) these ``(container, host, length)``
    mappings as a ``uid_map``/``gid_map``; ``kind`` ("uids", "gids") names them.

    Non-empty, at most :data:`MAX_MAPPINGS`, each length positive, no range past
    :data:`MAX_ID` on either side, no two ranges overlapping on either side, and id 0 of the
    container mapped (the pod's root must exist).
    """
    if not mappings:
        return f"{kind}: at least one mapping is required"
    if len(mappings) > MAX_MAPPINGS:
        return f"{kind}: {len(mappings)} mappings, at most {MAX_MAPPINGS} are allowed"
    for i, (c, h, n) in enumerate(mappings):
        if n <= 0:
            return f"{kind}[{i}].length must be positive"
        if c + n - 1 > MAX_ID or h + n - 1 > MAX_ID:
            return f"{kind}[{i}]: the range {c}+{n} -> {h}+{n} goes past id {MAX_ID}"
    for side, name in ((0, "container_id"), (1, "host_id")):
        spans = sorted((m[side], m[side] + m[2], i) for i, m in enumerate(mappings))
        for k in range(1, len(spans)):
            (_, end, i), (start, _, j) = spans[k - 1], spans[k]
            if start < end:
                return f"{kind}[{j}].{name} overlaps {kind}[{i}]"
    if not any(c <= 0 < c + n for c, _, n in mappings):
        return f"{kind}: no mapping covers container id 0 (the pod's root)"
    return None
