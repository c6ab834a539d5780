"""The rules a layer must follow, as pure functions over header fields (no file system access).

Names follow the OCI image-spec layer format: member paths are relative to the layer root,
``.wh.<name>`` deletes ``<name>`` from the layers below and ``.wh..wh..opq`` makes its
directory opaque. Everything here raises :class:`LayerError` with the reason the layer is
refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import NamedTuple

WHITEOUT_PREFIX = ".wh."
#: Names starting with this are whiteout metadata (AUFS hardlink dirs and the like).
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

#: What overlayfs reads to treat a directory as opaque.
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
#: Only the unpacker itself may set overlayfs metadata (redirects, metacopy, opaque).
RESERVED_XATTR_PREFIX = "trusted.overlay."
#: PAX records carrying extended attributes, as written by GNU tar, Go and BuildKit.
PAX_XATTR_PREFIX = "SCHILY.xattr."

#: Largest id that is not the "leave unchanged" value (-1) of chown.
MAX_ID = 2**32 - 2

_NS_PER_S = 1_000_000_000
_PAX_TIME = re.compile(r"(-?)(\d+)(?:\.(\d*))?")


class LayerError(Exception):
    """The layer breaks a rule (hostile, corrupt or unsupported); the whole unpack fails."""


class LayerLimitError(LayerError):
    """The layer passes a configured bound (uncompressed size, number of entries)."""


class Whiteout(NamedTuple):
    """A whiteout entry: ``target`` is the path it deletes, or the directory it makes opaque."""

    target: str
    opaque: bool


def clean_path(raw: str, what: str = "path") -> str:
    """Return ``raw`` as a relative path without empty or ``.`` parts ("" is the layer root).

    A leading ``./`` is dropped (most layer tars are written that way). Absolute paths, ``..``
    components and NUL bytes are refused; ``what`` names the field in the message.
    """
    if not raw:
        raise LayerError(f"{what} is empty")
    if "\x00" in raw:
        raise LayerError(f"{what} contains a NUL byte")
    path = raw
    while path.startswith("./"):
        path = path[2:]
    if path.startswith("/"):
        raise LayerError(f"{what} is absolute")
    parts = [part for part in path.split("/") if part and part != "."]
    if ".." in parts:
        raise LayerError(f"{what} has a '..' component")
    return "/".join(parts)


def parent_of(path: str) -> str:
    """The directory holding ``path`` ("" for the layer root)."""
    return path.rpartition("/")[0]


def whiteout_of(path: str) -> Whiteout | None:
    """Classify a cleaned member path: ``None`` for an ordinary entry, else what it whites out.

    The ``.wh.`` prefix is reserved: a directory of that name (AUFS' ``.wh..wh.plnk`` for
    instance) is refused.
    """
    parent, _, base = path.rpartition("/")
    if f"/{WHITEOUT_PREFIX}" in f"/{parent}":
        raise LayerError(f"reserved whiteout name used as a directory in {parent!r}")
    if not base.startswith(WHITEOUT_PREFIX):
        return None
    if base == WHITEOUT_OPAQUE:
        return Whiteout(parent, opaque=True)
    if base.startswith(WHITEOUT_META_PREFIX):
        raise LayerError(f"unsupported whiteout metadata entry {base!r}")
    name = base[len(WHITEOUT_PREFIX) :]
    if name in ("", ".", ".."):
        raise LayerError(f"whiteout {base!r} names no file")
    return Whiteout(f"{parent}/{name}" if parent else name, opaque=False)


def check_id(value: int, what: str) -> int:
    """Return a uid/gid from a header, refusing values chown cannot store."""
    if not 0 <= value <= MAX_ID:
        raise LayerError(f"{what} {value} is out of range")
    return value


def mtime_ns(pax_mtime: str | None, mtime: float) -> int:
    """The entry's mtime in nanoseconds.

    A PAX ``mtime`` record is parsed exactly (a float would lose the last digits); otherwise
    the header's whole seconds are used.
    """
    if pax_mtime is not None:
        match = _PAX_TIME.fullmatch(pax_mtime.strip())
        if match is not None:
            sign, seconds, fraction = match.groups()
            ns = int(seconds) * _NS_PER_S + int((fraction or "")[:9].ljust(9, "0"))
            return -ns if sign else ns
    return int(mtime * _NS_PER_S) if isinstance(mtime, float) else int(mtime) * _NS_PER_S


def xattrs_of(pax_headers: Mapping[str, str]) -> Iterator[tuple[str, bytes]]:
    """Extended attributes from ``SCHILY.xattr.<name>`` PAX records, values as raw bytes.

    tarfile decodes PAX values as UTF-8 with ``surrogateescape``, so encoding back the same
    way restores binary values such as ``security.capability`` byte for byte.
    """
    for key, value in pax_headers.items():
        if not key.startswith(PAX_XATTR_PREFIX):
            continue
        name = key[len(PAX_XATTR_PREFIX) :]
        if not name or "\x00" in name:
            raise LayerError(f"invalid xattr name {name!r}")
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise LayerError(f"xattr {name!r} is reserved for overlayfs")
        yield name, value.encode("utf-8", "surrogateescape")
