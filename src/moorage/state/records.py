"""Persistent records: one JSON document per object, written atomically, with a schema version.

On-disk records are the truth after a crash; memory is a cache of them. A record whose
schema version is newer than this daemon knows is refused (it was written by a newer
moorage), never silently misread.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moorage.util.fs import atomic_write, remove_stale_temps

SCHEMA_VERSION = 1


class RecordError(Exception):
    """A record on disk that cannot be used."""


def write(path: Path, kind: str, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as a record of ``kind`` (blocking: call off the loop)."""
    doc = {"schema": SCHEMA_VERSION, "kind": kind, **data}
    # Compact: ``indent`` would send json through its pure-Python encoder, several times
    # slower on every state change (`python -m json.tool` shows a record readably).
    atomic_write(path, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n")


@dataclass
class _InFlight:
    count: int = 0  # writers made for the path and not finished
    written: int = 0  # sequence number of the last one written
    lock: threading.Lock = field(default_factory=threading.Lock)


_sequence = itertools.count(1)
_in_flight: dict[Path, _InFlight] = {}
_in_flight_lock = threading.Lock()


def writer(path: Path, kind: str, encode: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    """A blocking function (run it in a worker thread) that writes ``encode()`` as a record
    of ``kind``: the encoding happens in the thread too, so ``encode`` must work on a
    snapshot (:func:`moorage.util.codec.snapshot`). Make writers in the order the snapshots
    are taken (on the event loop): a writer never overwrites the record of a writer of the
    same path made after it, whichever thread finishes first."""
    seq = next(_sequence)
    with _in_flight_lock:
        flight = _in_flight.setdefault(path, _InFlight())
        flight.count += 1

    def run() -> None:
        try:
            data = encode()
            with flight.lock:
                if flight.written < seq:
                    write(path, kind, data)
                    flight.written = seq
        finally:
            with _in_flight_lock:
                flight.count -= 1
                if flight.count == 0 and _in_flight.get(path) is flight:
                    del _in_flight[path]

    return run


def read(path: Path, kind: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise RecordError(f"record {path}: unreadable: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise RecordError(f"record {path}: not a {kind} record")
    schema = doc.get("schema")
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise RecordError(f"record {path}: schema {schema!r} is newer than {SCHEMA_VERSION}")
    doc.pop("schema")
    doc.pop("kind")
    return doc


def load_all(directory: Path, kind: str) -> Iterator[tuple[Path, dict[str, Any] | RecordError]]:
    """Every ``*.json`` record of a directory; unusable ones are yielded as errors. For the
    start, before any writer runs: the temp files of writes a crash cut short are removed."""
    if not directory.is_dir():
        return
    remove_stale_temps(directory)
    for path in sorted(directory.glob("*.json")):
        try:
            yield path, read(path, kind)
        except RecordError as e:
            yield path, e
