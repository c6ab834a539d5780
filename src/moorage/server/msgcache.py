"""Serialized answers of published objects, built once per change instead of once per call.

kubelet relists every second (``ListPodSandbox`` and ``ListContainers`` without a filter)
and asks the status of each pod and container that changed. The read path answers from the
managers' published copies (``state.published``): a copy is never modified, and a change
publishes a new one, so the serialized message of a copy can be kept and reused as long as
the same copy is published (identity, no comparison), and a whole listing as long as the
published mapping is the same object. Answers are assembled from the kept bytes
(``server/wire.py``): a relist of 500 unchanged containers costs a dictionary lookup.

One :class:`Answers` per kind of message; used by the gRPC thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message

from moorage.server import wire


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)


class Answers(Generic[T]):
    """``build(obj)`` serialized, kept per object id while ``obj`` is the same copy (and
    ``variant``, anything else the message depends on, the same object)."""

    def __init__(self, build: Callable[[T], Message]) -> None:
        self._build = build
        self._items: dict[str, tuple[T, object, bytes]] = {}
        self._listing: tuple[Mapping[str, T], object, bytes] | None = None

    def get(self, obj: T, variant: object = None) -> bytes:
        hit = self._items.get(obj.id)
        if hit is not None and hit[0] is obj and hit[1] is variant:
            return hit[2]
        data = self._build(obj).SerializeToString()
        self._items[obj.id] = (obj, variant, data)
        return data

    def repeated(self, field: int, objs: Iterable[T], variant: object = None) -> bytes:
        """Field ``field`` repeated with the message of each of ``objs``."""
        return wire.repeated(field, (self.get(o, variant) for o in objs))

    def listing(self, items: Mapping[str, T], field: int,
                select: Callable[[Mapping[str, T]], Sequence[T]],
                variant: object = None) -> bytes:
        """The answer listing ``select(items)`` as field ``field``: the previous one while
        ``items`` (a published mapping) and ``variant`` are the same objects. Kept
        messages of objects no longer published are dropped."""
        if self._listing is not None and self._listing[0] is items and (
                self._listing[1] is variant):
            return self._listing[2]
        data = self.repeated(field, select(items), variant)
        self._items = {k: v for k, v in self._items.items() if k in items}
        self._listing = (items, variant, data)
        return data
