"""Prometheus metrics of the daemon, and the HTTP endpoint that serves them.

Off by default; when enabled it listens on loopback (``127.0.0.1:9090``, CRI-O's port)
unless configured otherwise. The endpoint runs on the daemon's event loop (so collectors
that read the in-memory container records never race the loop) and answers
``GET /metrics`` in the Prometheus text format (or OpenMetrics when asked for it).

Other modules record what happens through the ``record_*`` functions; they are cheap and
never fail, whether or not the endpoint runs:

- :func:`record_operation`: every CRI call (count by method and code, latency histogram,
  errors by method and code); called from ``server.rpc._finish``.
- :func:`record_image_pull`, :func:`record_image_pull_failure`: pulls, bytes, layers.
- :func:`record_oom_kill`, :func:`record_container_event`: via :func:`track_containers`,
  which also exports the containers by state and the live monitor processes, read at
  scrape time.
- :func:`record_events_lost`: events discarded for slow ``GetContainerEvents`` readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from moorage import __version__, log

__all__ = [
    "REGISTRY",
    "MetricsServer",
    "exposition",
    "record_container_event",
    "record_events_lost",
    "record_image_pull",
    "record_image_pull_failure",
    "record_oom_kill",
    "record_operation",
    "track_containers",
]

_log = log.get("moorage.metrics")
PREFIX = "moorage"
#: Streams that stay open for as long as the client wants: counted, but kept out of the
#: latency histogram (their "latency" is the client's patience).
LONG_LIVED = frozenset({"GetContainerEvents"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Largest request head the endpoint reads, and how long it waits for it.
MAX_REQUEST_HEAD = 16 * 1024
REQUEST_TIMEOUT = 10.0

#: The daemon's registry (not prometheus_client's global one: nothing else lands in it).
REGISTRY = CollectorRegistry()

_operations = Counter(
    f"{PREFIX}_operations", "CRI calls by method and gRPC status code.",
    ["operation", "code"], registry=REGISTRY)
_latency = Histogram(
    f"{PREFIX}_operations_latency_seconds", "Duration of CRI calls by method.",
    ["operation"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
_errors = Counter(
    f"{PREFIX}_operations_errors", "CRI calls that failed, by method and gRPC status code.",
    ["operation", "code"], registry=REGISTRY)
_pulls = Counter(
    f"{PREFIX}_image_pulls", "Image pulls by result (success, failure).",
    ["result"], registry=REGISTRY)
_pull_failures = Counter(
    f"{PREFIX}_image_pulls_failures", "Failed image pulls by gRPC status code.",
    ["code"], registry=REGISTRY)
_pull_bytes = Counter(
    f"{PREFIX}_image_pulls_bytes", "Bytes downloaded from registries by image pulls.",
    registry=REGISTRY)
_pull_layers = Counter(
    f"{PREFIX}_image_pulls_layers", "Layers of pulled images, downloaded or already present.",
    ["source"], registry=REGISTRY)
_oom = Counter(
    f"{PREFIX}_containers_oom", "Containers killed by the kernel's OOM killer.",
    registry=REGISTRY)
_events = Counter(
    f"{PREFIX}_container_events", "Container lifecycle events by type.",
    ["type"], registry=REGISTRY)
_events_lost = Counter(
    f"{PREFIX}_container_events_lost",
    "Container events discarded because a GetContainerEvents client read too slowly.",
    registry=REGISTRY)
_info = Gauge(f"{PREFIX}_build_info", "moorage's version.", ["version"], registry=REGISTRY)
_info.labels(version=__version__).set(1)
ProcessCollector(namespace=PREFIX, registry=REGISTRY)


# -- recording ------------------------------------------------------------------------------------


#: (method, code) -> the label children it updates (labels() is a locked lookup each time).
_op_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}


def record_operation(method: str, code: str, seconds: float) -> None:
    """One finished CRI call: ``code`` is the grpc.StatusCode name ("OK", "NOT_FOUND"...)."""
    children = _op_children.get((method, code))
    if children is None:
        children = (
            _operations.labels(operation=method, code=code),
            _latency.labels(operation=method) if method not in LONG_LIVED else None,
            _errors.labels(operation=method, code=code) if code != "OK" else None,
        )
        _op_children[(method, code)] = children
    count, latency, errors = children
    count.inc()
    if latency is not None:
        latency.observe(max(seconds, 0.0))
    if errors is not None:
        errors.inc()


def record_image_pull(*, downloaded_bytes: int = 0, layers_downloaded: int = 0,
                      layers_present: int = 0) -> None:
    """A successful pull, with what it downloaded and which layers it already had."""
    _pulls.labels(result="success").inc()
    if downloaded_bytes > 0:
        _pull_bytes.inc(downloaded_bytes)
    if layers_downloaded > 0:
        _pull_layers.labels(source="downloaded").inc(layers_downloaded)
    if layers_present > 0:
        _pull_layers.labels(source="present").inc(layers_present)


def record_image_pull_failure(code: str, downloaded_bytes: int = 0) -> None:
    """A failed pull; ``code`` is the gRPC status code name it answered with."""
    _pulls.labels(result="failure").inc()
    _pull_failures.labels(code=code).inc()
    if downloaded_bytes > 0:
        _pull_bytes.inc(downloaded_bytes)


def record_oom_kill() -> None:
    _oom.inc()


def record_container_event(event: str) -> None:
    _events.labels(type=event).inc()


def record_events_lost(count: int) -> None:
    if count > 0:
        _events_lost.inc(count)


# -- state read at scrape time ------------------------------------------------------------------


class _ContainerLike(Protocol):
    @property
    def state(self) -> Any: ...

    @property
    def monitor_pid(self) -> int: ...

    @property
    def reason(self) -> str: ...


class ContainerSource(Protocol):
    """What :func:`track_containers` needs of the container manager."""

    listeners: list[Callable[[str, Any], None]]

    def select(self) -> Sequence[Any]: ...


def _pid_alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


class _RuntimeCollector(Collector):
    """Gauges computed when scraped, from callables set by :func:`track_containers`."""

    def __init__(self) -> None:
        self.states: Callable[[], dict[str, int]] | None = None
        self.monitors: Callable[[], int] | None = None
        self.subscribers: Callable[[], int] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.states is not None:
            family = GaugeMetricFamily(f"{PREFIX}_containers", "Containers by state.",
                                       labels=["state"])
            for state, count in sorted(self.states().items()):
                family.add_metric([state], count)
            yield family
        if self.monitors is not None:
            yield GaugeMetricFamily(f"{PREFIX}_monitor_processes",
                                    "Live per-container monitor processes.",
                                    value=self.monitors())
        if self.subscribers is not None:
            yield GaugeMetricFamily(f"{PREFIX}_container_event_subscribers",
                                    "Open GetContainerEvents streams.",
                                    value=self.subscribers())

    def describe(self) -> Iterable[Metric]:
        return []


_runtime = _RuntimeCollector()
REGISTRY.register(_runtime)

STATES = ("created", "running", "exited", "unknown")


class _HasSubscribers(Protocol):
    @property
    def subscribers(self) -> int: ...


def track_containers(containers: ContainerSource,
                     events: _HasSubscribers | None = None) -> Callable[[str, Any], None]:
    """Count OOM kills and lifecycle events of ``containers`` (a listener is added to its
    ``listeners``), and export containers by state and live monitors at scrape time; with
    ``events`` (the GetContainerEvents broadcaster), its subscriber count too."""

    def listener(event: str, c: Any) -> None:
        record_container_event(event)
        if event == "stopped" and getattr(c, "reason", "") == "OOMKilled":
            record_oom_kill()

    def states() -> dict[str, int]:
        counts = Tally(str(getattr(c.state, "value", c.state)) for c in containers.select())
        return {s: counts.get(s, 0) for s in (*STATES, *counts)}

    def monitors() -> int:
        return sum(1 for c in containers.select() if _pid_alive(int(c.monitor_pid or 0)))

    containers.listeners.append(listener)
    _runtime.states, _runtime.monitors = states, monitors
    if events is not None:
        _runtime.subscribers = lambda: events.subscribers
    return listener


# -- the endpoint ---------------------------------------------------------------------------------


def exposition(accept: str = "") -> tuple[bytes, str]:
    """The current metrics and their content type, in the format ``accept`` asks for."""
    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type


def _response(status: str, body: bytes, content_type: str, head_only: bool = False,
              extra: Sequence[str] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on ``host:port`` (port 0: any free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9090) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        assert self._server is not None and self._server.sockets
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_REQUEST_HEAD)
        host, port = self.address
        _log.info("metrics.listening", host=host, port=port)
        return host, port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._answer(head))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass
        except Exception:
            _log.exception("metrics.request_failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    def _answer(head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response("400 Bad Request", b"bad request\n", "text/plain")
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"only GET\n", "text/plain",
                             extra=["Allow: GET, HEAD"])
        path = target.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = exposition(headers.get("accept", ""))
            return _response("200 OK", body, content_type, method == "HEAD")
        if path == "/":
            return _response("200 OK", b"moorage metrics: /metrics\n", "text/plain",
                             method == "HEAD")
        return _response("404 Not Found", b"not found\n", "text/plain", method == "HEAD")
