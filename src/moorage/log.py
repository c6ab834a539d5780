"""structlog set-up: one event per line, key=value text or JSON."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog
import structlog.testing

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


_generation = 0  # bumped by every (re)configuration: loggers bound before it are stale


def setup(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    global _generation
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.processors.LogfmtRenderer(
            key_order=["timestamp", "level", "event"], drop_missing=True, bool_as_flag=False
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _generation += 1


class _Logger:
    """A module's logger: the structlog logger bound at the first call after each
    :func:`setup`, reused until the next one (a SIGHUP may change the level or the format).
    structlog's own lazy proxy would build a new bound logger on every call, and its cache
    would keep the first configuration forever."""

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._generation = -1

    def __getattr__(self, attr: str) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger(self._name).bind()
            self._generation = _generation
        return getattr(self._bound, attr)


def get(name: str) -> Any:
    return _Logger(name)


@contextlib.contextmanager
def capture() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog's ``capture_logs`` for loggers made by :func:`get` (tests)."""
    global _generation
    _generation += 1
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        _generation += 1
