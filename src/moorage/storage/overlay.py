"""Container root filesystems: overlayfs over unpacked image layers (all blocking: call
from threads).

Layout under ``root`` (``<moorage root>/overlay``)::

    l/<26 chars>                  short symlink -> an unpacked layer directory
    empty/                        the only lower dir of an image without layers
    empty-lower/                  the second one of an image volume without layers
    containers/<id>/upper/        the container's writable layer
    containers/<id>/work/         overlayfs's work dir (same filesystem as upper)
    containers/<id>/merged/       the mount point: the container's root filesystem
    containers/<id>/lower.json    the layer dirs, lowest first (to mount again after a reboot)
    containers/<id>/image-mounts/<i>/   the image of the container's CRI mount i (an image
                                  volume): a read-only overlay of its layers, no upper
    trash/<id>/                   a removed container's directory, deleted in the background

**Mount data fits one page.** ``mount(2)`` takes the overlay options as one string of at most
a page (4096 bytes).  As containers/storage does, each layer is named by a short link
``l/<26 chars>`` (base32 of the SHA-256 of the layer's path, so no state is needed to find it
again) and every path in the options is relative to ``root``: ``lowerdir=l/A:l/B,upperdir=
containers/<id>/upper,workdir=containers/<id>/work``.  Relative paths need the mount to run
with ``root`` as its working directory; the daemon must not ``chdir`` (every thread shares it),
so the mount runs in a short-lived thread that first calls ``unshare(CLONE_FS)``, which gives
that thread a working directory of its own (no fork).  That leaves room for about 130 layers
(29 bytes each); beyond that ``create`` raises InvalidArgument.

Links are shared by containers and safe to drop at any time (``prune_links``): the kernel
resolves them at mount time, and ``mount`` recreates them from ``lower.json``.

**User namespaces** (a pod with its own, see ``docs/sandboxes.md``). The layers on disk are
owned by host ids (mostly root); the pod's root is an unprivileged host uid ``H``. As
containerd's overlay snapshotter and containers/storage do on kernels that allow it, each
lower layer is given to overlayfs as an *idmapped* mount (``open_tree`` clone +
``mount_setattr(MOUNT_ATTR_IDMAP)`` with the pod's user namespace, referenced in the mount
data as ``/proc/self/fd/N``: shorter than a link name): a file of host root shows as owned
by ``H``, i.e. by root in the pod. The upper directory (and the image volumes made in it)
is chowned to the pod's root, so what the container writes lands in it as host ``H``. The
overlay itself cannot be idmapped (overlayfs does not allow it), nor can its upper layer
(overlayfs works in upper/work with the mounter's credentials, which an idmapped upper does
not map: ``EOVERFLOW``). :func:`idmap_problem` tries all this once on a scratch overlay.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moorage import log
from moorage.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)
from moorage.util.fs import (
    atomic_write,
    discard_tree,
    empty_trash,
    open_in_root,
    remove_tree,
    tree_usage,
)
from moorage.util.idmap import MappedUserNamespace, clone_idmapped, detach

_log = log.get("moorage.storage")

_CLONE_FS = 0x00000200
_MNT_DETACH = 0x2
# MS_RDONLY | MS_NOSUID | MS_NODEV: an image volume is read-only; its programs may run
# (critest checks that they do, as in CRI-O's and containerd's image volumes).
_IMAGE_MOUNT_FLAGS = 0x1 | 0x2 | 0x4
#: Below a container's directory: where its image volumes are mounted, one per CRI mount.
IMAGE_MOUNTS = "image-mounts"
_LINK_LEN = 26
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


@dataclass(frozen=True)
class RootFs:
    container_id: str
    upper: Path
    work: Path
    merged: Path


def link_name(layer: Path) -> str:
    """The short name (``l/<name>``) of a layer directory."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(layer))).digest()
    return base64.b32encode(digest).decode("ascii")[:_LINK_LEN]


class ContainerStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.links = root / "l"
        self.empty = root / "empty"
        self.empty_lower = root / "empty-lower"  # the second of an image volume without layers
        self.containers = root / "containers"
        self.trash = root / "trash"
        self._lock = threading.Lock()
        self._index_off: bool | None = None  # whether the kernel takes "index=off"

    # ------------------------------------------------------------------ paths

    def _dir(self, container_id: str) -> Path:
        if not _ID.match(container_id):
            raise InvalidArgument(f"invalid container id {container_id!r}")
        return self.containers / container_id

    def rootfs(self, container_id: str) -> RootFs:
        """The paths of a container's root filesystem (whether or not they exist)."""
        d = self._dir(container_id)
        return RootFs(container_id, d / "upper", d / "work", d / "merged")

    def _prepare_root(self) -> None:
        for d in (self.root, self.containers):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
        for d in (self.links, self.empty):
            d.mkdir(mode=0o700, exist_ok=True)

    # ------------------------------------------------------------------ create / mount

    def create(
        self,
        container_id: str,
        layers: Sequence[Path],
        *,
        volumes: Sequence[str] = (),
        userns: MappedUserNamespace | None = None,
    ) -> RootFs:
        """Make upper/work, mount the overlay on merged and create the image's volume dirs.

        ``layers``: unpacked layer directories, lowest first.  ``volumes``: the image
        config's ``Volumes`` paths; each missing one is made as an empty directory (0755)
        through the mounted view, so it lands in upper and a path through a symlink of the
        image resolves inside the root filesystem, never outside it.  ``userns``: the pod's
        user namespace: the layers are idmapped into it and upper (and the volume dirs) are
        owned by its root (module docstring).
        """
        d = self._dir(container_id)
        for v in volumes:
            if not v or "\0" in v:
                raise InvalidArgument(f"invalid image volume path {v!r}")
        lowers = [Path(os.path.abspath(p)) for p in layers]
        for p in lowers:
            if not p.is_dir():
                raise FailedPrecondition(
                    f"layer directory {p} of container {container_id} is missing"
                )
        self._prepare_root()
        # Checked before anything is made: the longest data this container can need.
        self._mount_data([f"l/{link_name(p)}" for p in lowers or [self.empty]],
                         f"containers/{container_id}", index_off=True)
        try:
            d.mkdir(mode=0o711)
        except FileExistsError:
            raise AlreadyExists(f"container {container_id} already has storage") from None
        fs = self.rootfs(container_id)
        try:
            # No fsync: what a machine crash can lose here is only the remount of a rootfs
            # whose processes died with the machine (CRI never starts an exited container
            # again); the container's own record, written durably before, drives cleanup.
            atomic_write(
                d / "lower.json", json.dumps({"layers": [str(p) for p in lowers]}).encode(),
                durable=False,
            )
            fs.work.mkdir(mode=0o700)
            fs.merged.mkdir(mode=0o755)
            fs.upper.mkdir(mode=0o755)
            # The overlay's root directory is upper itself: give it the top layer's
            # owner and mode, as containers/storage does.
            owner = userns.host_owner(0, 0) if userns is not None else None
            if lowers:
                st = os.stat(lowers[-1])
                uid, gid = st.st_uid, st.st_gid
                if userns is not None:
                    uid, gid = userns.host_owner(uid, gid)
                os.chown(fs.upper, uid, gid)
                os.chmod(fs.upper, stat.S_IMODE(st.st_mode))
            elif owner is not None:
                os.chown(fs.upper, *owner)
            self._mount(container_id, lowers, userns)
            for v in volumes:
                _make_dir_in_root(fs.merged, v, owner=owner)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(container_id)
            raise
        _log.debug("container storage created", container=container_id, layers=len(lowers))
        return fs

    def mount(self, container_id: str, userns: MappedUserNamespace | None = None) -> RootFs:
        """Mount a container's overlay again (after ``unmount`` or a reboot); idempotent.

        ``userns`` must be the one the storage was created with."""
        fs = self.rootfs(container_id)
        d = fs.upper.parent
        try:
            record = json.loads((d / "lower.json").read_bytes())
            lowers = [Path(p) for p in record["layers"]]
        except FileNotFoundError:
            raise NotFound(f"container {container_id} has no storage") from None
        except (ValueError, KeyError, TypeError) as e:
            raise Internal(f"storage record of container {container_id} is corrupt: {e}") from e
        if self.is_mounted(container_id):
            return fs
        for p in lowers:
            if not p.is_dir():
                raise FailedPrecondition(
                    f"layer directory {p} of container {container_id} is missing"
                )
        for sub in (fs.upper, fs.work, fs.merged):
            if not sub.is_dir():
                raise Internal(f"storage of container {container_id} lacks {sub.name}/")
        self._prepare_root()
        self._mount(container_id, lowers, userns)
        return fs

    def _mount_data(
        self, lower: Sequence[str], upper: str | None, index_off: bool = False
    ) -> str:
        """Overlay mount data: ``lower`` entries top first (``l/<name>`` short links, or
        idmapped layers as ``/proc/self/fd/N``), with ``<upper>/upper`` and
        ``<upper>/work`` when given (no upper: a read-only overlay)."""
        data = f"lowerdir={':'.join(lower)}"
        if upper is not None:
            data += f",upperdir={upper}/upper,workdir={upper}/work"
        if index_off:
            data += ",index=off"
        if len(data) + 1 > os.sysconf("SC_PAGE_SIZE"):
            raise InvalidArgument(
                f"image has too many layers for one overlay mount ({len(lower)} layers; "
                f"the mount options must fit {os.sysconf('SC_PAGE_SIZE')} bytes)"
            )
        return data

    @contextlib.contextmanager
    def _lower_entries(
        self, lowers: Sequence[Path], userns: MappedUserNamespace | None
    ) -> Iterator[list[str]]:
        """The mount data entries of ``lowers`` (lowest first), top first: short links;
        with a user namespace, each layer idmapped and held by an fd for the mount
        (overlayfs keeps its own reference)."""
        if userns is None:
            with self._lock:
                names = [self._ensure_link(p) for p in lowers]
            yield [f"l/{n}" for n in reversed(names)]
            return
        fds: list[int] = []
        try:
            for p in reversed(lowers):
                fds.append(_clone_layer(p, userns.fd))
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)

    def _mount(
        self,
        container_id: str,
        lowers: Sequence[Path],
        userns: MappedUserNamespace | None = None,
    ) -> None:
        target = str(self.rootfs(container_id).merged)
        upper = f"containers/{container_id}"
        with self._lower_entries(lowers or [self.empty], userns) as lower:
            attempts = [True, False] if self._index_off is not False else [False]
            for index_off in attempts:
                data = self._mount_data(lower, upper, index_off)
                err = _mount_in(self.root, target, data)
                if err == 0:
                    if index_off:
                        self._index_off = True
                    return
                if err == errno.EINVAL and index_off and self._index_off is None:
                    # Old kernels do not know "index=off"; they have no index either.
                    continue
                raise Internal(
                    f"mounting the overlay of container {container_id} failed: "
                    f"{os.strerror(err)} (mount data {len(data)} bytes, {len(lower)} lower dirs)"
                )
        if self._index_off is None:
            self._index_off = False

    # ------------------------------------------------------------------ image volumes

    def image_mount(self, container_id: str, index: int) -> Path:
        """Where the image of the container's CRI mount ``index`` is mounted."""
        return self._dir(container_id) / IMAGE_MOUNTS / str(index)

    def mount_image(
        self,
        container_id: str,
        index: int,
        layers: Sequence[Path],
        *,
        sub_path: str = "",
        userns: MappedUserNamespace | None = None,
    ) -> Path:
        """Mount an image's layers as a read-only overlay (``ro,nosuid,nodev``, no upper
        layer) at :meth:`image_mount`, for an image volume (KEP-4639); returns the
        host path to bind into the container: the mount point, or ``sub_path`` in it.

        ``sub_path`` is looked up inside the image, its symbolic links resolved as if the
        image were the root (:func:`~moorage.util.fs.open_in_root`), so it cannot lead
        out of it; the path returned holds no symbolic link. It must be relative, without
        ``..``, and name a directory or a regular file of the image: else InvalidArgument
        naming ``config.mounts[index].image_sub_path``. The container's storage must
        exist (:meth:`create`); :meth:`unmount` and :meth:`remove` detach these mounts.
        ``userns``: the image's layers are idmapped into the pod's user namespace, as the
        root filesystem's.
        """
        field = f"config.mounts[{index}].image_sub_path"
        parts = check_image_sub_path(sub_path, field)
        lowers = [Path(os.path.abspath(p)) for p in layers]
        for p in lowers:
            if not p.is_dir():
                raise FailedPrecondition(
                    f"layer directory {p} of the image of config.mounts[{index}] is missing"
                )
        # Overlayfs needs two lower layers when there is no upper one: the image's, then
        # an empty directory (two for an image without layers).
        lowers += [self.empty] if lowers else [self.empty, self.empty_lower]
        target = self.image_mount(container_id, index)
        self._prepare_root()
        self.empty_lower.mkdir(mode=0o700, exist_ok=True)
        if not self._dir(container_id).is_dir():
            raise FailedPrecondition(f"container {container_id} has no storage")
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lower_entries(lowers, userns) as lower:
            data = self._mount_data(lower, None)
            err = _mount_in(self.root, str(target), data, _IMAGE_MOUNT_FLAGS)
        if err:
            raise Internal(
                f"mounting the image of config.mounts[{index}] for container {container_id} "
                f"failed: {os.strerror(err)} ({len(lower)} lower dirs)"
            )
        if not parts:
            return target
        try:
            found = open_in_root(target, "/".join(parts))
        except OSError as e:
            raise InvalidArgument(f"{field}: {sub_path!r}: {e.strerror or e}") from None
        if found is None:
            raise InvalidArgument(f"{field}: {sub_path!r} does not exist in the image")
        fd, resolved = found
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise InvalidArgument(
                f"{field}: {sub_path!r} is neither a directory nor a regular file in the image"
            )
        return target / resolved if resolved else target

    def _unmount_images(self, container_id: str) -> None:
        """Detach every image volume of the container (they are found on disk: a daemon
        killed half-way through a create leaves no other trace of them)."""
        base = self._dir(container_id) / IMAGE_MOUNTS
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return
        for name in names:
            _unmount_all(base / name, f"image volume {name} of container {container_id}")

    def _ensure_link(self, layer: Path) -> str:
        name = link_name(layer)
        link = self.links / name
        target = str(layer)
        try:
            if os.readlink(link) == target:
                return name
        except OSError:
            pass
        tmp = self.links / f".tmp-{name}-{os.getpid()}-{threading.get_ident()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
        return name

    def prune_links(self) -> int:
        """Remove short links that no container's storage uses; returns how many."""
        with self._lock:
            used = {link_name(self.empty)}
            for cid in self.list_ids():
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    record = json.loads((self.containers / cid / "lower.json").read_bytes())
                    used.update(link_name(Path(p)) for p in record["layers"])
            removed = 0
            try:
                entries = list(os.scandir(self.links))
            except FileNotFoundError:
                return 0
            for entry in entries:
                if entry.name not in used:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
            return removed

    # ------------------------------------------------------------------ unmount / remove

    def is_mounted(self, container_id: str) -> bool:
        target = os.path.realpath(self.rootfs(container_id).merged)
        return target in _mount_points()

    def unmount(self, container_id: str) -> None:
        """Detach the overlay and the image volumes (MNT_DETACH) and anything stacked on
        them; not mounted is fine.

        Returns only once the kernel says each mount point holds no mount (EINVAL), so the
        directory is safe to delete; no scan of the mount table (it is long on a busy node).
        """
        self._unmount_images(container_id)
        _unmount_all(self.rootfs(container_id).merged, f"the rootfs of container {container_id}")

    def remove(self, container_id: str, *, later: bool = False) -> None:
        """Unmount and delete the container's upper, work and mount point; idempotent.

        ``later``: only move the directory into ``trash/`` (one rename); :meth:`empty_trash`
        deletes it.
        """
        d = self._dir(container_id)
        if not d.exists():
            return
        self.unmount(container_id)  # never delete through a mount: raises if one stays
        if later:
            discard_tree(d, self.trash)
        else:
            remove_tree(d)

    def empty_trash(self) -> None:
        """Delete what ``remove(..., later=True)`` left in ``trash/``."""
        empty_trash(self.trash)

    # ------------------------------------------------------------------ queries

    def usage(self, container_id: str) -> tuple[int, int]:
        """Bytes (allocated) and inodes of the container's writable layer."""
        upper = self.rootfs(container_id).upper
        if not upper.is_dir():
            raise NotFound(f"container {container_id} has no storage")
        return tree_usage(upper)

    def list_ids(self) -> list[str]:
        """Containers that have storage here (including half-made ones from a crash)."""
        try:
            names = os.listdir(self.containers)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _ID.match(n) and (self.containers / n).is_dir())


# ---------------------------------------------------------------------- helpers


def _clone_layer(layer: Path, userns_fd: int) -> int:
    try:
        return clone_idmapped(str(layer), userns_fd)
    except OSError as e:
        raise FailedPrecondition(
            f"cannot idmap layer {layer} for a user namespace: {e.strerror or e}"
        ) from None


def idmap_problem(directory: Path, userns: MappedUserNamespace) -> str | None:
    """Why containers of a pod with a user namespace cannot get their root filesystems
    under ``directory`` (None: they can): a scratch overlay is mounted there the way
    :meth:`ContainerStorage.create` mounts one (an idmapped lower layer, a chowned upper),
    a file of host root must show as owned by the pod's root, and all is removed again.
    """
    scratch = directory / ".idmap-probe"  # a fixed name: a killed probe's is found again
    expected = userns.host_owner(0, 0)
    try:
        directory.mkdir(mode=0o711, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            detach(str(scratch / "merged"))
        remove_tree(scratch)
        scratch.mkdir(mode=0o700)
        for sub in ("lower", "upper", "work", "merged"):
            (scratch / sub).mkdir()
        (scratch / "lower" / "f").write_bytes(b"")
        os.chown(scratch / "upper", *expected)
        try:
            fd = clone_idmapped(str(scratch / "lower"), userns.fd)
        except OSError as e:
            return f"the filesystem of {directory} cannot be idmapped: {e.strerror or e}"
        try:
            err = _mount_in(
                scratch, str(scratch / "merged"),
                f"lowerdir=/proc/self/fd/{fd},upperdir=upper,workdir=work",
            )
        finally:
            os.close(fd)
        if err:
            return f"overlayfs refused an idmapped lower layer in {directory}: {os.strerror(err)}"
        try:
            st = os.stat(scratch / "merged" / "f")
            root = os.stat(scratch / "merged")
        finally:
            detach(str(scratch / "merged"))
        if (st.st_uid, st.st_gid) != expected or (root.st_uid, root.st_gid) != expected:
            return (
                f"an idmapped overlay in {directory} shows host root's files as owned by "
                f"{st.st_uid}:{st.st_gid}, not by the pod's root {expected[0]}:{expected[1]}"
            )
        return None
    except OSError as e:
        return f"probing idmapped overlays in {directory}: {e.strerror or e}"
    finally:
        with contextlib.suppress(OSError):
            detach(str(scratch / "merged"))
            remove_tree(scratch)


def _unmount_all(path: Path, what: str) -> None:
    """Detach what is mounted at ``path`` (stacked mounts come off one at a time); raise
    Internal naming ``what`` if that fails or a mount stays."""
    target = os.fsencode(path)
    for _ in range(16):
        if _libc.umount2(target, _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                return  # not (or no longer) a mount point
            raise Internal(f"unmounting {what} failed: {os.strerror(err)}")
    raise Internal(f"{what} stays mounted")


def check_image_sub_path(sub_path: str, field: str) -> list[str]:
    """The components of an image volume's sub path: relative, no ``..`` (Kubernetes'
    own rule for ``subPath``), no NUL; InvalidArgument naming ``field`` otherwise."""
    if "\0" in sub_path or sub_path.startswith("/"):
        raise InvalidArgument(f"{field}: {sub_path!r} is not a relative path")
    parts = [p for p in sub_path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"{field}: {sub_path!r} must not contain '..'")
    return parts


def _mount_in(cwd: Path, target: str, data: str, flags: int = 0) -> int:
    """mount -t overlay with ``data`` relative to ``cwd``; returns an errno (0 = done).

    Runs in its own thread with a private working directory (``unshare(CLONE_FS)``), so no
    other thread of the process sees the ``chdir``.  The thread ends right after.
    """
    result: list[int] = []

    def work() -> None:
        try:
            if _libc.unshare(_CLONE_FS) != 0:
                result.append(ctypes.get_errno())
                return
            os.chdir(cwd)
            rc = _libc.mount(b"overlay", os.fsencode(target), b"overlay", flags, data.encode())
            result.append(0 if rc == 0 else ctypes.get_errno())
        except OSError as e:
            result.append(e.errno or errno.EIO)

    thread = threading.Thread(target=work, name="moorage-overlay-mount", daemon=True)
    thread.start()
    thread.join()
    return result[0] if result else errno.EIO


_OCTAL = re.compile(r"\\([0-7]{3})")


def _mount_points() -> set[str]:
    points: set[str] = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().decode("utf-8", "surrogateescape").splitlines():
            fields = line.split(" ", 5)
            if len(fields) >= 5:
                points.add(_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def _make_dir_in_root(
    root: Path, path: str, mode: int = 0o755, owner: tuple[int, int] | None = None
) -> None:
    """``mkdir -p root/path`` where symlinks resolve with ``root`` as ``/``
    (:func:`~moorage.util.fs.open_in_root`: ``..`` never climbs above ``root``); the
    directories it makes get ``mode`` (not narrowed by the umask) and ``owner`` when given.
    """

    def make(dir_fd: int, name: str) -> None:
        try:
            os.mkdir(name, mode, dir_fd=dir_fd)
        except FileExistsError:
            return
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)

    try:
        found = open_in_root(root, path, make)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidArgument(f"image volume {path!r}: too many symlinks") from None
        raise
    if found is not None:
        fd, _ = found
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                return
        finally:
            os.close(fd)
    raise InvalidArgument(f"image volume {path!r}: a part of it exists and is not a directory")
