"""Secrets and personal data out of log text: API keys, JWTs, credentials, e-mail addresses and
card numbers redacted from strings, containers and structlog events."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from structlog.typing import EventDict, WrappedLogger

__all__ = ["REDACTED", "is_sensitive_key", "scrub", "scrub_event", "scrub_str"]

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
        return scrub_str(value)
    if value is None or isinstance(value, int | float):
        return value
    if depth >= _MAX_DEPTH:
        return "[TRUNCATED]"
    if isinstance(value, Mapping):
        return {
            _scrub_key(k): REDACTED
            if isinstance(k, str) and is_sensitive_key(k)
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
    return scrub_str(key) if isinstance(key, str) else key


@functools.lru_cache(maxsize=1024)
def is_sensitive_key(key: str) -> bool:
    return key.replace("-", "").replace("_", "").lower() in _SENSITIVE_KEYS


def scrub_str(text: str) -> str:
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


def scrub_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """A structlog processor: every value of a log event scrubbed, objects as their repr."""
    return {
        key: value
        if key in _OWN_KEYS
        else REDACTED
        if is_sensitive_key(key)
        else _scrub(value, 1, stringify=True)
        for key, value in event_dict.items()
    }
