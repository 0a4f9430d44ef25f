"""Process-wide structured JSON logging for narthex services: structlog and stdlib logging
configured as one stream of scrubbed JSON lines (the scrubbing is `narthex.common.scrub`)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import orjson
import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

from narthex.common.context import request_id_var
from narthex.common.scrub import REDACTED, is_sensitive_key, scrub_event, scrub_str

__all__ = ["configure_logging", "log_line"]


def _dumps(value: object, **_kw: object) -> str:
    # orjson: ~5x faster than json.dumps on a log line; objects it does not know
    # become their repr (already scrubbed as text by the scrubber when it ran).
    return orjson.dumps(value, default=repr).decode()


def _add_request_id(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # Read from the request context rather than bound per request: binding costs
    # every request a few microseconds, reading costs only the lines written.
    request_id = request_id_var.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


def _add_trace_ids(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict["trace_id"] = format(ctx.trace_id, "032x")
        event_dict["span_id"] = format(ctx.span_id, "016x")
    return event_dict


def _add_logger_name(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    name = record.name if record is not None else getattr(logger, "name", None)
    if name:
        event_dict["logger"] = name
    return event_dict


def _add_service(service: str) -> Processor:
    def add_service(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict["service"] = service
        return event_dict

    return add_service


class _LineWriter:
    """structlog's final logger: writes each rendered line to the handler's stream.

    It takes the stdlib handler's lock so structlog and stdlib lines never interleave
    mid-line on the shared stream, and writes line and newline in one call.
    """

    __slots__ = ("_handler", "name")

    def __init__(self, handler: logging.StreamHandler[TextIO], name: str | None) -> None:
        self._handler = handler
        self.name = name

    def msg(self, message: str) -> None:
        self._handler.acquire()
        try:
            stream = self._handler.stream
            stream.write(message + "\n")
            if not self._flush_later():
                stream.flush()
        except Exception:
            # Same contract as stdlib handlers: a broken stream must not fail the caller's
            # request; handleError reports it on stderr.
            self._handler.handleError(logging.makeLogRecord({"msg": message}))
        finally:
            self._handler.release()

    log = debug = info = warn = warning = error = err = critical = fatal = exception = msg

    def _flush_later(self) -> bool:
        """On an event loop's thread, flush once at the end of the loop's turn rather than
        once a line: a busy server writes a line per request, dozens per turn, and each
        flush is a write(2). A line waits at most until the loop's next turn."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        key = (self._handler, loop)
        if key not in _PENDING:
            _PENDING.add(key)
            loop.call_soon(_flush, key)
        return True


# (handler, loop): lines written on that loop's thread, one flush scheduled on it. Keyed
# by loop too: a loop closed before its flush ran must not stop another loop's flushes.
_PENDING: set[tuple[logging.StreamHandler[TextIO], asyncio.AbstractEventLoop]] = set()


def _flush(key: tuple[logging.StreamHandler[TextIO], asyncio.AbstractEventLoop]) -> None:
    _PENDING.discard(key)
    handler = key[0]
    handler.acquire()
    try:
        handler.stream.flush()
    except Exception:
        handler.handleError(logging.makeLogRecord({"msg": "(flushing log lines)"}))
    finally:
        handler.release()


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler bound to whatever ``sys.stdout`` is at each write.

    Test runners (pytest's capture) swap and close ``sys.stdout`` between tests; holding the
    object seen at configure time would leave every later line writing to a closed file.
    """

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


# Loggers that servers configure with their own console handlers and propagate=False; we
# take them over so their lines come out as JSON through the root handler too.
_ADOPTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")

_installed_handler: logging.Handler | None = None


def configure_logging(
    service: str,
    *,
    level: str = "INFO",
    json: bool = True,
    stream: TextIO | None = None,
) -> None:
    """Send structlog and stdlib logging, as scrubbed JSON lines, to ``stream`` (stdout).

    Safe to call again: each call replaces the previous configuration, and loggers already
    handed out by `structlog.get_logger` pick up the new one.
    """
    global _installed_handler

    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}")
    handler: logging.StreamHandler[TextIO] = (
        logging.StreamHandler(stream) if stream is not None else _StdoutHandler()
    )

    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=handler.stream.isatty())
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_logger_name,
        _add_service(service),
        _add_request_id,
        _add_trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]

    handler.setLevel(numeric_level)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                scrub_event,
                renderer,
            ],
        )
    )

    root = logging.getLogger()
    for owner in (root, *(logging.getLogger(name) for name in _ADOPTED_LOGGERS)):
        for existing in list(owner.handlers):
            # Exact-type StreamHandlers are console writers (basicConfig, uvicorn's dictConfig)
            # that would put unscrubbed plain-text lines next to ours. Other handlers (files,
            # pytest's capture) write elsewhere and are left alone.
            if existing is _installed_handler or type(existing) is logging.StreamHandler:
                owner.removeHandler(existing)
        if owner is not root:
            owner.propagate = True
    root.addHandler(handler)
    root.setLevel(numeric_level)
    _installed_handler = handler

    def logger_factory(*args: Any) -> _LineWriter:
        return _LineWriter(handler, args[0] if args else None)

    processors = [*shared, scrub_event, renderer]
    global _direct
    _direct = _Direct(_LineWriter(handler, None), service, numeric_level, processors)
    if not json:
        _direct = None

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=logger_factory,
        context_class=dict,
        # Caching would pin loggers created before a reconfiguration (module-level
        # `log = structlog.get_logger(__name__)`) to the old stream and level.
        cache_logger_on_first_use=False,
    )


class _Direct:
    """What `log_line` needs of the current configuration (JSON output only)."""

    __slots__ = ("level", "processors", "renderer", "service", "writer")

    def __init__(
        self, writer: _LineWriter, service: str, level: int, processors: list[Processor]
    ) -> None:
        self.writer = writer
        self.service = service
        self.level = level
        # structlog keeps this very list until configured again; capture_logs swaps
        # its contents in place. Either way lines must then go through structlog.
        self.processors = processors
        self.renderer = processors[-1]


_direct: _Direct | None = None
_UTC = datetime.UTC


def log_line(logger: str, level: int, event: str, fields: Mapping[str, str | int | float]) -> None:
    """Write the line `structlog.get_logger(logger).<level>(event, **fields)` would, without going
    through structlog's processor chain: same keys in the same order, the same scrubbing
    of every string, the same writer. For a line written per request (the access log),
    where the chain cost more CPU than the rest of a proxied request's Python. Falls back
    to structlog for console output, while its processors are swapped (capture_logs) and
    whenever context variables are bound (which the chain would merge in)."""
    direct = _direct
    if (
        direct is None
        or structlog.get_config()["processors"] is not direct.processors
        or direct.processors[-1:] != [direct.renderer]
        or structlog.contextvars.get_contextvars()
    ):
        getattr(structlog.get_logger(logger), logging.getLevelName(level).lower())(event, **fields)
        return
    if level < direct.level:
        return
    # What _scrub_event does, for the flat values this takes: strings scrubbed (short,
    # recurring ones from the cache), numbers as they are, sensitive keys redacted.
    line: dict[str, Any] = {
        key: REDACTED
        if is_sensitive_key(key)
        else scrub_str(value)
        if isinstance(value, str)
        else value
        for key, value in fields.items()
    }
    line["event"] = scrub_str(event)
    line["logger"] = scrub_str(logger)
    line["service"] = direct.service
    request_id = request_id_var.get()
    if request_id is not None and "request_id" not in line:
        line["request_id"] = scrub_str(request_id)
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        line["trace_id"] = format(ctx.trace_id, "032x")
        line["span_id"] = format(ctx.span_id, "016x")
    line["timestamp"] = _iso_utc_now()
    line["level"] = _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower()
    direct.writer.msg(_dumps(line))


_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
_second: list[Any] = [None, ""]


def _iso_utc_now() -> str:
    """structlog's `TimeStamper(fmt="iso", utc=True)` text, its date and time formatted
    once a second rather than once a line."""
    now = time.time()
    second = int(now)
    if _second[0] != second:
        stamp = datetime.datetime.fromtimestamp(second, _UTC).isoformat()
        _second[:] = [second, stamp.removesuffix("+00:00")]
    micro = int((now - second) * 1e6)
    return f"{_second[1]}.{micro:06d}Z" if micro else f"{_second[1]}Z"
