"""Crash-safe file writes and small filesystem helpers (all blocking: call off the loop)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

# The layer unpack helper imports this module once per layer: tempfile, pathlib and
# dataclasses would double its start-up, so they are imported only where needed.
if TYPE_CHECKING:
    from pathlib import Path

#: The errnos of a full disk (or quota): RESOURCE_EXHAUSTED to a caller, never INTERNAL.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    Temp file in the same directory, fsync, rename over the target, fsync the directory
    (the containers/storage ``AtomicWriteFile`` pattern). ``durable=False`` skips both
    fsyncs: readers never see a partial file, but a machine crash may lose it (for files
    under the runroot, which a reboot empties anyway).
    """
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> None:
    """Remove the temp files of :func:`atomic_write` calls that a crash interrupted (names
    ``.<name>.<random>.tmp``). Only while no writer can run in ``directory`` (at start)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _scan(dir_fd: int, visit: Callable[[int, str, os.stat_result], None]) -> list[str]:
    """Call ``visit`` for every entry of the open directory; return its subdirectories."""
    entries = []
    with os.scandir(dir_fd) as it:
        for e in it:
            try:
                entries.append((e.name, e.stat(follow_symlinks=False)))
            except FileNotFoundError:  # removed since the listing: nothing to visit
                continue
    subdirs = []
    for name, st in entries:
        visit(dir_fd, name, st)
        if stat.S_ISDIR(st.st_mode):
            subdirs.append(name)
    return subdirs


def walk_tree(
    path: str | Path,
    visit: Callable[[int, str, os.stat_result], None],
    leave: Callable[[int, str], None] | None = None,
) -> None:
    """Visit every entry below the directory ``path`` without following symlinks.

    ``visit(dir_fd, name, st)`` is called for each entry (directories too, before their
    content), ``leave(parent_fd, name)`` after a directory's content. The walk keeps one
    directory open at a time and no recursion, so a layer's tree deeper than Python's
    recursion limit or longer than PATH_MAX (a hostile one) is walked like any other;
    going back up, each parent is checked to be the directory the walk came from.
    """
    fd = os.open(path, _DIR_FLAGS)
    try:
        stack: list[tuple[str, list[str], tuple[int, int]]] = []
        pending = _scan(fd, visit)
        while True:
            if pending:
                name = pending.pop()
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                st = os.fstat(fd)
                stack.append((name, pending, (st.st_dev, st.st_ino)))
                os.close(fd)
                fd = child
                pending = _scan(fd, visit)
                continue
            if not stack:
                return
            name, pending, ident = stack.pop()
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ident:
                raise OSError(errno.ESTALE, f"{path} changed while it was walked")
            if leave is not None:
                leave(fd, name)
    finally:
        os.close(fd)


def remove_tree(path: str | Path) -> None:
    """Remove a file or directory tree; a missing path is fine.

    Works on trees of any depth (see :func:`walk_tree`); ``shutil.rmtree`` of Python 3.11
    recurses, and a hostile layer nests directories deeper than the recursion limit.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return

    def visit(dir_fd: int, name: str, entry: os.stat_result) -> None:
        if not stat.S_ISDIR(entry.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)

    def leave(parent_fd: int, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(name, dir_fd=parent_fd)

    try:
        walk_tree(path, visit, leave)
        os.rmdir(path)
    except FileNotFoundError:
        pass


def discard_tree(path: Path, trash: Path) -> None:
    """Take ``path`` out of the way now (one rename into ``trash``, a directory on the same
    filesystem) and leave its removal to :func:`empty_trash`; a missing path is fine.
    Falls back to :func:`remove_tree` when the rename cannot be done."""
    try:
        trash.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = trash / path.name
        if os.path.lexists(target):
            remove_tree(target)  # left by an interrupted empty_trash
        os.rename(path, target)
    except FileNotFoundError:
        if os.path.lexists(path):
            remove_tree(path)
    except OSError:
        remove_tree(path)


def empty_trash(trash: Path) -> None:
    """Remove everything :func:`discard_tree` put into ``trash``."""
    try:
        names = os.listdir(trash)
    except FileNotFoundError:
        return
    for name in names:
        remove_tree(trash / name)


def tree_usage(path: Path) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes used below ``path``, hardlinks counted once."""
    seen: set[tuple[int, int]] = set()
    used = inodes = 0

    def visit(dir_fd: int, name: str, st: os.stat_result) -> None:
        nonlocal used, inodes
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        seen.add(key)
        inodes += 1
        used += st.st_blocks * 512

    for attempt in range(_USAGE_TRIES):
        seen.clear()
        used = inodes = 0
        try:
            walk_tree(path, visit)
        except FileNotFoundError:
            pass
        except OSError as e:
            # A directory moved while it was walked (a container's layer going to the
            # trash during ImageFsInfo): count again.
            if e.errno != errno.ESTALE or attempt == _USAGE_TRIES - 1:
                raise
            continue
        break
    return used, inodes


#: How often a usage count starts again when the tree changed under it.
_USAGE_TRIES = 5


class FsUsage(NamedTuple):
    """What ImageFsInfo reports for one filesystem."""

    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


def dir_usage(path: Path) -> FsUsage:
    used, inodes = tree_usage(path)
    return FsUsage(str(path), used, inodes, time.time_ns())


#: Symbolic links followed while resolving one path (the kernel's limit).
MAX_SYMLINKS = 40


def open_in_root(
    root: str | Path, path: str, make: Callable[[int, str], None] | None = None
) -> tuple[int, str] | None:
    """``path`` looked up as if ``root`` were ``/`` (a chroot's view, without a chroot):
    an ``O_PATH`` descriptor of what it names (the caller closes it) and that object's
    path relative to ``root`` with every symbolic link resolved (``""`` for ``root``).

    Each component is opened relative to the directory reached so far with
    ``O_NOFOLLOW``; a symbolic link is read and its target walked in its place (an
    absolute one from ``root`` again), and ``..`` stops at ``root``, so nothing outside
    ``root`` is ever reached, whatever the links say. None when a component is missing or
    a non-directory stands where a directory is needed; ``OSError(ELOOP)`` after
    :data:`MAX_SYMLINKS` links, as the kernel. ``make(dir_fd, name)``, when given, is
    called for a missing component to create it (``mkdir -p`` inside the root). Blocking.
    """
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    # The directories from root down to the current one, each with its name.
    chain: list[tuple[int, str]] = [(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
                                     "")]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    hops = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(chain) > 1:
                    os.close(chain.pop()[0])
                continue
            current = chain[-1][0]
            try:
                fd = os.open(name, flags, dir_fd=current)
            except FileNotFoundError:
                if make is None:
                    return None
                make(current, name)
                fd = os.open(name, flags, dir_fd=current)
            except NotADirectoryError:
                return None
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(name, dir_fd=current)
                if target.startswith("/"):
                    while len(chain) > 1:
                        os.close(chain.pop()[0])
                parts[:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            chain.append((fd, name))
            if parts and not stat.S_ISDIR(st.st_mode):
                return None
        names = [name for _, name in chain[1:]]
        fd = chain.pop()[0]
        return fd, "/".join(names)
    finally:
        for fd, _ in chain:
            os.close(fd)


def prepare_beneath(root: Path, relative: str, dir_mode: int = 0o755) -> Path:
    """Make the parent directories of ``root/relative`` without following any symlink below
    ``root``, and make sure no symlink sits at ``relative`` itself; returns the full path.

    ``root`` itself is trusted (it may be, or pass through, a symlink the administrator
    made) and is created if missing. ``relative`` must be relative and free of ``..``. Each
    step below ``root`` is an ``openat`` with ``O_NOFOLLOW`` relative to the directory
    reached so far, so a symlink planted there is found, never followed: it raises
    ``OSError(ELOOP)`` naming it. Blocking: call off the event loop.
    """
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if relative.startswith("/") or ".." in parts or not parts:
        raise ValueError(f"{relative!r} is not a relative path below {root}")
    root.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walked = ""
        for name in parts[:-1]:
            walked = f"{walked}/{name}" if walked else name
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_mode, dir_fd=fd)
            try:
                nxt = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise OSError(errno.ELOOP, f"{walked!r} below {root} is a symlink") from None
                raise OSError(errno.ENOTDIR, f"{walked!r} below {root} is not a directory"
                              ) from None
            os.close(fd)
            fd = nxt
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, f"{relative!r} below {root} is a symlink")
    finally:
        os.close(fd)
    return root.joinpath(*parts)
