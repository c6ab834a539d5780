"""Apply a layer tar, entry by entry, to the current directory.

The helper runs this after chrooting into the (empty) layer directory, so every path below
is relative to the layer root and the kernel resolves nothing outside it. The rules are
checked anyway, and a layer that breaks one is refused as a whole.

tarfile only parses headers here: each entry is created by hand (``tarfile.extract`` and its
filters cannot produce a correct root file system), and OCI whiteouts are turned into their
overlayfs form on the way.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from typing import Any, Self, cast

from moorage.image.unpack.rules import (
    OVERLAY_OPAQUE_XATTR,
    LayerError,
    LayerLimitError,
    Whiteout,
    check_id,
    clean_path,
    mtime_ns,
    parent_of,
    whiteout_of,
    xattrs_of,
)
from moorage.image.unpack.stream import LayerStream, Readable
from moorage.util.fs import remove_tree

#: Bytes tarfile asks of the layer stream at a time (it copies its buffer on every read, so
#: bigger is not better).
TAR_BUFSIZE = 1 << 16
#: Bytes of file content copied at a time.
COPY_CHUNK = 1 << 20

#: Largest PAX header or GNU long name accepted (the limit Go's archive/tar uses too).
MAX_METADATA_SIZE = 1 << 20
_METADATA_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)

_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Failures of the machine, not of the layer.
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM})

# tarfile's header errors are not in typeshed.
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EMPTY_HEADER: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_TRUNCATED_HEADER: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]
_INVALID_HEADER: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]


class _StrictTarInfo(tarfile.TarInfo):
    """Header parsing that ends the archive only at a zero block.

    tarfile stops without a word at a bad checksum, a short block or the end of the stream
    when that happens after the first member; for a layer each of these means corruption.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        header = super().frombuf(buf, encoding, errors)
        # tarfile reads these into memory whole; a real one is a few KiB at most.
        if header.type in _METADATA_TYPES and header.size > MAX_METADATA_SIZE:
            raise LayerError(
                f"tar metadata header of {header.size} bytes (type {header.type!r}) is over "
                f"the limit of {MAX_METADATA_SIZE}"
            )
        return header

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(archive)
        except _EOF_HEADER:
            raise  # a zero block: the end-of-archive marker
        except (_EMPTY_HEADER, _TRUNCATED_HEADER):
            if archive.offset == 0:
                raise LayerError("empty tar stream") from None
            raise LayerError(
                f"tar stream ends at offset {archive.offset} without an end-of-archive marker"
            ) from None
        except _INVALID_HEADER as e:
            raise LayerError(f"corrupt tar header at offset {archive.offset}: {e}") from None


def apply_layer(layer: LayerStream, max_entries: int | None = None) -> int:
    """Unpack the whole tar stream into the current directory; return the number of entries.

    More than ``max_entries`` entries (when given) is a :class:`LayerLimitError`.
    """
    applier = Applier(max_entries)
    try:
        with tarfile.open(
            fileobj=layer,
            mode="r|",
            bufsize=TAR_BUFSIZE,
            tarinfo=_StrictTarInfo,
            encoding="utf-8",
            errors="surrogateescape",
        ) as archive:
            while (member := archive.next()) is not None:
                # tarfile keeps every header for random access, which a stream never needs.
                archive.members.clear()  # type: ignore[attr-defined]
                applier.apply(member, archive)
            # The zero block that ended the archive may be followed by a second one (and
            # padding), never by more headers.
            trailer = archive.fileobj.read(tarfile.BLOCKSIZE)
            if trailer.count(0) != len(trailer):
                raise LayerError("corrupt tar stream: data after a lone zero block")
    except tarfile.TarError as e:
        raise LayerError(f"corrupt tar stream: {e}") from None
    layer.drain()
    applier.finish()
    return applier.entries


class Applier:
    """Creates entries under the current directory and remembers what it verified."""

    def __init__(self, max_entries: int | None = None) -> None:
        self.entries = 0
        self._max_entries = max_entries
        # Paths known to be real directories (never symlinks) created or checked by us; only
        # our own removals can change that, and they drop what they remove.
        self._dirs: set[str] = {""}
        # Directory mtimes are set last: creating their children changes them.
        self._dir_mtimes: dict[str, int] = {}

    def apply(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        self.entries += 1
        if self._max_entries is not None and self.entries > self._max_entries:
            raise LayerLimitError(
                f"layer has more than {self._max_entries} entries (max_layer_entries)"
            )
        try:
            self._apply(member, archive)
        except LayerError as e:
            raise type(e)(f"entry {_short(member.name)}: {e}") from None
        except OSError as e:
            # strerror, not str(e): the entry already names the file, and a hostile name
            # may be thousands of bytes long.
            if e.errno in _MACHINE_ERRNOS:
                raise OSError(e.errno, f"entry {_short(member.name)}: {e.strerror}") from None
            raise LayerError(f"entry {_short(member.name)}: {e.strerror or e}") from None
        except (ValueError, OverflowError) as e:
            raise LayerError(f"entry {_short(member.name)}: {e}") from None

    def finish(self) -> None:
        for name, ns in self._dir_mtimes.items():
            os.utime(name or ".", ns=(ns, ns), follow_symlinks=False)

    # -- entry kinds ------------------------------------------------------------------------

    def _apply(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        name = clean_path(member.name)
        whiteout = whiteout_of(name)
        if whiteout is not None:
            self._whiteout(whiteout, member)
        elif member.isdir():
            self._directory(name, member)
        elif not name:
            raise LayerError("the layer root can only be a directory")
        elif member.isreg():
            self._file(name, member, archive)
        elif member.issym():
            self._symlink(name, member)
        elif member.islnk():
            self._hardlink(name, member)
        elif member.ischr() or member.isblk() or member.isfifo():
            self._special(name, member)
        else:
            raise LayerError(f"unsupported entry type {member.type!r}")

    def _directory(self, name: str, member: tarfile.TarInfo) -> None:
        if name:
            self._ensure_dir(parent_of(name))
            existing = _lstat(name)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    self._remove(name, existing)
                os.mkdir(name, 0o700)
            self._dirs.add(name)
        path = name or "."
        self._set_owner(path, member)
        os.chmod(path, member.mode & 0o7777)
        self._set_xattrs(path, member)
        self._dir_mtimes[name] = _mtime(member)

    def _file(self, name: str, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        self._make_room(name)
        fd = os.open(name, _CREATE_FILE, 0o600)
        try:
            _copy_content(fd, member, archive)
            # Order matters: chown clears setuid/setgid and file capabilities, so the mode and
            # then the xattrs come after it.
            uid, gid = _ids(member)
            os.chown(fd, uid, gid)
            os.chmod(fd, member.mode & 0o7777)
            self._set_xattrs(fd, member)
            ns = _mtime(member)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _symlink(self, name: str, member: tarfile.TarInfo) -> None:
        target = member.linkname
        if not target:
            raise LayerError("symlink has an empty target")
        if "\x00" in target:
            raise LayerError("symlink target contains a NUL byte")
        self._make_room(name)
        os.symlink(target, name)  # stored verbatim: it is resolved inside the container
        self._set_owner(name, member)
        self._set_xattrs(name, member)
        ns = _mtime(member)
        os.utime(name, ns=(ns, ns), follow_symlinks=False)

    def _hardlink(self, name: str, member: tarfile.TarInfo) -> None:
        what = f"hardlink target {member.linkname!r}"
        target = clean_path(member.linkname, what)
        if not target:
            raise LayerError(f"{what} is the layer root")
        if target == name:
            raise LayerError(f"{what} is the entry itself")
        self._check_existing_dir(parent_of(target), what)
        existing = _lstat(target)
        if existing is None:
            raise LayerError(f"{what} does not exist earlier in this layer")
        if stat.S_ISDIR(existing.st_mode):
            raise LayerError(f"{what} is a directory")
        self._make_room(name)
        # A link to a symlink links the symlink itself, as tar does.
        os.link(target, name, follow_symlinks=False)

    def _special(self, name: str, member: tarfile.TarInfo) -> None:
        self._make_room(name)
        if member.isfifo():
            os.mkfifo(name, 0o600)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        self._set_owner(name, member)
        os.chmod(name, member.mode & 0o7777)
        self._set_xattrs(name, member)
        ns = _mtime(member)
        os.utime(name, ns=(ns, ns), follow_symlinks=False)

    def _whiteout(self, whiteout: Whiteout, member: tarfile.TarInfo) -> None:
        if whiteout.opaque:
            # The opaque marker hides the lower layers' content of its directory; what this
            # layer puts there stays visible.
            self._ensure_dir(whiteout.target)
            os.setxattr(whiteout.target or ".", OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        # overlayfs' whiteout: a character device 0:0 in place of the deleted name.
        self._make_room(whiteout.target)
        os.mknod(whiteout.target, stat.S_IFCHR, os.makedev(0, 0))
        self._set_owner(whiteout.target, member)

    # -- helpers ----------------------------------------------------------------------------

    def _make_room(self, name: str) -> None:
        """Make sure the parents of ``name`` are directories, and nothing is at ``name``."""
        self._ensure_dir(parent_of(name))
        existing = _lstat(name)
        if existing is not None:
            self._remove(name, existing)

    def _ensure_dir(self, path: str) -> None:
        """Make ``path`` and its parents real directories, creating missing ones (mode 755).

        A symlink on the way is refused: the layer would write through it.
        """
        if path in self._dirs:
            return
        prefix = ""
        for part in path.split("/"):
            prefix = f"{prefix}/{part}" if prefix else part
            if prefix in self._dirs:
                continue
            existing = _lstat(prefix)
            if existing is None:
                os.mkdir(prefix, 0o755)
            elif stat.S_ISLNK(existing.st_mode):
                raise LayerError(f"parent {prefix!r} is a symlink (symlink escape)")
            elif not stat.S_ISDIR(existing.st_mode):
                raise LayerError(f"parent {prefix!r} is not a directory")
            self._dirs.add(prefix)

    def _check_existing_dir(self, path: str, what: str) -> None:
        """Like :meth:`_ensure_dir` for a path that must already exist (a hardlink target's)."""
        if path in self._dirs:
            return
        prefix = ""
        for part in path.split("/"):
            prefix = f"{prefix}/{part}" if prefix else part
            if prefix in self._dirs:
                continue
            existing = _lstat(prefix)
            if existing is not None and stat.S_ISLNK(existing.st_mode):
                raise LayerError(f"{what} goes through symlink {prefix!r} (symlink escape)")
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                raise LayerError(f"{what} does not exist earlier in this layer")
            self._dirs.add(prefix)

    def _remove(self, name: str, existing: os.stat_result) -> None:
        """Remove an earlier entry of this layer that a later one replaces."""
        if not stat.S_ISDIR(existing.st_mode):
            os.unlink(name)
            return
        remove_tree(name)  # shutil.rmtree recurses: a deep hostile tree would crash it
        inside = name + "/"
        self._dirs = {d for d in self._dirs if d != name and not d.startswith(inside)}
        self._dir_mtimes = {
            d: ns for d, ns in self._dir_mtimes.items() if d != name and not d.startswith(inside)
        }

    @staticmethod
    def _set_owner(path: str, member: tarfile.TarInfo) -> None:
        uid, gid = _ids(member)
        os.chown(path, uid, gid, follow_symlinks=False)

    @staticmethod
    def _set_xattrs(target: int | str, member: tarfile.TarInfo) -> None:
        if not member.pax_headers:
            return
        for key, value in xattrs_of(member.pax_headers):
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as e:
                # The file system cannot store it: the image still works without it (GNU tar
                # and containers/storage skip these too). The kernel refuses user.* xattrs on
                # symlinks and device nodes.
                if e.errno == errno.ENOTSUP:
                    continue
                if e.errno == errno.EPERM and key.startswith("user.") and not member.isreg():
                    continue
                raise


def _short(name: str, keep: int = 120) -> str:
    """An entry name for a message: quoted, and cut in the middle when it is long."""
    if len(name) <= keep:
        return repr(name)
    half = keep // 2
    return f"{name[:half]!r}...{name[-half:]!r} ({len(name)} bytes)"


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _ids(member: tarfile.TarInfo) -> tuple[int, int]:
    return check_id(member.uid, "uid"), check_id(member.gid, "gid")


def _mtime(member: tarfile.TarInfo) -> int:
    return mtime_ns(member.pax_headers.get("mtime"), member.mtime)


def _copy_content(fd: int, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
    """Copy the entry's data from the archive stream, where tarfile left it unread.

    Sparse entries get only their data regions written (the holes stay holes), so a hostile
    sparse map cannot fill the disk beyond the stream's own size.
    """
    source = archive.fileobj
    if source.tell() != member.offset_data:
        raise LayerError("tar stream out of step with its headers")
    regions = cast("list[tuple[int, int]] | None", member.sparse)
    if regions is None:
        _copy_exactly(source, fd, member.size)
        return
    stored = archive.offset - member.offset_data  # where tarfile will look for the next header
    total = 0
    for offset, length in regions:
        total += length
        if offset < 0 or length < 0 or offset + length > member.size or total > stored:
            raise LayerError("sparse map does not fit the entry")
        os.lseek(fd, offset, os.SEEK_SET)
        _copy_exactly(source, fd, length)
    os.ftruncate(fd, member.size)


def _copy_exactly(source: Readable, fd: int, length: int) -> None:
    if _is_plain_tar_stream(source):
        _copy_past_buffer(source, fd, length)
        return
    while length > 0:
        chunk = source.read(min(COPY_CHUNK, length))
        if not chunk:
            raise LayerError("tar stream ends inside the entry's data")
        length -= len(chunk)
        _write_all(fd, chunk)


def _is_plain_tar_stream(source: object) -> bool:
    """Whether ``source`` is tarfile's reader of an uncompressed stream (``mode="r|"``),
    with the attributes :func:`_copy_past_buffer` relies on."""
    return (
        type(source).__name__ == "_Stream"
        and getattr(source, "comptype", None) == "tar"
        and isinstance(getattr(source, "buf", None), bytes)
        and isinstance(getattr(source, "pos", None), int)
        and hasattr(source, "fileobj")
    )


def _copy_past_buffer(stream: Any, fd: int, length: int) -> None:
    """Copy ``length`` bytes of file content from tarfile's stream reader to ``fd``.

    That reader joins and slices its buffer on every read: two extra copies of every byte,
    a third of the helper's work on a layer of big files. Content needs no buffering: what
    the reader already holds goes first, the rest comes straight from the layer stream in
    big chunks, and the reader's ``buf`` and ``pos`` are kept as its own reads would leave
    them (tarfile then finds the next header where it expects it).
    """
    held: bytes = stream.buf
    if held:
        head = held[:length]
        stream.buf = held[len(head) :]
        stream.pos += len(head)
        length -= len(head)
        _write_all(fd, head)
    layer: Readable = stream.fileobj
    while length > 0:
        chunk = layer.read(min(COPY_CHUNK, length))
        if not chunk:
            raise LayerError("tar stream ends inside the entry's data")
        stream.pos += len(chunk)
        length -= len(chunk)
        _write_all(fd, chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
