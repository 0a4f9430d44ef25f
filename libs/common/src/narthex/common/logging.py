"""Process-wide structured JSON logging for narthex services, scrubbed of secrets."""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import orjson
import structlog
from opentelemetry import trace
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from narthex.common.context import request_id_var

__all__ = ["configure_logging", "get_logger", "log_line", "scrub"]

REDACTED = "[REDACTED]"

# Short strings cannot hold any of the secrets below (the shortest, an e-mail, is "a@b.co").
_MIN_SCRUB_LEN = 6
# Card numbers need at least 13 digits, so shorter strings skip the card scan entirely.
_MIN_CARD_LEN = 13
# Bounds the recursion so a self-referencing structure cannot blow the stack inside a log call.
_MAX_DEPTH = 32

# Normalised with "-" and "_" stripped and lower-cased, so "X-API-Key", "apiKey" and
# "client_secret" / "clientSecret" all hit.
_SENSITIVE_KEYS = frozenset(
    {
        "authorization",
        "proxyauthorization",
        "xapikey",
        "apikey",
        "cookie",
        "setcookie",
        "password",
        "passwd",
        "secret",
        "clientsecret",
        "token",
        "accesstoken",
        "refreshtoken",
        "keypepper",
    }
)

# Values we generate ourselves: scrubbing them is wasted work and must never alter them.
_OWN_KEYS = frozenset({"timestamp", "level", "service", "trace_id", "span_id"})

# The look-behind stops "onnx_model_v2_int8" (this project's bread and butter) from
# reading as a key; "nx_" must start a token.
_API_KEY_RE = re.compile(r"(?<![A-Za-z0-9])nx_[a-z]+_[A-Za-z0-9]+_[A-Za-z0-9_-]+")
_JWT_RE = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Keeps the scheme so a reader still sees what kind of credential was sent.
_AUTH_HEADER_RE = re.compile(
    r"""(?i)\b((?:proxy-)?authorization["']?\s*[:=]\s*["']?)"""
    r"""(?:(bearer|basic|digest|token|negotiate)\s+)?[^\s"',;]+"""
)
_AUTH_SCHEME_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/-]+=*")
# key=value / "key": "value" in free text (query strings, reprs of objects we do not know).
_SECRET_PAIR_RE = re.compile(
    r"""(?i)(?<![A-Za-z0-9_])"""
    r"""((?:x[-_]?)?api[-_]?key|password|passwd|client[-_]?secret|secret"""
    r"""|(?:access[-_]?|refresh[-_]?)?token|key[-_]?pepper)"""
    r"""(["']?\s*[:=]\s*["']?)[^\s"'&,;]+"""
)
_COOKIE_HEADER_RE = re.compile(r"""(?i)\b((?:set-)?cookie["']?\s*:\s*["']?)[^"'\r\n]+""")
# The look-behind anchors each match at the start of the local part, keeping the scan linear.
_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
# A run of digit groups joined by single spaces or dashes. Runs glued to letters (hex trace
# ids, "v2-1234...") or dash-joined to letters (UUIDs) are not cards; the atomic group stops
# the engine from backtracking into a shorter run that would dodge those checks, and the
# "digit space" look-behind stops it from retrying from the middle of a run (quadratic).
# The look-ahead skips runs too short to hold a card without a Python call per "HTTP/1.1".
_DIGIT_RUN_RE = re.compile(
    r"(?<![0-9A-Za-z-])(?<![0-9] )(?=[0-9][0-9 -]{12})"
    r"(?>[0-9]+(?:[ -][0-9]+)*)(?![0-9A-Za-z])(?!-[0-9A-Za-z])"
)
_DIGIT_GROUP_RE = re.compile(r"[0-9]+")
_CARD_FIRST_DIGITS = frozenset("23456")
# Printed cards group digits in fours (Amex 4-6-5, 19-digit cards end in a three); "4 4 4 ..."
# or "2 1 3 ..." sequences of small numbers are not cards.
_MIN_CARD_GROUP = 3
_ALL_DIGIT_UUID_RE = re.compile(r"[0-9]{8}-[0-9]{4}-[0-9]{4}-[0-9]{4}-[0-9]{12}")


def scrub(value: object) -> object:
    """Return ``value`` with secrets and personal data redacted; containers are copied, not mutated.

    Strings lose API keys, JWTs, credentials, e-mail addresses and card numbers; dicts,
    lists, tuples and sets are walked, and any value under a sensitive key (``password``,
    ``Authorization``, ``x-api-key`` ...) is replaced whatever its type. Other values are
    returned unchanged.
    """
    return _scrub(value, 0, stringify=False)


def _scrub(value: object, depth: int, *, stringify: bool) -> object:
    if isinstance(value, str):
        return _scrub_str(value)
    if value is None or isinstance(value, int | float):
        return value
    if depth >= _MAX_DEPTH:
        return "[TRUNCATED]"
    if isinstance(value, Mapping):
        return {
            _scrub_key(k): REDACTED
            if isinstance(k, str) and _is_sensitive_key(k)
            else _scrub(v, depth + 1, stringify=stringify)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v, depth + 1, stringify=stringify) for v in value]
    if isinstance(value, tuple):
        return tuple(_scrub(v, depth + 1, stringify=stringify) for v in value)
    if isinstance(value, frozenset):
        return frozenset(_scrub(v, depth + 1, stringify=stringify) for v in value)
    if isinstance(value, set):
        return {_scrub(v, depth + 1, stringify=stringify) for v in value}
    if stringify:
        # The JSON renderer would repr() this object *after* we ran, so do it now, the same
        # way structlog does, and scrub the text.
        as_structlog = getattr(value, "__structlog__", None)
        text = as_structlog() if callable(as_structlog) else repr(value)
        return _scrub(text, depth + 1, stringify=True)
    return value


def _scrub_key(key: object) -> object:
    return _scrub_str(key) if isinstance(key, str) else key


@functools.lru_cache(maxsize=1024)
@functools.lru_cache(maxsize=1024)
def _is_sensitive_key(key: str) -> bool:
    return key.replace("-", "").replace("_", "").lower() in _SENSITIVE_KEYS


def _scrub_str(text: str) -> str:
    if len(text) < _MIN_SCRUB_LEN:
        return text
    if len(text) <= _CACHED_LEN:
        return _scrub_short(text)
    return _scrub_text(text)


# Most log values are short and recur (event names, routes, methods, logger names):
# scrubbing them once, not once per line, takes a third off every access-log line.
_CACHED_LEN = 128


@functools.lru_cache(maxsize=8192)
def _scrub_short(text: str) -> str:
    return _scrub_text(text)


def _scrub_text(text: str) -> str:
    # Cheap substring checks first: most log text has none of these and costs no regex at all.
    if "nx_" in text:
        text = _API_KEY_RE.sub("[REDACTED:api_key]", text)
    lowered = text.lower()
    if "authorization" in lowered:
        text = _AUTH_HEADER_RE.sub(_redact_auth_header, text)
    if "earer" in lowered or "asic" in lowered:
        text = _AUTH_SCHEME_RE.sub(_redact_auth_scheme, text)
    if "eyJ" in text:
        text = _JWT_RE.sub("[REDACTED:jwt]", text)
    if "key" in lowered or "pass" in lowered or "secret" in lowered or "token" in lowered:
        text = _SECRET_PAIR_RE.sub(r"\1\2" + REDACTED, text)
    if "cookie" in lowered:
        text = _COOKIE_HEADER_RE.sub(r"\1" + REDACTED, text)
    if "@" in text:
        text = _EMAIL_RE.sub("[REDACTED:email]", text)
    if len(text) >= _MIN_CARD_LEN:
        text = _DIGIT_RUN_RE.sub(_redact_cards_in_run, text)
    return text


def _redact_auth_header(match: re.Match[str]) -> str:
    prefix, scheme = match.group(1), match.group(2)
    return f"{prefix}{scheme} {REDACTED}" if scheme else f"{prefix}{REDACTED}"


def _redact_auth_scheme(match: re.Match[str]) -> str:
    return f"{match.group(1)} {REDACTED}"


def _redact_cards_in_run(match: re.Match[str]) -> str:
    run = match.group()
    if _ALL_DIGIT_UUID_RE.fullmatch(run):
        return run
    groups = [(g.start(), g.end()) for g in _DIGIT_GROUP_RE.finditer(run)]
    # A run may hold a card next to unrelated numbers ("qty 2 4111 1111 1111 1111"), so look
    # for the longest plausible card starting at each group boundary.
    pieces: list[str] = []
    cursor = 0
    i = 0
    while i < len(groups):
        if run[groups[i][0]] not in _CARD_FIRST_DIGITS:
            i += 1
            continue
        best = -1
        digits = ""
        for j in range(i, len(groups)):
            start, end = groups[j]
            if end - start < _MIN_CARD_GROUP:
                break
            digits += run[start:end]
            if len(digits) > 19:
                break
            if len(digits) >= _MIN_CARD_LEN and _is_plausible_card(digits):
                best = j
        if best < 0:
            i += 1
            continue
        pieces.append(run[cursor : groups[i][0]])
        pieces.append("[REDACTED:card]")
        cursor = groups[best][1]
        i = best + 1
    if not pieces:
        return run
    pieces.append(run[cursor:])
    return "".join(pieces)


def _is_plausible_card(digits: str) -> bool:
    # Issuers only use leading digits 3-6, plus 2 for 16-digit Mastercards. This is what
    # keeps epoch-millisecond timestamps (13 digits, leading 1 until 2033) out, since a tenth
    # of them pass Luhn.
    first = digits[0]
    if not ("3" <= first <= "6" or (first == "2" and len(digits) == 16)):
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _dumps(value: object, **_kw: object) -> str:
    # orjson: ~5x faster than json.dumps on a log line; objects it does not know
    # become their repr (already scrubbed as text by the scrubber when it ran).
    return orjson.dumps(value, default=repr).decode()


def _scrub_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    return {
        key: value
        if key in _OWN_KEYS
        else REDACTED
        if _is_sensitive_key(key)
        else _scrub(value, 1, stringify=True)
        for key, value in event_dict.items()
    }


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
    handed out by `get_logger` pick up the new one.
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
                _scrub_event,
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

    processors = [*shared, _scrub_event, renderer]
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
        # `log = get_logger(__name__)`) to the old stream and level.
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
    """Write the line `get_logger(logger).<level>(event, **fields)` would, without going
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
        getattr(get_logger(logger), logging.getLevelName(level).lower())(event, **fields)
        return
    if level < direct.level:
        return
    # What _scrub_event does, for the flat values this takes: strings scrubbed (short,
    # recurring ones from the cache), numbers as they are, sensitive keys redacted.
    line: dict[str, Any] = {
        key: REDACTED
        if _is_sensitive_key(key)
        else _scrub_str(value)
        if isinstance(value, str)
        else value
        for key, value in fields.items()
    }
    line["event"] = _scrub_str(event)
    line["logger"] = _scrub_str(logger)
    line["service"] = direct.service
    request_id = request_id_var.get()
    if request_id is not None and "request_id" not in line:
        line["request_id"] = _scrub_str(request_id)
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


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """Return a structlog logger that follows the current `configure_logging` setup."""
    logger: FilteringBoundLogger = (
        structlog.get_logger(name) if name is not None else structlog.get_logger()
    )
    return logger
