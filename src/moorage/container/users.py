"""Who a container's process runs as: uid, gid, supplementary groups, name and home.

The rules are Kubernetes' (and CRI-O's and containerd's):

- CRI ``run_as_user`` (a uid): the gid is that user's in the image's ``/etc/passwd`` when the
  uid is listed there, else 0. ``run_as_username``: the user must be in the image's
  ``/etc/passwd``. Only one of the two may be set. ``run_as_group`` overrides the gid and is
  refused without one of them (the CRI says the runtime MUST error).
- Otherwise the image config's ``User``: ``""`` (root), ``uid``, ``uid:gid``, ``name``,
  ``name:group``, ``uid:group``, ``name:gid``. Numbers are taken as they are (a uid missing
  from ``/etc/passwd`` gets gid 0); names must resolve in the image's ``/etc/passwd`` and
  ``/etc/group``.
- Supplementary groups, policy ``merge`` (the default): the groups of ``/etc/group`` that
  list the user's name, plus CRI ``supplemental_groups``; policy ``strict``: only the CRI
  ones. Both include the primary gid, as containerd does since CVE-2023-25173, so that the
  primary group stays in the process's group list.
- ``HOME``: the user's home directory from ``/etc/passwd``; ``/`` when the user is not
  listed (runc's default).

``/etc/passwd`` and ``/etc/group`` are read from the container's root filesystem, never from
the host: each path component is opened with ``O_NOFOLLOW`` relative to the directory
before it, and a symbolic link is resolved as the container would see it (an absolute
target starts again at the rootfs, ``..`` stops at the rootfs), so a link cannot lead out
of the rootfs. A missing file is an empty one; a file that cannot be resolved (a link loop)
or is not a regular file is an InvalidArgument naming it.

Everything here blocks (file reads): call it off the event loop.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorage.container.model import ContainerSpec, ImageView
from moorage.errors import InvalidArgument
from moorage.util.fs import open_in_root

__all__ = [
    "GroupEntry",
    "PasswdEntry",
    "ResolvedUser",
    "parse_group",
    "parse_passwd",
    "read_in_root",
    "resolve_user",
]

#: Largest uid/gid (2^32 - 2: -1 as a u32 means "unchanged" to the kernel).
MAX_ID = 2**32 - 2
#: Largest /etc/passwd or /etc/group read.
MAX_FILE_SIZE = 32 * 1024 * 1024

_SC = "config.linux.security_context"


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    username: str | None = None
    home: str = "/"

    def record(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "gid": self.gid,
            "additional_gids": list(self.additional_gids),
            "username": self.username,
            "home": self.home,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ResolvedUser:
        return cls(
            uid=int(rec["uid"]),
            gid=int(rec["gid"]),
            additional_gids=tuple(int(g) for g in rec.get("additional_gids", ())),
            username=rec.get("username"),
            home=rec.get("home") or "/",
        )


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


# -- parsing ----------------------------------------------------------------------------------


def _id(text: str) -> int | None:
    text = text.strip()
    if not text.isdigit():
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _lines(data: bytes) -> list[list[str]]:
    out: list[list[str]] = []
    for raw in data.decode("utf-8", "surrogateescape").splitlines():
        line = raw.strip()
        # Comments, blanks, and NIS compat entries ("+name", "-name") are not users.
        if not line or line.startswith(("#", "+", "-")):
            continue
        out.append(line.split(":"))
    return out


def parse_passwd(data: bytes) -> list[PasswdEntry]:
    """``name:password:uid:gid:gecos:home:shell`` lines; malformed lines are skipped."""
    entries: list[PasswdEntry] = []
    for f in _lines(data):
        if len(f) < 4 or not f[0]:
            continue
        uid, gid = _id(f[2]), _id(f[3])
        if uid is None or gid is None:
            continue
        home = f[5] if len(f) > 5 else ""
        entries.append(PasswdEntry(name=f[0], uid=uid, gid=gid, home=home))
    return entries


def parse_group(data: bytes) -> list[GroupEntry]:
    """``name:password:gid:member,member`` lines; malformed lines are skipped."""
    entries: list[GroupEntry] = []
    for f in _lines(data):
        if len(f) < 3 or not f[0]:
            continue
        gid = _id(f[2])
        if gid is None:
            continue
        members = tuple(m.strip() for m in f[3].split(",") if m.strip()) if len(f) > 3 else ()
        entries.append(GroupEntry(name=f[0], gid=gid, members=members))
    return entries


# -- reading files inside a root ----------------------------------------------------------------


class _Unreadable(Exception):
    pass


def read_in_root(root: Path, path: str, limit: int = MAX_FILE_SIZE) -> bytes | None:
    """The content of ``path`` as seen inside ``root``; None when it does not exist.

    Symbolic links are followed as inside the root (see the module docstring). Raises
    InvalidArgument (naming ``path``) for a loop, a non-regular file, or a file over
    ``limit`` bytes.
    """
    try:
        return _read_in_root(root, path, limit)
    except _Unreadable as e:
        raise InvalidArgument(f"image file {path}: {e}") from None


def _read_in_root(root: Path, path: str, limit: int) -> bytes | None:
    try:
        found = open_in_root(root, path)
    except OSError as e:
        raise _Unreadable(e.strerror or str(e)) from None
    if found is None:
        return None
    fd, resolved = found
    try:
        if not resolved:
            raise _Unreadable("is the root directory")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Unreadable("not a regular file")
        if st.st_size > limit:
            raise _Unreadable(f"larger than {limit} bytes")
        # Reopened through the O_PATH descriptor: the very file that was resolved.
        try:
            rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise _Unreadable(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    try:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise _Unreadable(f"larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(rfd)


# -- resolution ---------------------------------------------------------------------------------


class _Files:
    """The image's passwd and group files, read once when first needed."""

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs
        self._passwd: list[PasswdEntry] | None = None
        self._group: list[GroupEntry] | None = None

    @property
    def passwd(self) -> list[PasswdEntry]:
        if self._passwd is None:
            self._passwd = parse_passwd(read_in_root(self.rootfs, "/etc/passwd") or b"")
        return self._passwd

    @property
    def group(self) -> list[GroupEntry]:
        if self._group is None:
            self._group = parse_group(read_in_root(self.rootfs, "/etc/group") or b"")
        return self._group

    def user_by_uid(self, uid: int) -> PasswdEntry | None:
        return next((e for e in self.passwd if e.uid == uid), None)

    def user_by_name(self, name: str) -> PasswdEntry | None:
        return next((e for e in self.passwd if e.name == name), None)

    def group_by_name(self, name: str) -> GroupEntry | None:
        return next((g for g in self.group if g.name == name), None)


def _check_id(value: int, field: str) -> int:
    if not 0 <= value <= MAX_ID:
        raise InvalidArgument(f"{field}: {value} is not a valid id (0 to {MAX_ID})")
    return value


def resolve_user(rootfs: Path, spec: ContainerSpec, image: ImageView) -> ResolvedUser:
    """The user of the container's process (rules in the module docstring)."""
    sc = spec.security
    if sc.run_as_user is not None and sc.run_as_username:
        raise InvalidArgument(
            f"{_SC}: run_as_user ({sc.run_as_user}) and run_as_username "
            f"({sc.run_as_username!r}) are both set; only one may be"
        )
    if sc.run_as_group is not None and sc.run_as_user is None and not sc.run_as_username:
        raise InvalidArgument(f"{_SC}.run_as_group: set without run_as_user or run_as_username")
    if sc.run_as_group is not None:
        _check_id(sc.run_as_group, f"{_SC}.run_as_group")
    for gid in sc.supplemental_groups:
        _check_id(gid, f"{_SC}.supplemental_groups")

    files = _Files(rootfs)
    entry: PasswdEntry | None
    if sc.run_as_user is not None:
        uid = _check_id(sc.run_as_user, f"{_SC}.run_as_user")
        entry = files.user_by_uid(uid)
        gid = entry.gid if entry else 0
    elif sc.run_as_username:
        entry = files.user_by_name(sc.run_as_username)
        if entry is None:
            raise InvalidArgument(
                f"{_SC}.run_as_username: user {sc.run_as_username!r} not found in the "
                "image's /etc/passwd"
            )
        uid, gid = entry.uid, entry.gid
    else:
        uid, gid, entry = _image_user(files, image)
    if sc.run_as_group is not None:
        gid = sc.run_as_group

    username = entry.name if entry else None
    groups = {gid, *sc.supplemental_groups}
    if sc.supplemental_groups_policy != "strict" and username is not None:
        groups.update(g.gid for g in files.group if username in g.members)
    return ResolvedUser(
        uid=uid,
        gid=gid,
        additional_gids=tuple(sorted(groups)),
        username=username,
        home=(entry.home if entry and entry.home else "/"),
    )


def _image_user(files: _Files, image: ImageView) -> tuple[int, int, PasswdEntry | None]:
    raw = image.config.get("User") or ""
    if not isinstance(raw, str):
        raise InvalidArgument(f"image {image.name}: config User {raw!r} is not a string")
    value = raw.strip()
    what = f"image {image.name}: config User {raw!r}"
    user_part, _, group_part = value.partition(":")
    entry: PasswdEntry | None
    if not user_part or user_part.isdigit():
        uid = int(user_part) if user_part else 0
        if uid > MAX_ID:
            raise InvalidArgument(f"{what}: {uid} is not a valid uid")
        entry = files.user_by_uid(uid)
        gid = entry.gid if entry else 0
    else:
        entry = files.user_by_name(user_part)
        if entry is None:
            raise InvalidArgument(
                f"{what}: user {user_part!r} not found in the image's /etc/passwd"
            )
        uid, gid = entry.uid, entry.gid
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
            if gid > MAX_ID:
                raise InvalidArgument(f"{what}: {gid} is not a valid gid")
        else:
            group = files.group_by_name(group_part)
            if group is None:
                raise InvalidArgument(
                    f"{what}: group {group_part!r} not found in the image's /etc/group"
                )
            gid = group.gid
    return uid, gid, entry
