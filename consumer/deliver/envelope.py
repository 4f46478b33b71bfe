"""The ``visitorEvents`` envelope: how one call travels inside a batch.

A batch is a JSON array of ``{method: body}`` objects. Intake encodes each call of a batch-mode record as
such an envelope once, on its thread (:func:`encode`); deliver joins them into a batch (:func:`batch`) and,
when a batch is refused and its events are re-sent singly, takes the bare body back out (:func:`bare`) —
a slice of bytes already encoded, not a second encoding of the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import orjson

from consumer.contract import SINGLE_METHODS, TrackingCall

#: The start of each method's envelope, ``{"view":``: the body and :data:`SUFFIX` complete it.
PREFIXES: Final[Mapping[str, bytes]] = {method: b'{"' + method.encode() + b'":' for method in SINGLE_METHODS}
SUFFIX: Final = b"}"
#: What an empty batch weighs: the brackets of the JSON array.
BATCH_OVERHEAD: Final = 2


def encode(call: TrackingCall) -> bytes:
    """One call as its envelope's bytes, ready to be joined into a batch."""
    return PREFIXES[call.method] + orjson.dumps(call.body) + SUFFIX


def bare(method: str, envelope: bytes) -> bytes:
    """The body ``envelope`` (of a ``method`` call) wraps, as the single-call endpoint takes it."""
    return envelope[len(PREFIXES[method]) : -len(SUFFIX)]


def batch(envelopes: list[bytes]) -> bytes:
    """The ``visitorEvents`` request body: the envelopes, in order, as one JSON array."""
    return b"[" + b",".join(envelopes) + b"]"
