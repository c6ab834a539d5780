"""The Prometheus metrics: recording functions, the exposition parsed back by
prometheus_client's own parser, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moorage import metrics


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


def scrape() -> dict[str, Any]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return families(body.decode())


def test_operations_latency_and_errors() -> None:
    before = scrape()
    metrics.record_operation("ListContainers", "OK", 0.002)
    metrics.record_operation("ListContainers", "OK", 0.004)
    metrics.record_operation("StartContainer", "FAILED_PRECONDITION", 0.01)
    metrics.record_operation("GetContainerEvents", "OK", 3600.0)
    after = scrape()

    def delta(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    ops = "moorage_operations"
    assert delta(ops, "moorage_operations_total", operation="ListContainers", code="OK") == 2
    assert after[ops].type == "counter"
    lat = "moorage_operations_latency_seconds"
    assert after[lat].type == "histogram"
    assert delta(lat, f"{lat}_count", operation="ListContainers") == 2
    assert delta(lat, f"{lat}_bucket", operation="ListContainers", le="0.0025") == 1
    assert delta(lat, f"{lat}_bucket", operation="ListContainers", le="0.005") == 2
    # A long-lived stream is counted but stays out of the latency histogram.
    assert delta(ops, "moorage_operations_total", operation="GetContainerEvents",
                 code="OK") == 1
    assert delta(lat, f"{lat}_count", operation="GetContainerEvents") == 0
    errs = "moorage_operations_errors"
    assert delta(errs, "moorage_operations_errors_total", operation="StartContainer",
                 code="FAILED_PRECONDITION") == 1
    assert delta(errs, "moorage_operations_errors_total", operation="ListContainers",
                 code="OK") == 0


def test_image_pulls_oom_and_events() -> None:
    before = scrape()
    metrics.record_image_pull(downloaded_bytes=1000, layers_downloaded=2, layers_present=1)
    metrics.record_image_pull_failure("NOT_FOUND", downloaded_bytes=10)
    metrics.record_oom_kill()
    metrics.record_events_lost(3)
    metrics.record_events_lost(0)
    after = scrape()

    def delta(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert delta("moorage_image_pulls", "moorage_image_pulls_total", result="success") == 1
    assert delta("moorage_image_pulls", "moorage_image_pulls_total", result="failure") == 1
    assert delta("moorage_image_pulls_failures", "moorage_image_pulls_failures_total",
                 code="NOT_FOUND") == 1
    assert delta("moorage_image_pulls_bytes", "moorage_image_pulls_bytes_total") == 1010
    assert delta("moorage_image_pulls_layers", "moorage_image_pulls_layers_total",
                 source="downloaded") == 2
    assert delta("moorage_image_pulls_layers", "moorage_image_pulls_layers_total",
                 source="present") == 1
    assert delta("moorage_containers_oom", "moorage_containers_oom_total") == 1
    assert delta("moorage_container_events_lost", "moorage_container_events_lost_total") == 3
    assert value(after, "moorage_build_info", "moorage_build_info") == 1
    assert "moorage_process_resident_memory_bytes" in after


@dataclass
class FakeState:
    value: str


@dataclass
class FakeContainer:
    state: FakeState
    monitor_pid: int = 0
    reason: str = ""


@dataclass
class FakeManager:
    items: list[FakeContainer] = field(default_factory=list)
    listeners: list[Any] = field(default_factory=list)

    def select(self) -> list[FakeContainer]:
        return list(self.items)


@dataclass
class FakeEvents:
    subscribers: int = 2


def test_track_containers() -> None:
    import os

    mgr = FakeManager([FakeContainer(FakeState("running"), monitor_pid=os.getpid()),
                       FakeContainer(FakeState("running"), monitor_pid=2**22 + 12345),
                       FakeContainer(FakeState("exited"))])
    listener = metrics.track_containers(mgr, FakeEvents())
    assert mgr.listeners == [listener]
    before = scrape()
    listener("stopped", FakeContainer(FakeState("exited"), reason="OOMKilled"))
    listener("stopped", FakeContainer(FakeState("exited"), reason="Completed"))
    listener("started", FakeContainer(FakeState("running")))
    after = scrape()
    assert value(after, "moorage_containers", "moorage_containers", state="running") == 2
    assert value(after, "moorage_containers", "moorage_containers", state="exited") == 1
    assert value(after, "moorage_containers", "moorage_containers", state="created") == 0
    assert value(after, "moorage_monitor_processes", "moorage_monitor_processes") == 1
    assert value(after, "moorage_container_event_subscribers",
                 "moorage_container_event_subscribers") == 2
    oom = "moorage_containers_oom_total"
    assert value(after, "moorage_containers_oom", oom) - \
        value(before, "moorage_containers_oom", oom) == 1
    ev = "moorage_container_events_total"
    assert value(after, "moorage_container_events", ev, type="stopped") - \
        value(before, "moorage_container_events", ev, type="stopped") == 2


def test_openmetrics_on_request() -> None:
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await reader.read()
    except ConnectionError:  # the server hung up on a request it refused to read
        data = b""
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return lines[0], headers, body


async def test_endpoint_serves_what_a_prometheus_parser_reads() -> None:
    server = metrics.MetricsServer("127.0.0.1", 0)
    host, port = await server.start()
    try:
        assert host == "127.0.0.1" and port > 0
        metrics.record_operation("Version", "OK", 0.0001)
        status, headers, body = await http(
            port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"].startswith("text/plain; version=")
        assert int(headers["content-length"]) == len(body)
        fams = families(body.decode())
        assert value(fams, "moorage_operations", "moorage_operations_total",
                     operation="Version", code="OK") >= 1
        status, _, body = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body == b""
        status, _, _ = await http(port, b"GET /nope HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 404 Not Found"
        status, headers, _ = await http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 405 Method Not Allowed" and headers["allow"]
        status, _, _ = await http(port, b"garbage\r\n\r\n")
        assert status == "HTTP/1.1 400 Bad Request"
        # A client that sends a huge head or nothing is dropped, and the server goes on.
        status, _, _ = await http(port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
        assert status == ""
        status, _, _ = await http(port, b"GET / HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
    finally:
        await server.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
