"""ID mappings and idmapped mounts (``open_tree`` + ``mount_setattr(MOUNT_ATTR_IDMAP)`` +
``move_mount``), through ctypes syscalls: no fork, safe in the daemon's threads.

An idmapped mount shows a file whose owner on disk is ``u`` as owned by the host id that
the user namespace maps ``u`` to (and maps writes back): with the pod's mapping
``0 -> H``, files owned by host root on disk look owned by ``H``, the pod's root. Python
3.11's ``os`` has none of these calls; the syscall numbers are those of x86_64 and
aarch64 (the new mount API has the same numbers on every architecture).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_ID",
    "IdMapping",
    "MappedUserNamespace",
    "clone_idmapped",
    "detach",
    "map_id",
    "mount_setattr_available",
    "move_mount",
]

#: The largest valid id: (uid_t)-1 is "no id".
MAX_ID = 2**32 - 2

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_O_CLOEXEC = 0o2000000
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_MNT_DETACH = 2


@dataclass(frozen=True)
class IdMapping:
    """``length`` ids from ``container_id`` on (inside) map to ``host_id`` on (outside)."""

    container_id: int
    host_id: int
    length: int

    def line(self) -> str:
        """The line of ``/proc/<pid>/uid_map`` (and of the pinner's argument, with ':')."""
        return f"{self.container_id} {self.host_id} {self.length}"


def map_id(mappings: Sequence[IdMapping], container_id: int) -> int | None:
    """The host id of ``container_id``; None when no mapping covers it."""
    for m in mappings:
        if m.container_id <= container_id < m.container_id + m.length:
            return m.host_id + container_id - m.container_id
    return None


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def clone_idmapped(path: str, userns_fd: int, *, recursive: bool = False) -> int:
    """A detached copy of the mount tree at ``path``, idmapped by the user namespace
    ``userns_fd``; returns its file descriptor (close-on-exec; closing it drops the copy
    unless it was attached with :func:`move_mount` or is held as an overlay layer).

    ``recursive`` copies and idmaps the mounts below ``path`` too. Raises OSError (EINVAL
    when the filesystem cannot be idmapped).
    """
    flags = _OPEN_TREE_CLONE | _O_CLOEXEC | (_AT_RECURSIVE if recursive else 0)
    fd = _check(
        _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(path), ctypes.c_uint(flags)),
        f"open_tree {path}",
    )
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        at = _AT_EMPTY_PATH | (_AT_RECURSIVE if recursive else 0)
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR, fd, b"", ctypes.c_uint(at), ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            f"idmapping the mount of {path}",
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount ``fd`` at ``target``."""
    _check(
        _libc.syscall(
            _SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, os.fsencode(target),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        ),
        f"move_mount to {target}",
    )


@functools.cache
def mount_setattr_available() -> bool:
    """Whether the kernel has ``mount_setattr(2)`` (Linux 5.12+), which recursive read-only
    mounts (runc's and crun's ``rro`` option) are made with. Probed, not read from the
    kernel version: a call with no valid descriptor fails with EBADF or EINVAL where the
    call exists and ENOSYS where it does not (or where a seccomp filter hides it)."""
    attr = _MountAttr(0, 0, 0, 0)
    result = _libc.syscall(
        _SYS_MOUNT_SETATTR, -1, b"", ctypes.c_uint(0), ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    return result == 0 or ctypes.get_errno() != errno.ENOSYS


def detach(path: str) -> bool:
    """Lazily unmount ``path``; False when nothing is mounted there (or it is missing)."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 2):  # EINVAL: not a mount point; ENOENT
        return False
    raise OSError(err, f"umount {path}: {os.strerror(err)}")


@dataclass(frozen=True)
class MappedUserNamespace:
    """An open user namespace (``fd``, owned by the caller) and its mappings: what an
    idmapped mount for a pod needs."""

    fd: int
    uids: tuple[IdMapping, ...]
    gids: tuple[IdMapping, ...]

    def host_owner(self, uid: int, gid: int) -> tuple[int, int]:
        """The host uid and gid that the pod's ``uid``/``gid`` are (its root's if unmapped)."""
        host_uid = map_id(self.uids, uid)
        host_gid = map_id(self.gids, gid)
        if host_uid is None:
            host_uid = map_id(self.uids, 0)
        if host_gid is None:
            host_gid = map_id(self.gids, 0)
        if host_uid is None or host_gid is None:
            raise ValueError("the mappings do not cover id 0")
        return host_uid, host_gid
