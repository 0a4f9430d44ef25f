"""narthex.common.logging and the scrubbing it applies (narthex.common.scrub): JSON output,
trace correlation, secrets removed from every line, and `scrub()` on its own."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from narthex.common.context import request_id_var
from narthex.common.logging import configure_logging, log_line
from narthex.common.scrub import scrub


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _make_jwt() -> str:
    header = {"alg": "RS256", "typ": "JWT", "kid": "narthex-2024-11"}
    payload = {
        "sub": "tenant_42:user_7",
        "iss": "https://auth.narthex.example",
        "aud": "narthex-gateway",
        "iat": 1732366000,
        "exp": 1732369600,
        "scope": "models:predict",
    }
    return ".".join(
        [
            _b64url(json.dumps(header, separators=(",", ":")).encode()),
            _b64url(json.dumps(payload, separators=(",", ":")).encode()),
            _b64url(secrets.token_bytes(256)),
        ]
    )


JWT = _make_jwt()
API_KEY = "nx_live_k7Gq2p9X_3vYf8Q1w2e3r4t5y6u7i8o9p0aZbXcVd"
TEST_API_KEY = "nx_test_Ab12Cd34_" + secrets.token_urlsafe(24)
EMAIL = "jane.doe+billing@example.co.uk"
VISA = "4111 1111 1111 1111"
MASTERCARD = "5500-0000-0000-0004"
AMEX = "378282246310005"
BASIC_CREDENTIALS = base64.b64encode(b"svc-analytics:s3cr3t-Passw0rd").decode()

# (secret, placeholder that must replace it)
SECRETS = [
    pytest.param(API_KEY, "[REDACTED:api_key]", id="api-key"),
    pytest.param(TEST_API_KEY, "[REDACTED:api_key]", id="api-key-test-env"),
    pytest.param(JWT, "[REDACTED:jwt]", id="jwt"),
    pytest.param(EMAIL, "[REDACTED:email]", id="email"),
    pytest.param(VISA, "[REDACTED:card]", id="visa-spaced"),
    pytest.param(MASTERCARD, "[REDACTED:card]", id="mastercard-dashed"),
    pytest.param(AMEX, "[REDACTED:card]", id="amex-plain"),
]

# The token parts that must not survive, whatever survives around them.
CREDENTIALS = [API_KEY, TEST_API_KEY, JWT, EMAIL, VISA, MASTERCARD, AMEX, BASIC_CREDENTIALS]

_ADOPTED = ("uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Leave structlog, the root logger and uvicorn's loggers as each test found them."""
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved = {
        name: (list(lg.handlers), lg.propagate, lg.level)
        for name in _ADOPTED
        for lg in [logging.getLogger(name)]
    }
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for name, (handlers, propagate, level) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.propagate = propagate
        lg.setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    configure_logging("test-svc", stream=out)
    return out


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written must be a JSON object."""
    parsed = []
    for line in stream.getvalue().splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        parsed.append(obj)
    return parsed


def _only_line(stream: io.StringIO) -> dict[str, Any]:
    lines = _lines(stream)
    assert len(lines) == 1, lines
    return lines[0]


def _assert_clean(raw: str) -> None:
    for credential in CREDENTIALS:
        assert credential not in raw
    # Guard the spaced/dashed cards against partial survival too.
    assert "4111111111111111" not in raw.replace(" ", "").replace("-", "")
    assert "5500000000000004" not in raw.replace(" ", "").replace("-", "")


# --- secrets removed ------------------------------------------------------------------------


@pytest.mark.parametrize(("secret", "placeholder"), SECRETS)
def test_secret_in_message_is_redacted(stream: io.StringIO, secret: str, placeholder: str) -> None:
    structlog.get_logger(__name__).info(f"charging {secret} for tenant acme")

    line = _only_line(stream)
    assert line["event"] == f"charging {placeholder} for tenant acme"
    assert secret not in stream.getvalue()


@pytest.mark.parametrize(("secret", "placeholder"), SECRETS)
def test_secret_nested_in_event_values_is_redacted(
    stream: io.StringIO, secret: str, placeholder: str
) -> None:
    structlog.get_logger().info(
        "request",
        body={"customer": {"note": f"pay with {secret}", "history": [secret, ("x", secret)]}},
        tags=[{"v": secret}],
    )

    line = _only_line(stream)
    assert secret not in stream.getvalue()
    assert line["body"]["customer"]["note"] == f"pay with {placeholder}"
    assert line["body"]["customer"]["history"] == [placeholder, ["x", placeholder]]
    assert line["tags"] == [{"v": placeholder}]


def test_header_dict_credentials_are_redacted(stream: io.StringIO) -> None:
    headers = {
        "Authorization": f"Bearer {JWT}",
        "X-API-Key": API_KEY,
        "proxy-authorization": f"Basic {BASIC_CREDENTIALS}",
        "Cookie": "session=abc123def456",
        "Content-Type": "application/json",
        "X-Request-ID": "7f1c0b3a-9e2d-4c1b-8a7f-3e2d1c0b9a8f",
    }
    structlog.get_logger().info("upstream call", headers=headers)

    line = _only_line(stream)
    assert line["headers"] == {
        "Authorization": "[REDACTED]",
        "X-API-Key": "[REDACTED]",
        "proxy-authorization": "[REDACTED]",
        "Cookie": "[REDACTED]",
        "Content-Type": "application/json",
        "X-Request-ID": "7f1c0b3a-9e2d-4c1b-8a7f-3e2d1c0b9a8f",
    }
    _assert_clean(stream.getvalue())
    assert "abc123def456" not in stream.getvalue()


def test_sensitive_keys_are_redacted_whatever_the_value_type(stream: io.StringIO) -> None:
    structlog.get_logger().info(
        "login",
        password=123456,
        token=None,
        client_secret={"nested": "value"},
        key_pepper=b"pepper-bytes",
        refreshToken=["a", "b"],
        settings={"API_KEY": 42, "passwd": True, "timeout_s": 5},
    )

    line = _only_line(stream)
    for key in ("password", "token", "client_secret", "key_pepper", "refreshToken"):
        assert line[key] == "[REDACTED]", key
    assert line["settings"] == {"API_KEY": "[REDACTED]", "passwd": "[REDACTED]", "timeout_s": 5}


def test_credentials_in_free_text_are_redacted(stream: io.StringIO) -> None:
    structlog.get_logger().warning(
        f"upstream rejected Authorization: Bearer {JWT}; retried with basic {BASIC_CREDENTIALS}"
    )

    line = _only_line(stream)
    assert line["event"] == (
        "upstream rejected Authorization: Bearer [REDACTED]; retried with basic [REDACTED]"
    )


def test_exception_traceback_is_scrubbed(stream: io.StringIO) -> None:
    log = structlog.get_logger(__name__)
    message = f"lookup failed for {API_KEY} owned by {EMAIL} paying {VISA} with {JWT}"
    try:
        raise RuntimeError(message)
    except RuntimeError:
        log.exception("key lookup crashed")

    line = _only_line(stream)
    assert line["level"] == "error"
    assert line["event"] == "key lookup crashed"
    exception = line["exception"]
    assert isinstance(exception, str)
    assert "Traceback (most recent call last)" in exception
    assert (
        "RuntimeError: lookup failed for [REDACTED:api_key] owned by [REDACTED:email] "
        "paying [REDACTED:card] with [REDACTED:jwt]"
    ) in exception
    _assert_clean(stream.getvalue())


def test_unknown_objects_are_rendered_then_scrubbed(stream: io.StringIO) -> None:
    class Credentials:
        def __repr__(self) -> str:
            return f"Credentials(key={API_KEY!r}, owner={EMAIL!r})"

    structlog.get_logger().info("loaded", creds=Credentials(), raw=f"email={EMAIL}".encode())

    line = _only_line(stream)
    assert line["creds"] == "Credentials(key='[REDACTED:api_key]', owner='[REDACTED:email]')"
    assert line["raw"] == "b'email=[REDACTED:email]'"


# --- stdlib logging -------------------------------------------------------------------------


def test_stdlib_logger_lines_are_json_and_scrubbed(stream: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").warning("rejected credentials %s", f"Bearer {JWT}")
    logging.getLogger("httpx").info("HTTP Request: POST https://x.example/?api_key=%s", API_KEY)

    first, second = _lines(stream)
    assert first["event"] == "rejected credentials Bearer [REDACTED]"
    assert first["level"] == "warning"
    assert first["logger"] == "uvicorn.error"
    assert first["service"] == "test-svc"
    assert "timestamp" in first
    assert second["event"] == "HTTP Request: POST https://x.example/?api_key=[REDACTED]"
    assert second["level"] == "info"
    _assert_clean(stream.getvalue())


def test_stdlib_exception_is_json_and_scrubbed(stream: io.StringIO) -> None:
    try:
        raise ValueError(f"card {MASTERCARD} declined for {EMAIL}")
    except ValueError:
        logging.getLogger("narthex.billing").exception("charge failed for %s", EMAIL)

    line = _only_line(stream)
    assert line["event"] == "charge failed for [REDACTED:email]"
    assert line["level"] == "error"
    assert "ValueError: card [REDACTED:card] declined for [REDACTED:email]" in line["exception"]
    _assert_clean(stream.getvalue())


def test_uvicorn_console_handlers_are_taken_over() -> None:
    # What uvicorn's dictConfig leaves behind: its own plain-text handler, no propagation.
    plain = io.StringIO()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.StreamHandler(plain))
    access.propagate = False

    out = io.StringIO()
    configure_logging("gateway", stream=out)
    access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.7:51234", "GET", "/healthz", "1.1", 200)

    assert plain.getvalue() == ""
    line = _only_line(out)
    assert line["event"] == '10.0.0.7:51234 - "GET /healthz HTTP/1.1" 200'
    assert line["logger"] == "uvicorn.access"


def test_stdlib_records_below_level_are_dropped() -> None:
    out = io.StringIO()
    configure_logging("test-svc", level="WARNING", stream=out)
    logging.getLogger("uvicorn.error").setLevel(logging.DEBUG)

    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("uvicorn.error").error("Boom")

    assert [line["event"] for line in _lines(out)] == ["Boom"]


# --- non-secrets survive ----------------------------------------------------------------------

NON_SECRETS = [
    pytest.param("order 4111 1111 1111 1112 shipped", id="luhn-invalid-16-digits"),
    pytest.param("created_at_ms=1732366000123", id="epoch-ms"),
    # Passes Luhn, but starts with 1 like every epoch-ms timestamp until 2033.
    pytest.param("created_at_ms=1732366000120", id="epoch-ms-luhn-valid"),
    pytest.param("ts 1732366000123456", id="epoch-us"),
    # Its first three groups read as a Luhn-valid Visa number.
    pytest.param(str(uuid.UUID("41111115-1111-4111-8111-111111111111")), id="all-digit-uuid"),
    pytest.param("request 9b2f6c1e-4a1d-4c3e-9f2a-7d6e5c4b3a21 done", id="uuid"),
    pytest.param("trace 4bf92f3577b34da6a3ce929d0e0e4736", id="trace-id"),
    pytest.param("trace 41111111111111114111111111111111", id="all-digit-trace-id"),
    pytest.param("span 00f067aa0ba902b7", id="span-id"),
    pytest.param("loaded onnx_model_v2_int8 from /models/resnet50/1", id="onnx-name"),
    pytest.param("GET /v1/models/resnet50/predict HTTP/1.1 200 12.5ms", id="access-log"),
    pytest.param("the quick brown fox jumps over the lazy dog", id="plain-words"),
    pytest.param("order ORD-20241123-000042 for tenant acme", id="order-id"),
    pytest.param("ip 10.0.0.7 port 8443 pid 4242", id="numbers"),
]


@pytest.mark.parametrize("text", NON_SECRETS)
def test_non_secrets_survive(stream: io.StringIO, text: str) -> None:
    assert scrub(text) == text

    structlog.get_logger().info(text, detail={"text": text})

    line = _only_line(stream)
    assert line["event"] == text
    assert line["detail"] == {"text": text}


def test_non_string_scalars_are_untouched(stream: io.StringIO) -> None:
    structlog.get_logger().info("x", order_id=4111111111111111, ratio=0.5, ok=True, missing=None)

    line = _only_line(stream)
    assert line["order_id"] == 4111111111111111
    assert line["ratio"] == 0.5
    assert line["ok"] is True
    assert line["missing"] is None


# --- fields -----------------------------------------------------------------------------------


def test_standard_fields(stream: io.StringIO) -> None:
    structlog.get_logger("narthex.test").info("model loaded", model="resnet50")

    line = _only_line(stream)
    assert line["event"] == "model loaded"
    assert line["service"] == "test-svc"
    assert line["level"] == "info"
    assert line["logger"] == "narthex.test"
    assert line["model"] == "resnet50"
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert "trace_id" not in line
    assert "span_id" not in line


def test_trace_and_span_ids_come_from_the_active_span(stream: io.StringIO) -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("narthex.tests")
    log = structlog.get_logger()
    try:
        with tracer.start_as_current_span("predict") as span:
            log.info("inside")
            logging.getLogger("uvicorn.error").info("inside, via stdlib")
            ctx = span.get_span_context()
        log.info("outside")
    finally:
        provider.shutdown()

    inside, stdlib_inside, outside = _lines(stream)
    for line in (inside, stdlib_inside):
        assert line["trace_id"] == format(ctx.trace_id, "032x")
        assert line["span_id"] == format(ctx.span_id, "016x")
        assert len(line["trace_id"]) == 32
        assert len(line["span_id"]) == 16
    assert "trace_id" not in outside
    assert "span_id" not in outside


def test_trace_id_is_never_mistaken_for_a_card(stream: io.StringIO) -> None:
    provider = TracerProvider()
    try:
        with provider.get_tracer("t").start_as_current_span("s") as span:
            structlog.get_logger().info(
                "with ids", echoed=format(span.get_span_context().trace_id, "032x")
            )
    finally:
        provider.shutdown()

    line = _only_line(stream)
    assert line["echoed"] == line["trace_id"]


def test_contextvars_are_merged(stream: io.StringIO) -> None:
    request_id = str(uuid.uuid4())
    structlog.contextvars.bind_contextvars(request_id=request_id, tenant="acme")

    structlog.get_logger().info("handled")
    logging.getLogger("uvicorn.error").info("handled by stdlib")

    for line in _lines(stream):
        assert line["request_id"] == request_id
        assert line["tenant"] == "acme"


def test_bound_context_is_scrubbed(stream: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(user=EMAIL)

    structlog.get_logger().bind(api_key_hint=API_KEY).info("bound")

    line = _only_line(stream)
    assert line["user"] == "[REDACTED:email]"
    assert line["api_key_hint"] == "[REDACTED:api_key]"


# --- configuration ----------------------------------------------------------------------------


def test_reconfiguration_applies_to_existing_loggers() -> None:
    first = io.StringIO()
    configure_logging("svc-a", stream=first)
    log = structlog.get_logger("narthex.module_level")
    log.info("one")

    second = io.StringIO()
    configure_logging("svc-b", level="WARNING", stream=second)
    log.info("dropped")
    log.warning("two")
    logging.getLogger("uvicorn.error").warning("three")

    assert [(x["event"], x["service"]) for x in _lines(first)] == [("one", "svc-a")]
    assert [(x["event"], x["service"]) for x in _lines(second)] == [
        ("two", "svc-b"),
        ("three", "svc-b"),
    ]
    # The previous handler is replaced, not stacked.
    ours = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    assert len(ours) == 1


def test_default_stream_follows_sys_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("svc")
    structlog.get_logger().info("to stdout", who=EMAIL)
    logging.getLogger("uvicorn.error").info("stdlib to stdout")

    out = capsys.readouterr().out
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert events == ["to stdout", "stdlib to stdout"]
    assert EMAIL not in out


def test_broken_stream_does_not_raise_into_the_caller(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    configure_logging("svc", stream=out)
    out.close()

    structlog.get_logger().info("lost")
    logging.getLogger("uvicorn.error").info("lost too")

    assert capsys.readouterr().err.count("--- Logging error ---") == 2


def test_debug_level() -> None:
    out = io.StringIO()
    configure_logging("svc", level="debug", stream=out)
    structlog.get_logger().debug("details")
    assert _only_line(out)["level"] == "debug"


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("svc", level="LOUD", stream=io.StringIO())


def test_console_renderer_is_scrubbed_too() -> None:
    out = io.StringIO()
    configure_logging("svc", json=False, stream=out)
    try:
        raise RuntimeError(f"bad key {API_KEY}")
    except RuntimeError:
        structlog.get_logger().exception("human readable", who=EMAIL)

    text = out.getvalue()
    assert "human readable" in text
    assert "[REDACTED:api_key]" in text
    assert "[REDACTED:email]" in text
    _assert_clean(text)


# --- scrub() as a function --------------------------------------------------------------------


def test_scrub_does_not_mutate_and_keeps_container_types() -> None:
    original: dict[str, Any] = {
        "list": [EMAIL],
        "tuple": (EMAIL, 1),
        "set": {EMAIL},
        "frozen": frozenset({EMAIL}),
        "Authorization": f"Bearer {JWT}",
        EMAIL: "keyed by e-mail",
    }
    snapshot = repr(original)

    result = scrub(original)

    assert repr(original) == snapshot
    assert result == {
        "list": ["[REDACTED:email]"],
        "tuple": ("[REDACTED:email]", 1),
        "set": {"[REDACTED:email]"},
        "frozen": frozenset({"[REDACTED:email]"}),
        "Authorization": "[REDACTED]",
        "[REDACTED:email]": "keyed by e-mail",
    }


def test_scrub_is_idempotent() -> None:
    text = f"Authorization: Bearer {JWT} key={API_KEY} mail {EMAIL} card {VISA} password=hunter2"
    once = scrub(text)
    assert scrub(once) == once
    assert once == (
        "Authorization: Bearer [REDACTED] key=[REDACTED:api_key] mail [REDACTED:email] "
        "card [REDACTED:card] password=[REDACTED]"
    )


def test_scrub_passes_through_scalars_and_short_strings() -> None:
    for value in (None, 0, 4111111111111111, 1.5, True, "", "ok", "a@b.c"):
        assert scrub(value) == value


def test_scrub_finds_a_card_next_to_other_numbers() -> None:
    assert scrub(f"qty 2 {VISA} exp 12 27") == "qty 2 [REDACTED:card] exp 12 27"


def test_scrub_survives_self_reference() -> None:
    loop: list[object] = [EMAIL]
    loop.append(loop)
    result = scrub(loop)
    assert isinstance(result, list)
    assert result[0] == "[REDACTED:email]"


# -- log_line: the access log's direct path ---------------------------------------------------


def test_log_line_writes_what_structlog_writes(stream: io.StringIO) -> None:
    fields: dict[str, str | int | float] = {
        "method": "GET",
        "route": "/v1/models",
        "status": 200,
        "latency_ms": 1.25,
    }
    tracer = TracerProvider().get_tracer("narthex.tests")
    token = request_id_var.set("req-0123456789abcdef")
    try:
        with tracer.start_as_current_span("request"):
            structlog.get_logger("narthex.access").info("request", **fields)
            log_line("narthex.access", logging.INFO, "request", fields)
            log_line("narthex.access", logging.ERROR, "request", {**fields, "status": 503})
    finally:
        request_id_var.reset(token)
    slow, fast, error = _lines(stream)
    # Same keys in the same order, same values; only the time differs.
    assert list(fast) == list(slow)
    assert {**fast, "timestamp": None} == {**slow, "timestamp": None}
    assert error["level"] == "error"
    assert error["status"] == 503
    for line in (slow, fast):
        stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == UTC.utcoffset(None)


@pytest.mark.parametrize(("secret", "placeholder"), SECRETS)
def test_log_line_scrubs_every_value(stream: io.StringIO, secret: str, placeholder: str) -> None:
    log_line("narthex.access", logging.INFO, "request", {"route": f"/v1/{secret}", "token": "x"})
    line = _only_line(stream)
    assert line["route"] == f"/v1/{placeholder}"
    assert line["token"] == "[REDACTED]"
    _assert_clean(stream.getvalue())


def test_log_line_respects_the_level(stream: io.StringIO) -> None:
    configure_logging("test-svc", level="WARNING", stream=stream)
    log_line("narthex.access", logging.INFO, "request", {"status": 200})
    log_line("narthex.access", logging.WARNING, "request", {"status": 404})
    assert [line["status"] for line in _lines(stream)] == [404]


def test_log_line_goes_through_capture_logs_and_bound_context(stream: io.StringIO) -> None:
    with structlog.testing.capture_logs() as captured:
        log_line("narthex.access", logging.INFO, "request", {"status": 200})
    assert captured == [{"status": 200, "event": "request", "log_level": "info"}]
    assert stream.getvalue() == ""
    structlog.contextvars.bind_contextvars(job="nightly")
    log_line("narthex.access", logging.INFO, "request", {"status": 200})
    assert _only_line(stream)["job"] == "nightly"


def test_lines_written_on_an_event_loop_are_flushed_by_the_end_of_its_turn(
    tmp_path: Path,
) -> None:
    path = tmp_path / "service.log"
    with path.open("w") as out:  # a real file: block-buffered, as stdout is when redirected
        configure_logging("test-svc", stream=out)

        async def serve() -> list[str]:
            structlog.get_logger("narthex.access").info("request", status=200)
            log_line("narthex.access", logging.INFO, "request", {"status": 201})
            await asyncio.sleep(0)  # the loop's next turn
            return path.read_text().splitlines()

        written = asyncio.run(serve())
    assert [json.loads(line)["status"] for line in written] == [200, 201]


def test_lines_written_off_any_event_loop_are_flushed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "service.log"
    with path.open("w") as out:
        configure_logging("test-svc", stream=out)
        structlog.get_logger().info("starting")
        assert json.loads(path.read_text())["event"] == "starting"
