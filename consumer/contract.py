"""The Retail Rocket tracking API contract, in one place.

Both sides of the wire use this module: translation validates every call before it is sent (a call that
breaks the contract is a permanent failure without an HTTP request), and the emulator answers 400 on exactly
the same rules. See ``docs/tracking-api.md`` for the contract and the readings taken where the
original document is silent or wrong.

One rule here goes beyond that page, which says only that ``searchPhrase`` is a required string: it must hold
more than whitespace (empty once trimmed is refused). Retail Rocket answers 400 to such a phrase (issue 12),
and a call sent only to be refused cost its whole ``visitorEvents`` batch a re-send as single calls; refused
here, it is a translate-stage dead letter instead. ``docs/contract-vectors.json`` holds the vectors.

Validation returns a :class:`Violation` (or ``None``) instead of raising: it runs once per event on the hot
path of both the relay and the emulator, and a value is cheaper than an exception.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, NamedTuple

Method = Literal["view", "groupView", "addToBasket", "order", "categoryView", "search"]

#: The six single-event methods, in the order the contract lists them.
SINGLE_METHODS: Final[tuple[Method, ...]] = (
    "view",
    "groupView",
    "addToBasket",
    "order",
    "categoryView",
    "search",
)
#: The batch method: a JSON array of ``{method: body}`` envelopes.
BATCH_METHOD: Final = "visitorEvents"
ALL_METHODS: Final[frozenset[str]] = frozenset((*SINGLE_METHODS, BATCH_METHOD))

#: Largest id the contract accepts (2^53 - 1: ids must survive a JavaScript number).
MAX_ID: Final = 9_007_199_254_740_991
#: Longest ``sessionExternalId``, ``stockId`` and ``transaction``.
MAX_STRING: Final = 50


class Violation(NamedTuple):
    """Why a body breaks the contract: the offending field (dotted path) and what is wrong with it."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass(slots=True)
class TrackingCall:
    """One call to the tracking API that a domain event implies (treat it as immutable; it is not frozen
    only because a frozen dataclass costs three times as much to build, and one is built per event).

    ``shop`` is the shop's key in the configuration (it selects ``partnerId``, ``apiKey`` and the rate
    limit); the credentials themselves never travel with a call, so a call can be logged or dead-lettered.
    """

    shop: str
    method: Method
    body: Mapping[str, Any]


# --- field checks: each returns None when the value is fine, else the reason --------------------------

Check = Callable[[Any], "str | None"]


def _check_id(value: Any) -> str | None:
    if type(value) is not int:  # bool is an int subclass and is rejected on purpose
        return f"must be an integer, got {_json_type(value)}"
    if value < 0 or value > MAX_ID:
        return f"must be between 0 and {MAX_ID}, got {value}"
    return None


def _check_quantity(value: Any) -> str | None:
    if type(value) is not int:
        return f"must be an integer, got {_json_type(value)}"
    if value <= 0 or value > MAX_ID:
        return f"must be greater than 0 and at most {MAX_ID}, got {value}"
    return None


def _check_price(value: Any) -> str | None:
    if type(value) is not int and type(value) is not float:
        return f"must be a number, got {_json_type(value)}"
    if not math.isfinite(value) or value < 0:
        return f"must be a finite number of at least 0, got {value}"
    return None


def _check_session(value: Any) -> str | None:
    if type(value) is not str:
        return f"must be a string, got {_json_type(value)}"
    # isascii() + isalnum() is [A-Za-z0-9]+ without a regex: this runs once per call on the hot path.
    if not (0 < len(value) <= MAX_STRING and value.isascii() and value.isalnum()):
        return f"must be 1 to {MAX_STRING} letters and digits, got {len(value)} characters {_preview(value)}"
    return None


def _check_short_string(value: Any) -> str | None:
    if type(value) is not str:
        return f"must be a string, got {_json_type(value)}"
    if len(value) > MAX_STRING:
        return f"must be at most {MAX_STRING} characters, got {len(value)}"
    return None


def _check_phrase(value: Any) -> str | None:
    if type(value) is not str:
        return f"must be a string, got {_json_type(value)}"
    if not value or value.isspace():  # what is left after trimming (str.strip()) must not be empty
        return f"must hold more than whitespace, got {_preview(value)}"
    return None


def _check_timestamp(value: Any) -> str | None:
    if type(value) is not str:
        return f"must be an ISO 8601 string, got {_json_type(value)}"
    return _check_timestamp_text(value)


@functools.lru_cache(maxsize=8192)
def _check_timestamp_text(value: str) -> str | None:
    # Events of one second share their timestamp text far more often than not; parse each text once.
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return f"must be ISO 8601 with an offset, got {_preview(value)}"
    if parsed.tzinfo is None:
        return f"must carry a UTC offset or Z, got {_preview(value)}"
    return None


# --- the methods: (field, required, check) ------------------------------------------------------------

_COMMON_TAIL: Final = (("stockId", False, _check_short_string), ("timestamp", False, _check_timestamp))

FIELDS: Final[Mapping[str, tuple[tuple[str, bool, Check], ...]]] = {
    "view": (("sessionExternalId", True, _check_session), ("productId", True, _check_id), *_COMMON_TAIL),
    "groupView": (
        ("sessionExternalId", True, _check_session),
        ("groupId", True, _check_id),
        ("productId", True, _check_id),
        *_COMMON_TAIL,
    ),
    "addToBasket": (
        ("sessionExternalId", True, _check_session),
        ("productId", True, _check_id),
        *_COMMON_TAIL,
    ),
    "order": (
        ("sessionExternalId", True, _check_session),
        ("productId", True, _check_id),
        ("quantity", True, _check_quantity),
        ("price", True, _check_price),
        ("transaction", True, _check_short_string),
        *_COMMON_TAIL,
    ),
    "categoryView": (
        ("sessionExternalId", True, _check_session),
        ("categoryId", True, _check_id),
        ("timestamp", False, _check_timestamp),
    ),
    "search": (
        ("sessionExternalId", True, _check_session),
        ("searchPhrase", True, _check_phrase),
        ("timestamp", False, _check_timestamp),
    ),
}


def validate_body(method: str, body: Any, path: str = "") -> Violation | None:
    """Check one single-event body against ``method``'s rules; ``None`` means it is valid.

    Unknown extra fields are tolerated, as the contract does not forbid them.
    """
    fields = FIELDS.get(method)
    if fields is None:
        return Violation(path or "method", f"unknown method {_preview(method)}")
    if type(body) is not dict:
        return Violation(path or "body", f"must be a JSON object, got {_json_type(body)}")
    for name, required, check in fields:
        value = body.get(name, _MISSING)
        if value is _MISSING:
            if required:
                return Violation(path + name, "is required")
            continue
        reason = check(value)
        if reason is not None:
            return Violation(path + name, reason)
    return None


def validate_batch(payload: Any) -> Violation | None:
    """Check a ``visitorEvents`` payload: a non-empty array of envelopes, each with one known method key."""
    if type(payload) is not list:
        return Violation("body", f"must be a JSON array of envelopes, got {_json_type(payload)}")
    if not payload:
        return Violation("body", "must hold at least one envelope")
    for index, envelope in enumerate(payload):
        if type(envelope) is not dict or len(envelope) != 1:
            return Violation(f"[{index}]", "must be an object with exactly one key naming the event")
        ((method, body),) = envelope.items()
        if method not in FIELDS:
            return Violation(f"[{index}]", f"unknown event name {_preview(method)}")
        violation = validate_body(method, body, path=f"[{index}].{method}.")
        if violation is not None:
            return violation
    return None


def validate_call(call: TrackingCall) -> Violation | None:
    """Check one call the relay is about to send."""
    return validate_body(call.method, call.body)


# --- helpers ------------------------------------------------------------------------------------------

_MISSING: Final = object()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a fractional number" if not value.is_integer() else "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _preview(value: object, limit: int = 60) -> str:
    """A short, quoted rendering of a value for an error message (never the whole of a huge string)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
