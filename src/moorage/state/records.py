"""Persistent records: one JSON document per object, written atomically, with a schema version.

On-disk records are the truth after a crash; memory is a cache of them. A record whose
schema version is newer than this daemon knows is refused (it was written by a newer
moorage), never silently misread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moorage.util.fs import atomic_write

SCHEMA_VERSION = 1


class RecordError(Exception):
    """A record on disk that cannot be used."""


def write(path: Path, kind: str, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as a record of ``kind`` (blocking: call off the loop)."""
    doc = {"schema": SCHEMA_VERSION, "kind": kind, **data}
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")


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
    """Every ``*.json`` record of a directory; unusable ones are yielded as errors."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.json")):
        try:
            yield path, read(path, kind)
        except RecordError as e:
            yield path, e
