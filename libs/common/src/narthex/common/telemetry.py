"""OpenTelemetry: one tracer provider per process, FastAPI/httpx/redis instrumentation."""

from __future__ import annotations

import importlib.util
import os

import httpx
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"

_provider: TracerProvider | None = None


def setup_tracing(service: str) -> TracerProvider:
    """Install the process's tracer provider (once). Spans are always made, so trace ids
    reach logs and error bodies; they leave the process only when OTLP is configured."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    if os.environ.get(OTLP_ENDPOINT_ENV):
        # Imported here: the exporter pulls in protobuf, which a process without an
        # endpoint never needs.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _instrument_redis()
    _provider = provider
    return provider


def instrument_app(app: FastAPI, provider: TracerProvider) -> None:
    # The per-message "receive"/"send" spans triple the span count for no insight.
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        exclude_spans=["receive", "send"],
        excluded_urls="healthz,readyz,metrics",
    )


def instrument_client(client: httpx.AsyncClient, provider: TracerProvider | None = None) -> None:
    """Client spans and W3C `traceparent` on every call this client makes."""
    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=provider or _provider)


def _instrument_redis() -> None:
    try:
        from opentelemetry.instrumentation.redis import RedisInstrumentor
    except ImportError:  # pragma: no cover - redis instrumentation is a declared dependency
        return
    if importlib.util.find_spec("redis") is None:
        return  # a service without a Redis client has nothing to instrument
    RedisInstrumentor().instrument()
