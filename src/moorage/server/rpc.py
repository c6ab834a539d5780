"""What every CRI handler shares: where it runs, one log event per call, and domain errors as
gRPC codes.

The gRPC server runs on a thread of its own with its own event loop, the *front*
(``server/front.py``); the daemon's work runs on the main event loop, the *domain* loop. A
handler is a method of a servicer, decorated with one of:

* :func:`unary` / :func:`stream`: an ``async def`` (or async generator, for ``Stream*``)
  that runs on the domain loop: everything that changes state or needs the managers' live
  objects. The front forwards the call and awaits it; a cancelled call (the client went
  away, its deadline passed) cancels the handler there.
* :func:`read` / :func:`read_stream`: answered on the front itself from what the managers
  published (``state.published``), so kubelet's relist and status calls never wait behind
  the domain loop's other work. Such a handler returns the serialized answer (``bytes``,
  ``server/msgcache.py``); it must touch nothing but published state and immutable
  configuration.

On the front, every call logs one ``cri.call`` event with its id fields and its duration,
is counted in the metrics, and a domain error (``errors.py``) becomes its gRPC status with a
message naming the field. RPCs of the API that a servicer does not define answer
UNIMPLEMENTED with the RPC's name (:func:`fill_unimplemented`). :func:`generic_handler`
makes the table the gRPC server dispatches with: requests are parsed on the front, and
answers sent as bytes (no serializer: read answers are kept serialized).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from moorage import log, metrics
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import MoorageError
from moorage.util.fs import NO_SPACE

_log = log.get("moorage.cri")
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[Any, Any]
Kind = Literal["unary", "stream", "read", "read_stream"]

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


def _marked(handler: Any, kind: Kind, body: Any) -> Any:
    handler.rpc_kind = kind
    handler.rpc_body = body
    return handler


def unary(
    fn: Callable[[Any, Req, Ctx], Awaitable[Resp]],
) -> Callable[[Any, Req, Ctx], Awaitable[Resp]]:
    """A handler that runs on the domain loop (the front forwards the call to it)."""
    @functools.wraps(fn)
    async def handler(self: Any, request: Req, context: Ctx) -> Resp:
        async with _call(fn.__name__, request, context):
            return await fn(self, request, context)
        raise AssertionError("unreachable: _call re-raises")

    return _marked(handler, "unary", fn)  # type: ignore[no-any-return]


def stream(
    fn: Callable[[Any, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[Any, Req, Ctx], AsyncIterator[Resp]]:
    """A streaming handler that runs on the domain loop, one item per request of the
    front (so a slow client slows the generator down, where it can see it)."""
    @functools.wraps(fn)
    async def handler(self: Any, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        async with _call(fn.__name__, request, context):
            async for item in fn(self, request, context):
                yield item

    return _marked(handler, "stream", fn)  # type: ignore[no-any-return]


def read(
    fn: Callable[[Any, Req, Ctx], Awaitable[bytes]],
) -> Callable[[Any, Req, Ctx], Awaitable[bytes]]:
    """A handler answered on the front from published state, with the serialized
    response."""
    handler = unary(fn)  # type: ignore[type-var]
    return _marked(handler, "read", fn)  # type: ignore[no-any-return]


def read_stream(
    fn: Callable[[Any, Req, Ctx], AsyncIterator[bytes]],
) -> Callable[[Any, Req, Ctx], AsyncIterator[bytes]]:
    """A streaming handler answered on the front from published state, yielding
    serialized responses."""
    handler = stream(fn)  # type: ignore[type-var]
    return _marked(handler, "read_stream", fn)  # type: ignore[no-any-return]


def _unimplemented(service: str, method: str) -> Callable[..., Awaitable[None]]:
    message = f"{service}.{method} is not implemented by moorage yet"

    async def handler(self: Any, request: Message, context: Ctx) -> None:
        _finish(method, ids_of(request), time.perf_counter(), grpc.StatusCode.UNIMPLEMENTED)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    handler.__name__ = method
    return _marked(handler, "read", handler)  # type: ignore[no-any-return]


def fill_unimplemented(cls: type, service_descriptor: Any) -> type:
    """Give ``cls`` an UNIMPLEMENTED handler, naming the RPC, for each RPC it lacks."""
    for method in service_descriptor.methods:
        owner = next((k for k in cls.__mro__ if method.name in k.__dict__), None)
        if owner is None or owner.__module__.endswith("_pb2_grpc"):
            setattr(cls, method.name, _unimplemented(service_descriptor.name, method.name))
    return cls


# -- the front's side ---------------------------------------------------------------------


async def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` (another thread's) and wait for it here; cancelling the
    wait cancels it there."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


_END = object()


async def _bridged(domain: asyncio.AbstractEventLoop, gen: AsyncIterator[T]
                   ) -> AsyncIterator[T]:
    """The items of ``gen``, an async generator of the domain loop, stepped there one at a
    time as this side asks for them."""
    async def step() -> Any:
        try:
            return await gen.__anext__()
        except StopAsyncIteration:
            return _END

    try:
        while (item := await on_loop(domain, step())) is not _END:
            yield item
    finally:
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:  # a generator left half-way (its client went away)
            domain.call_soon_threadsafe(lambda: domain.create_task(aclose()))


def _serialized(response: Message | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _front_unary(servicer: Any, method: str, kind: Kind,
                 domain: asyncio.AbstractEventLoop) -> Callable[..., Awaitable[bytes]]:
    handler = getattr(servicer, method)
    if kind == "read":
        async def serve(request: Message, context: Ctx) -> bytes:
            return _serialized(await handler(request, context))
        return serve
    body = functools.partial(handler.rpc_body, servicer)

    async def forward(request: Message, context: Ctx) -> bytes:
        async with _call(method, request, context):
            return _serialized(await on_loop(domain, body(request, context)))
        raise AssertionError("unreachable: _call re-raises")

    return forward


def _front_stream(servicer: Any, method: str, kind: Kind,
                  domain: asyncio.AbstractEventLoop) -> Callable[..., AsyncIterator[bytes]]:
    handler = getattr(servicer, method)
    if kind == "read_stream":
        async def serve(request: Message, context: Ctx) -> AsyncIterator[bytes]:
            async for item in handler(request, context):
                yield _serialized(item)
        return serve
    body = functools.partial(handler.rpc_body, servicer)

    async def forward(request: Message, context: Ctx) -> AsyncIterator[bytes]:
        async with _call(method, request, context):
            async for item in _bridged(domain, body(request, context)):
                yield _serialized(item)

    return forward


def generic_handler(servicer: Any, service: ServiceDescriptor,
                    domain: asyncio.AbstractEventLoop) -> grpc.GenericRpcHandler:
    """The gRPC handlers of every RPC of ``service`` that ``servicer`` serves, for a
    server on the front; ``domain`` is the loop that :func:`unary` and :func:`stream`
    handlers run on."""
    table: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        kind: Kind | None = getattr(getattr(servicer, method.name), "rpc_kind", None)
        if kind is None:
            raise TypeError(f"{service.name}.{method.name}: not a decorated handler")
        parse = getattr(pb, method.input_type.name).FromString
        if method.server_streaming:
            table[method.name] = grpc.unary_stream_rpc_method_handler(
                _front_stream(servicer, method.name, kind, domain), request_deserializer=parse)
        else:
            table[method.name] = grpc.unary_unary_rpc_method_handler(
                _front_unary(servicer, method.name, kind, domain), request_deserializer=parse)
    return grpc.method_handlers_generic_handler(service.full_name, table)
