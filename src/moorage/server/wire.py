"""Protobuf wire format, for answers assembled from messages serialized earlier.

A serialized message is the concatenation of its fields, and an embedded message (or one
item of a repeated one) is its field number with wire type 2 (length-delimited), the
payload's length as a varint, then the payload. So a ``ListContainersResponse`` is the
concatenation of ``embed(1, container)`` for its containers, each ``container`` serialized
once and kept: nothing is parsed or copied to answer again.
"""

from __future__ import annotations

from collections.abc import Iterable

_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def embed(field: int, payload: bytes) -> bytes:
    """Field ``field`` holding the serialized message ``payload``."""
    return varint(field << 3 | _LENGTH_DELIMITED) + varint(len(payload)) + payload


def repeated(field: int, payloads: Iterable[bytes]) -> bytes:
    """A repeated message field ``field`` with the serialized ``payloads`` in order."""
    tag = varint(field << 3 | _LENGTH_DELIMITED)
    return b"".join(tag + varint(len(p)) + p for p in payloads)
