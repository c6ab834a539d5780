"""Protobuf messages of domain objects, built once per change instead of once per call.

kubelet relists every second (``ListContainers`` and ``ListPodSandbox`` without a filter);
building a ``pb.Container`` costs ~11 us and a 500-item response ~8 ms of event-loop time.
A :class:`MessageCache` keeps each object's message with the *fingerprint* it was built
from: a tuple of exactly the values the message is made of, compared with ``==`` on every
call (cheap: the values are identical objects until something changes). The whole
unfiltered response is kept the same way, with the list of fingerprints it was built from.

A fingerprint must name every value its message reads. Nested values are frozen dataclasses
(the spec, the image view): the objects' code replaces them to change them, never mutates
them in place, so an unchanged one compares identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)
M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)


class MessageCache(Generic[T, M, R]):
    """``build(obj)`` cached per object id while ``fingerprint(obj)`` stays equal, and the
    response ``respond(messages)`` of a whole listing while no object in it changed.

    Returned messages are shared between calls: callers must not modify them.
    """

    def __init__(self, build: Callable[[T], M], fingerprint: Callable[[T], tuple[Any, ...]],
                 respond: Callable[[list[M]], R]) -> None:
        self._build = build
        self._fingerprint = fingerprint
        self._respond = respond
        self._items: dict[str, tuple[tuple[Any, ...], M]] = {}
        self._listing: tuple[list[tuple[Any, ...]], R] | None = None

    def _message(self, obj: T, fp: tuple[Any, ...]) -> M:
        hit = self._items.get(obj.id)
        if hit is not None and hit[0] == fp:
            return hit[1]
        msg = self._build(obj)
        self._items[obj.id] = (fp, msg)
        return msg

    def message(self, obj: T) -> M:
        """``obj``'s message, rebuilt only if its fingerprint changed."""
        return self._message(obj, self._fingerprint(obj))

    def messages(self, objs: Sequence[T]) -> list[M]:
        return [self.message(o) for o in objs]

    def listing(self, objs: Sequence[T]) -> R:
        """The response listing ``objs`` (every object, in order): the previous response
        while the objects and their fingerprints are the same, else a new one. Entries of
        objects no longer listed are dropped."""
        fps = [self._fingerprint(o) for o in objs]
        if self._listing is not None and self._listing[0] == fps:
            return self._listing[1]
        msgs = [self._message(o, fp) for o, fp in zip(objs, fps, strict=True)]
        self._items = {o.id: self._items[o.id] for o in objs}
        response = self._respond(msgs)
        self._listing = (fps, response)
        return response
