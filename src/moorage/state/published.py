"""What readers on other threads may see of a manager's objects.

The managers run on the daemon's event loop and change their objects in place, a field at a
time. The CRI read path runs on another thread (``server/front.py``) so that kubelet's
relist never waits behind the loop; it must never see a half-changed object. So each
manager *publishes* a copy of an object whenever it saves it (its record is the truth
after a crash, so every change that matters is saved), and readers see only these copies:

* a copy is never modified after it is published (a change publishes a new copy);
* the mapping of copies is replaced, never modified: one read of :attr:`Published.items`
  is one consistent state of every object, however long the reader takes.

A new copy is a new object, so a reader may key its caches on the identity of a copy (or of
the whole mapping) and know that nothing in it changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar

from moorage.errors import InvalidArgument, NotFound


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)


class Published(Generic[T]):
    """The published copies of one manager's objects, by id (written by one thread)."""

    def __init__(self) -> None:
        self.items: Mapping[str, T] = MappingProxyType({})

    def put(self, obj: T) -> None:
        """Publish ``obj`` (a copy nobody modifies), replacing the one of its id."""
        items = dict(self.items)
        items[obj.id] = obj
        self.items = MappingProxyType(items)

    def drop(self, obj_id: str) -> None:
        if obj_id in self.items:
            items = dict(self.items)
            del items[obj_id]
            self.items = MappingProxyType(items)

    def reset(self, objs: Iterable[T]) -> None:
        """Publish exactly ``objs`` (copies), dropping every other."""
        self.items = MappingProxyType({o.id: o for o in objs})


def get_by_id(objs: Mapping[str, T], id_or_prefix: str, *, visible: Callable[[T], bool],
              field: str, what: str, required: str) -> T:
    """The visible object of ``objs`` (live ones, or published copies) whose id is
    ``id_or_prefix`` or the only one that starts with it. InvalidArgument (``required``
    when it is empty, naming ``field`` when the prefix is ambiguous), else NotFound naming
    ``what``."""
    if not id_or_prefix:
        raise InvalidArgument(required)
    obj = objs.get(id_or_prefix)
    if obj is not None and visible(obj):
        return obj
    matches = [o for i, o in objs.items() if i.startswith(id_or_prefix) and visible(o)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidArgument(f"{field}: prefix {id_or_prefix!r} is ambiguous")
    raise NotFound(f"{what} {id_or_prefix!r} not found")
