"""OTLP export, checked end to end against a real OTLP/HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mesh_middleware.telemetry import otel, spans
from mesh_middleware.telemetry.spans import start_span
from mesh_middleware.telemetry.tracecontext import incoming

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Receiver:
    """A minimal OTLP/HTTP traces endpoint: decodes each protobuf POST to /v1/traces."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append(request)
                receiver.content_types.append(self.headers["Content-Type"])
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[tuple[str, ProtoSpan]]:
        """(service.name, span) for every span received."""
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                attributes = {
                    a.key: a.value.string_value for a in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    assert scope_spans.scope.name == "mesh_middleware"
                    found.extend((attributes["service.name"], s) for s in scope_spans.spans)
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    otel.disable(timeout=2)
    running.close()


@pytest.fixture(autouse=True)
def clean_exporter() -> Iterator[None]:
    yield
    otel.disable(timeout=2)
    spans.set_exporter(None)


def attributes_of(span: ProtoSpan) -> dict[str, object]:
    values: dict[str, object] = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


def test_spans_arrive_at_a_real_otlp_receiver_with_our_ids(receiver: Receiver) -> None:
    assert otel.enable_otlp(receiver.url, service_name="checkout")
    parent = incoming(CALLER, ["congo=t61rcWkgMzE"])
    server = start_span("GET /orders", "server", parent, attributes={"http.route": "/orders"})
    client = start_span("GET inventory", "client", server.context)
    client.end(503)
    server.end(200)
    unsampled = start_span("quiet", "server", incoming(CALLER[:-2] + "00", []))
    unsampled.end(200)
    assert otel.flush(10)

    assert receiver.content_types == ["application/x-protobuf"] * len(receiver.requests)
    received = {span.name: (service, span) for service, span in receiver.spans()}
    assert set(received) == {"GET /orders", "GET inventory"}
    service, got_server = received["GET /orders"]
    assert service == "checkout"
    assert got_server.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert got_server.span_id.hex() == server.context.span_id
    assert got_server.parent_span_id.hex() == "b7ad6b7169203331"
    assert got_server.trace_state == "congo=t61rcWkgMzE"
    assert got_server.kind == ProtoSpan.SPAN_KIND_SERVER
    assert (got_server.start_time_unix_nano, got_server.end_time_unix_nano) == (
        server.start_ns,
        server.end_ns,
    )
    assert got_server.status.code == ProtoStatus.STATUS_CODE_UNSET
    assert attributes_of(got_server) == {"http.route": "/orders", "http.response.status_code": 200}

    _, got_client = received["GET inventory"]
    assert got_client.trace_id == got_server.trace_id
    assert got_client.parent_span_id == got_server.span_id
    assert got_client.span_id.hex() == client.context.span_id
    assert got_client.kind == ProtoSpan.SPAN_KIND_CLIENT
    assert got_client.status.code == ProtoStatus.STATUS_CODE_ERROR
    assert attributes_of(got_client) == {"http.response.status_code": 503, "error.type": "503"}


def test_an_unreachable_collector_never_reaches_the_request_path(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.close()  # nothing listens on the port any more
    caplog.set_level(logging.CRITICAL)
    assert otel.enable_otlp(receiver.url, service_name="checkout", timeout=0.5)
    for i in range(10):
        start_span(f"s{i}", "server", None).end(200)
    assert spans.flush(5)


def test_any_sdk_exporter_can_be_used_and_errors_become_error_status() -> None:
    memory = InMemorySpanExporter()
    assert otel.enable_exporter(memory, service_name="payments")
    span = start_span("POST /pay", "server", None)
    span.end(None, error="ConnectionResetError")
    assert otel.flush(10)
    (exported,) = memory.get_finished_spans()
    assert exported.name == "POST /pay"
    assert exported.kind is SpanKind.SERVER
    assert exported.parent is None
    assert exported.status.status_code is StatusCode.ERROR
    assert exported.status.description == "ConnectionResetError"
    assert exported.attributes == {"error.type": "ConnectionResetError"}
    assert exported.resource.attributes["service.name"] == "payments"
    assert exported.context.trace_flags == 0x03
    assert f"{exported.context.trace_id:032x}" == span.context.trace_id


def test_enabling_again_replaces_the_exporter() -> None:
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    assert otel.enable_exporter(first, service_name="a")
    start_span("one", "server", None).end(200)
    assert otel.enable_exporter(second, service_name="b")
    start_span("two", "server", None).end(200)
    assert otel.flush(10)
    assert [s.name for s in first.get_finished_spans()] == ["one"]
    assert [s.name for s in second.get_finished_spans()] == ["two"]


def test_without_the_packages_it_says_so_once_and_returns_false(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace.export", None)
    monkeypatch.setattr(otel, "_warned_missing", False)
    assert otel.enable_otlp(service_name="x") is False
    assert otel.enable_exporter(InMemorySpanExporter(), service_name="x") is False
    warnings = [r for r in caplog.records if "mesh-middleware[otel]" in r.message]
    assert len(warnings) == 1


def test_importing_the_mesh_does_not_import_opentelemetry() -> None:
    script = (
        "import sys, mesh_middleware, mesh_middleware.telemetry.otel, "
        "mesh_middleware.telemetry.spans, mesh_middleware.telemetry.tracecontext\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
