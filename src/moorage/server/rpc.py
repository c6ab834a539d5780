"""What every CRI handler shares: one log event per call, and domain errors as gRPC codes.

Handlers are plain ``async def`` methods (or async generators for the ``Stream*`` RPCs)
decorated with :func:`unary` or :func:`stream`. RPCs of the API that a servicer does not
define answer UNIMPLEMENTED with the RPC's name (:func:`fill_unimplemented`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from moorage import log, metrics
from moorage.errors import MoorageError
from moorage.util.fs import NO_SPACE

_log = log.get("moorage.cri")
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Ctx = grpc.aio.ServicerContext[Any, Any]

#: Request fields worth logging as ids (a message field logs its ``image`` or ``name``).
_ID_FIELDS = ("pod_sandbox_id", "container_id", "image", "config")


def ids_of(request: Message) -> dict[str, str]:
    out: dict[str, str] = {}
    fields = request.DESCRIPTOR.fields_by_name
    for name in _ID_FIELDS:
        if name not in fields:
            continue
        value = getattr(request, name)
        if isinstance(value, str):
            if value:
                out[name] = value
        elif name == "image" and value.image:
            out["image"] = value.image
        elif name == "config" and request.HasField("config"):
            meta_name = str(getattr(getattr(value, "metadata", None), "name", "") or "")
            if meta_name:
                out["name"] = meta_name
    return out


#: Characters of an error message sent back: the message travels in a trailer, which
#: clients cap (grpc: 8 KiB by default, percent-encoded), and it may quote a huge value.
MAX_MESSAGE = 512


def bounded(message: str) -> str:
    """``message``, its middle cut when it is longer than :data:`MAX_MESSAGE`."""
    if len(message) <= MAX_MESSAGE:
        return message
    cut = f" ... [{len(message) - MAX_MESSAGE} characters cut] ... "
    return message[:MAX_MESSAGE * 3 // 4] + cut + message[-(MAX_MESSAGE // 4):]


def _code(error: MoorageError) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[error.code]
    except KeyError:
        return grpc.StatusCode.INTERNAL


def _finish(method: str, ids: dict[str, str], start: float, code: grpc.StatusCode,
            error: str | None = None) -> None:
    seconds = time.perf_counter() - start
    metrics.record_operation(method, code.name, seconds)
    ms = round(seconds * 1000, 3)
    fields: dict[str, Any] = {"method": method, **ids, "duration_ms": ms, "code": code.name}
    if error is not None:
        fields["error"] = error
    if code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND):
        _log.info("cri.call", **fields)
    elif code is grpc.StatusCode.INTERNAL:
        _log.error("cri.call", **fields)
    else:
        _log.warning("cri.call", **fields)


@contextlib.asynccontextmanager
async def _call(method: str, request: Message, context: Ctx) -> AsyncIterator[None]:
    """Logs one event for the call and turns errors into the status the caller sees."""
    start = time.perf_counter()
    ids = ids_of(request)
    try:
        yield
    except MoorageError as e:
        message = bounded(e.message)
        _finish(method, ids, start, _code(e), message)
        await context.abort(_code(e), message)
    except OSError as e:
        if e.errno not in NO_SPACE:
            await _internal(method, ids, start, context, e)
        # A full disk anywhere (a record, a bundle, a blob): the node's problem, not a bug.
        message = bounded(f"{method}: the disk is full: {e}")
        _finish(method, ids, start, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    except Exception as e:
        await _internal(method, ids, start, context, e)
    _finish(method, ids, start, grpc.StatusCode.OK)


async def _internal(method: str, ids: dict[str, str], start: float, context: Ctx,
                    e: Exception) -> None:
    _log.exception("cri.internal_error", method=method, **ids)
    _finish(method, ids, start, grpc.StatusCode.INTERNAL, repr(e))
    await context.abort(grpc.StatusCode.INTERNAL, bounded(f"{method}: internal error: {e!r}"))


def unary(
    fn: Callable[[Any, Req, Ctx], Awaitable[Resp]],
) -> Callable[[Any, Req, Ctx], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def handler(self: Any, request: Req, context: Ctx) -> Resp:
        async with _call(fn.__name__, request, context):
            return await fn(self, request, context)
        raise AssertionError("unreachable: _call re-raises")

    return handler


def stream(
    fn: Callable[[Any, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[Any, Req, Ctx], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def handler(self: Any, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        async with _call(fn.__name__, request, context):
            async for item in fn(self, request, context):
                yield item

    return handler


def _unimplemented(service: str, method: str) -> Callable[..., Awaitable[None]]:
    message = f"{service}.{method} is not implemented by moorage yet"

    async def handler(self: Any, request: Message, context: Ctx) -> None:
        _finish(method, ids_of(request), time.perf_counter(), grpc.StatusCode.UNIMPLEMENTED)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    handler.__name__ = method
    return handler


def fill_unimplemented(cls: type, service_descriptor: Any) -> type:
    """Give ``cls`` an UNIMPLEMENTED handler, naming the RPC, for each RPC it lacks."""
    for method in service_descriptor.methods:
        owner = next((k for k in cls.__mro__ if method.name in k.__dict__), None)
        if owner is None or owner.__module__.endswith("_pb2_grpc"):
            setattr(cls, method.name, _unimplemented(service_descriptor.name, method.name))
    return cls
