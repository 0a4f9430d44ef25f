"""Tracing: ids always, recording only when exported, W3C context on outgoing calls."""

from __future__ import annotations

import re

import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from narthex.common.app import service_app
from narthex.common.http import ServiceClient
from narthex.common.settings import ServiceSettings
from narthex.common.telemetry import TracingMiddleware, build_tracer_provider, trace_headers
from tests.support.upstream import UpstreamServer

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def test_without_otlp_endpoint_spans_have_ids_but_are_not_recorded() -> None:
    provider = build_tracer_provider("svc", {})
    span = provider.get_tracer("t").start_span("x")
    assert span.get_span_context().is_valid
    assert not span.is_recording()
    assert not provider._active_span_processor._span_processors  # nothing exported


def test_with_otlp_endpoint_spans_are_recorded_and_batched_for_export() -> None:
    provider = build_tracer_provider(
        "svc", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    )
    try:
        span = provider.get_tracer("t").start_span("x")
        assert span.is_recording()
        processors = provider._active_span_processor._span_processors
        assert any(isinstance(p, BatchSpanProcessor) for p in processors)
        # Not ended: nothing is queued, so shutdown does not try to reach the endpoint.
    finally:
        provider.shutdown()


def test_trace_headers_format_the_current_span_as_w3c() -> None:
    tracer = TracerProvider().get_tracer("t")
    assert trace_headers() == []
    with tracer.start_as_current_span("x") as span:
        ((name, value),) = trace_headers()
    assert name == b"traceparent"
    match = TRACEPARENT.fullmatch(value.decode())
    assert match is not None
    ctx = span.get_span_context()
    assert match.group(1) == format(ctx.trace_id, "032x")
    assert match.group(2) == format(ctx.span_id, "016x")


async def test_server_span_is_named_by_route_and_continues_the_caller() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = service_app(ServiceSettings(tracing=False), title="t", description="t")

    @app.get("/things/{thing_id}")
    async def thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    traced = TracingMiddleware(app, provider=provider)
    parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=traced), base_url="http://t"
    ) as c:
        response = await c.get(
            "/things/7", headers={"traceparent": f"00-{parent_trace}-00f067aa0ba902b7-01"}
        )
        await c.get("/healthz")  # a probe without trace context: no span
    assert response.status_code == 200
    (span,) = exporter.get_finished_spans()
    assert span.name == "GET /things/{thing_id}"
    assert format(span.context.trace_id, "032x") == parent_trace
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200
    assert span.kind == trace.SpanKind.SERVER


async def test_service_client_sends_the_current_trace_on_both_paths() -> None:
    tracer = TracerProvider().get_tracer("t")
    async with UpstreamServer() as server, ServiceClient("up", server.url) as client:
        with tracer.start_as_current_span("caller") as span:
            await client.get("/via-httpx")
            await client.forward("GET", "/via-forward", [], b"")
        trace_id = format(span.get_span_context().trace_id, "032x")
        seen = [r.headers.get("traceparent", "") for r in server.requests]
    assert len(seen) == 2
    for value in seen:
        match = TRACEPARENT.fullmatch(value)
        assert match is not None, value
        assert match.group(1) == trace_id
