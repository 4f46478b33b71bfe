"""A stand-in for Retail Rocket's tracking API: the contract, faults on demand, and a record of what arrived.

Used by the tests, the local stack and the benchmarks, and on its own as ``rr-consumer emulator``. The six
single-event methods and ``visitorEvents`` live under ``/1.0/`` like the real base URL; they answer exactly as
``docs/tracking-api.md`` says, with the validation rules of :mod:`consumer.contract`:

====================================================  ======
the request                                           answer
====================================================  ======
an unknown path                                       404
a verb other than POST on a method                    405
no or a wrong ``partnerId``/``apiKey`` pair           401
a shop configured as disabled                         403
over the shop's rate limit (off unless configured)    429 with ``Retry-After``
a Content-Type other than ``application/json``        415
a body that breaks the contract (a whole batch)       400 ``{"error": "..."}``
otherwise                                             200 ``{}``
====================================================  ======

Faults come before all of that: latency, a share of answers with a chosen status, and outages (every call
503; the listening socket closed so connections are refused; or every connection reset). An outage can end by
itself after ``outage_seconds``. Faults are set at start and changed at run time.

Every accepted event is recorded in arrival order with its shop, method, body and arrival time; a batch is
recorded as its events, in batch order. The admin API (JSON) is never subject to faults, but a "refuse"
outage closes the port it shares:

* ``GET /_emulator/events?partnerId=P&since=N``: ``{"events": [...], "next": M}``, each event
  ``{seq, partnerId, method, body, received_at, via}`` (``via``: the URL's method); poll with ``since=next``;
* ``GET /_emulator/counters``: requests by method and status, events accepted (in all and per shop), 429s;
* ``POST /_emulator/reset``: forget events, counters and rate-limit state (faults stay);
* ``GET /_emulator/faults``, ``PUT /_emulator/faults``: a :class:`Faults` object; fields left out of a PUT
  take their defaults, so ``{}`` ends every fault;
* ``GET /_emulator/health``: ``{"status": "ok"}``.

The request handler is kept lean (one orjson parse, one validation pass, one list append, no access log) so
that the emulator is not what limits a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import math
import os
import random
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, Protocol, TypeVar, get_args

import orjson
import structlog
from aiohttp import web

from consumer.contract import ALL_METHODS, BATCH_METHOD, validate_batch, validate_body
from consumer.ratelimit import TokenBucket, default_burst

log = structlog.get_logger(__name__)

#: Where the tracking methods live, as in the real base URL ``https://apptracking.retailrocket.net/1.0/``.
BASE_PATH: Final = "/1.0/"
ADMIN_PATH: Final = "/_emulator/"
#: Largest request body accepted; the relay's batches default to 1 MiB, so this leaves room.
MAX_BODY: Final = 8 * 1024 * 1024
#: The counters' name for requests to a path that is not a tracking method.
UNKNOWN_METHOD: Final = "(unknown)"
#: The counters' name for the "status" of a request answered by resetting its connection.
RESET: Final = "reset"


class AdmissionBucket(TokenBucket):
    """The relay's token bucket seen from the server's side: a request either finds a free slot or is refused.

    The relay queues for a slot (:meth:`TokenBucket.acquire`); a rate-limited API answers 429 instead, so
    this only ever takes a slot that is free now. It lives here, with the only code that needs it, so the
    runtime package carries nothing the emulator alone uses.
    """

    __slots__ = ()

    def try_acquire(self) -> float:
        """Take a slot only if one is free now: return 0.0 when taken, else the seconds until one is free.

        This is the server's side of a rate limit (answer 429 instead of queueing); nothing is booked when
        the answer is "wait".
        """
        now = self._clock()
        start = max(self._tat, now)
        send_at = max(now, start - self._tolerance, self._held_until)
        if send_at > now:
            return send_at - now
        self._tat = start + self._interval
        return 0.0


Outage = Literal["none", "503", "refuse", "reset"]
OUTAGES: Final[tuple[str, ...]] = get_args(Outage)
#: How many of the latest requests the emulator remembers with their arrival time.
REQUEST_LOG_SIZE: Final = 100_000


# --- configuration ------------------------------------------------------------------------------------


@dataclass(repr=False)
class EmulatorShop:
    """A shop the emulator knows: its credentials, whether it is disabled (403), its rate limit (429)."""

    partner_id: str
    api_key: str
    disabled: bool = False
    rate_limit: float | None = None

    def __repr__(self) -> str:  # the key stays out of test output and logs
        return (
            f"EmulatorShop(partner_id={self.partner_id!r}, disabled={self.disabled}, "
            f"rate_limit={self.rate_limit})"
        )


@dataclass(frozen=True)
class Faults:
    """What goes wrong, on purpose.

    ``latency_ms`` plus a uniform random share of ``latency_jitter_ms`` delays every tracking call. Then a
    share ``error_rate`` (0 to 1) of calls is answered with ``error_status``. ``outage`` overrides both:
    ``"503"`` answers every call 503, ``"refuse"`` closes the listening socket (new connections are refused,
    open ones are closed once idle), ``"reset"`` resets every connection that sends a call. ``outage_seconds``
    ends the outage by itself. ``retry_after`` (seconds) goes into the ``Retry-After`` header of injected
    errors and outage 503s.

    A call that is delayed, failed or reset is not recorded: to the client it did not take effect.
    """

    latency_ms: float = 0
    latency_jitter_ms: float = 0
    error_rate: float = 0
    error_status: int = 503
    outage: Outage = "none"
    retry_after: float | None = None
    outage_seconds: float | None = None
    #: Products the server refuses with 400 (an event that passes the contract but not the server, e.g. a
    #: product missing from the feed): the relay cannot know beforehand, so this tests batch-400 isolation.
    reject_product_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check(self.latency_ms >= 0, "latency_ms must be at least 0")
        _check(self.latency_jitter_ms >= 0, "latency_jitter_ms must be at least 0")
        _check(0 <= self.error_rate <= 1, "error_rate must be between 0 and 1")
        _check(100 <= self.error_status <= 599, "error_status must be an HTTP status (100-599)")
        _check(self.outage in OUTAGES, f"outage must be one of {', '.join(OUTAGES)}")
        _check(self.retry_after is None or self.retry_after >= 0, "retry_after must be at least 0")
        _check(self.outage_seconds is None or self.outage_seconds > 0, "outage_seconds must be positive")

    @property
    def active(self) -> bool:
        """Whether any fault applies to a call (checked once per call, so the no-fault path stays cheap)."""
        return bool(self.outage != "none" or self.latency_ms or self.latency_jitter_ms or self.error_rate)

    def rejects(self, method: str, payload: Any) -> bool:
        """Is this contract-valid call refused for naming a product in ``reject_product_ids``?"""
        if not self.reject_product_ids:
            return False
        bodies = [next(iter(e.values())) for e in payload] if method == BATCH_METHOD else [payload]
        return any(body.get("productId") in self.reject_product_ids for body in bodies)

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Build from a JSON object; unknown fields and wrong types raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
        for name, value in data.items():
            if name == "reject_product_ids":
                _check(
                    isinstance(value, list) and all(type(v) is int for v in value),
                    "reject_product_ids must be a list of integers",
                )
                data = {**data, name: tuple(value)}
                continue
            _check_json_type(name, value, int_only=name == "error_status")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reject_product_ids": list(self.reject_product_ids)}


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


def _check_json_type(name: str, value: object, *, int_only: bool) -> None:
    if name == "outage":
        _check(isinstance(value, str), "outage must be a string")
        return
    if value is None and name in ("retry_after", "outage_seconds"):
        return
    if type(value) is int or (type(value) is float and not int_only and math.isfinite(value)):
        return
    raise ValueError(f"{name} must be a {'whole ' if int_only else ''}number")


# --- state --------------------------------------------------------------------------------------------


class Listener(Protocol):
    """What a "refuse" outage needs from whoever owns the listening socket."""

    async def stop_listening(self, spare: object | None = None) -> None: ...
    async def resume_listening(self) -> None: ...


class _Entry(NamedTuple):
    """One accepted request in the record; its events stay in the raw body until someone reads them.

    That keeps recording at one append per request, batch or not, and bytes are invisible to the garbage
    collector, which would otherwise walk every recorded body again and again in a long benchmark.
    """

    seq: int  # the sequence number of its first event
    partner_id: str
    via: str  # the URL's method: a single-event method or visitorEvents
    received_at: float  # epoch seconds
    event_count: int  # how many events it holds
    body: bytes


class EmulatorState:
    """Everything the emulator remembers and is told: shops, faults, the event record, counters."""

    def __init__(self, shops: Sequence[EmulatorShop], faults: Faults, max_events: int | None) -> None:
        self.shops: dict[str, EmulatorShop] = {}
        for shop in shops:
            if shop.partner_id in self.shops:
                raise ValueError(f"partnerId {shop.partner_id!r} is configured twice")
            self.shops[shop.partner_id] = shop
        if max_events is not None and max_events < 0:
            raise ValueError("max_events must be at least 0")
        self.max_events = max_events
        self.faults = faults
        self.listener: Listener | None = None
        self._random = random.Random()
        self._outage_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._clear()

    def _clear(self) -> None:
        self._log: list[_Entry] = []
        self._next_seq = 0
        self._kept = 0  # events held by the entries in _log
        self._requests: dict[tuple[str, int | str], int] = {}
        # (arrival time, partnerId, method, status) of the latest requests: when each call came, for tests
        # of timing promises such as "no request before the time Retry-After named".
        self._request_log: deque[tuple[float, str, str, int | str]] = deque(maxlen=REQUEST_LOG_SIZE)
        self._events_by_shop: dict[str, int] = {}
        self._rate_limited = 0
        # Twice the client's default burst: the average rate is enforced exactly, but a client that keeps to
        # it is not refused because the network delivered two of its calls closer together than it sent them.
        self._buckets = {
            shop.partner_id: AdmissionBucket(shop.rate_limit, burst=2 * default_burst(shop.rate_limit))
            for shop in self.shops.values()
            if shop.rate_limit is not None
        }

    def reset(self) -> None:
        """Forget recorded events, counters and rate-limit state; faults stay as they are."""
        self._clear()

    # --- faults ---

    async def set_faults(self, faults: Faults, spare: object | None = None) -> None:
        """Apply new faults now; open or close the listening socket when a "refuse" outage starts or ends.

        ``spare`` is the connection (``request.protocol``) of an admin request that set the faults: it is
        closed only after its answer, while every other open connection is closed at once.
        """
        previous, self.faults = self.faults, faults
        if self._outage_timer is not None:
            self._outage_timer.cancel()
            self._outage_timer = None
        if faults.outage != "none" and faults.outage_seconds is not None:
            loop = asyncio.get_running_loop()
            self._outage_timer = loop.call_later(faults.outage_seconds, self._end_outage)
        if self.listener is not None:
            if faults.outage == "refuse" and previous.outage != "refuse":
                await self.listener.stop_listening(spare)
            elif previous.outage == "refuse" and faults.outage != "refuse":
                await self.listener.resume_listening()

    def _end_outage(self) -> None:
        self._outage_timer = None
        ended = dataclasses.replace(self.faults, outage="none", outage_seconds=None)
        task = asyncio.get_running_loop().create_task(self.set_faults(ended))
        self._tasks.add(task)  # keep a reference until it is done, or it may be collected mid-way
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._outage_timer is not None:
            self._outage_timer.cancel()
        for task in list(self._tasks):
            await task

    # --- the tracking call ---

    async def handle(self, request: web.Request, method: str) -> web.StreamResponse:
        """Answer one tracking call (see the module's table), count it, record its events."""
        arrived = time.time()
        response = await self._answer(request, method)
        status = RESET if _is_reset(response) else response.status
        self.count(method, status)
        self._request_log.append((arrived, request.query.get("partnerId", ""), method, status))
        return response

    def request_log(self) -> list[dict[str, Any]]:
        """The latest requests in arrival order: ``{at, partnerId, method, status}``."""
        return [{"at": at, "partnerId": p, "method": m, "status": s} for at, p, m, s in self._request_log]

    def count(self, method: str, status: int | str) -> None:
        key = (method, status)
        self._requests[key] = self._requests.get(key, 0) + 1

    async def _answer(self, request: web.Request, method: str) -> web.StreamResponse:
        faults = self.faults
        if faults.active:
            injected = await self._inject(request, faults)
            if injected is not None:
                return injected
        if request.method != "POST":
            return _json(405, {"error": "only POST"}, {"Allow": "POST"})
        shop_or_refusal = self._authenticate(request)
        if isinstance(shop_or_refusal, web.Response):
            return shop_or_refusal
        partner_id = shop_or_refusal.partner_id
        if request.content_type != "application/json":
            return _json(415, {"error": "Content-Type must be application/json"})
        raw = await request.read()
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _json(400, {"error": "body: not valid JSON"})
        if method == BATCH_METHOD:
            violation, count = validate_batch(payload), len(payload)
        else:
            violation, count = validate_body(method, payload), 1
        if violation is not None:
            return _json(400, {"error": str(violation)})
        if self.faults.rejects(method, payload):
            return _json(400, {"error": "unknown product"})
        self._record(partner_id, method, raw, count)
        return web.Response(body=b"{}", content_type="application/json")

    def _authenticate(self, request: web.Request) -> EmulatorShop | web.Response:
        query = request.query
        shop = self.shops.get(query.get("partnerId", ""))
        key = query.get("apiKey", "").encode()
        if shop is None or not secrets.compare_digest(key, shop.api_key.encode()):
            return _json(401, {"error": "unknown partnerId/apiKey pair"})
        if shop.disabled:
            return _json(403, {"error": "shop disabled"})
        bucket = self._buckets.get(shop.partner_id)
        if bucket is not None:
            wait = bucket.try_acquire()
            if wait > 0:
                self._rate_limited += 1
                # delay-seconds is whole seconds; round up so a client that obeys is not refused again.
                return _json(429, {"error": "rate limit"}, {"Retry-After": str(max(1, math.ceil(wait)))})
        return shop

    async def _inject(self, request: web.Request, faults: Faults) -> web.StreamResponse | None:
        if faults.outage == "503":
            return _fault_response(503, faults)
        if faults.outage != "none":  # "reset", or "refuse" on a connection opened before the outage
            _reset_connection(request)
            return _ResetResponse()
        delay_ms = faults.latency_ms + self._random.uniform(0, faults.latency_jitter_ms)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        if faults.error_rate and self._random.random() < faults.error_rate:
            return _fault_response(faults.error_status, faults)
        return None

    def _record(self, partner_id: str, method: str, body: bytes, count: int) -> None:
        self._events_by_shop[partner_id] = self._events_by_shop.get(partner_id, 0) + count
        seq, self._next_seq = self._next_seq, self._next_seq + count
        if self.max_events == 0:
            return
        self._log.append(_Entry(seq, partner_id, method, time.time(), count, body))
        self._kept += count
        if self.max_events is not None and self._kept > 2 * self.max_events:
            self._trim(self.max_events)

    def _trim(self, keep: int) -> None:
        """Drop the oldest entries while at least ``keep`` events remain (in steps, not on every call)."""
        drop, kept = 0, self._kept
        while drop < len(self._log) - 1 and kept - self._log[drop].event_count >= keep:
            kept -= self._log[drop].event_count
            drop += 1
        del self._log[:drop]
        self._kept = kept

    # --- what tests read ---

    def events(self, partner_id: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """Recorded events from sequence number ``since`` on, of one shop or of all, in arrival order."""
        first = max(0, bisect.bisect_right(self._log, since, key=_entry_seq) - 1)
        found = []
        for entry in self._log[first:]:
            if partner_id is not None and entry.partner_id != partner_id:
                continue
            for offset, (method, body) in enumerate(_events_of(entry)):
                if entry.seq + offset >= since:
                    found.append(
                        {
                            "seq": entry.seq + offset,
                            "partnerId": entry.partner_id,
                            "method": method,
                            "body": body,
                            "received_at": entry.received_at,
                            "via": entry.via,
                        }
                    )
        return found

    @property
    def next_seq(self) -> int:
        """The sequence number the next accepted event will get: pass it as ``since`` to poll for news."""
        return self._next_seq

    @property
    def counters(self) -> dict[str, Any]:
        requests: dict[str, dict[str, int]] = {}
        for (method, status), count in sorted(self._requests.items(), key=str):
            requests.setdefault(method, {})[str(status)] = count
        return {
            "requests": requests,
            "events_accepted": sum(self._events_by_shop.values()),
            "events_by_shop": dict(self._events_by_shop),
            "rate_limited": self._rate_limited,
        }


def _entry_seq(entry: _Entry) -> int:
    return entry.seq


def _events_of(entry: _Entry) -> list[tuple[str, Any]]:
    """The (method, body) pairs of a recorded request, in order."""
    payload = orjson.loads(entry.body)
    if entry.via == BATCH_METHOD:
        return [next(iter(envelope.items())) for envelope in payload]
    return [(entry.via, payload)]


class _ResetResponse(web.Response):
    """What the handler returns after resetting the connection; aiohttp drops it on the closed transport."""

    def __init__(self) -> None:
        super().__init__(status=503)


def _is_reset(response: web.StreamResponse) -> bool:
    return type(response) is _ResetResponse


def _reset_connection(request: web.Request) -> None:
    """Abort the connection with a TCP RST (linger 0), as a crashing server or a middlebox would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _fault_response(status: int, faults: Faults) -> web.Response:
    headers = None if faults.retry_after is None else {"Retry-After": _seconds_text(faults.retry_after)}
    return _json(status, {"error": "injected fault"}, headers)


def _seconds_text(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


# --- the app ------------------------------------------------------------------------------------------

STATE: Final = web.AppKey("emulator_state", EmulatorState)


def build_app(
    shops: Sequence[EmulatorShop], faults: Faults | None = None, *, max_events: int | None = None
) -> web.Application:
    """The emulator as an aiohttp application; its state is ``app[STATE]``.

    ``max_events`` bounds the event record for long runs (``None``: keep all, ``0``: keep none, only count).
    Run alone (``web.run_app``), a "refuse" outage resets connections instead of closing the port: only
    :class:`EmulatorServer` owns the listening socket.
    """
    state = EmulatorState(shops, faults or Faults(), max_events)
    app = web.Application(client_max_size=MAX_BODY)
    app[STATE] = state
    for method in sorted(ALL_METHODS):
        app.router.add_route("*", BASE_PATH + method, _tracking_handler(state, method))
    app.router.add_get(ADMIN_PATH + "events", _admin_events)
    app.router.add_get(ADMIN_PATH + "counters", _admin_counters)
    app.router.add_get(ADMIN_PATH + "requests", _admin_requests)
    app.router.add_post(ADMIN_PATH + "reset", _admin_reset)
    app.router.add_get(ADMIN_PATH + "faults", _admin_get_faults)
    app.router.add_put(ADMIN_PATH + "faults", _admin_put_faults)
    app.router.add_get(ADMIN_PATH + "health", _admin_health)
    # Last, so that it only catches what nothing above matched: counted, then 404.
    app.router.add_route("*", "/{tail:.*}", _unknown_path_handler(state))
    app.on_cleanup.append(_close_state)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _tracking_handler(state: EmulatorState, method: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await state.handle(request, method)

    return handle


def _unknown_path_handler(state: EmulatorState) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        state.count(UNKNOWN_METHOD, 404)
        return _json(404, {"error": "no such resource"})

    return handle


async def _close_state(app: web.Application) -> None:
    await app[STATE].close()


async def _admin_events(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        return _json(400, {"error": "since must be an integer"})
    events = state.events(request.query.get("partnerId"), since)
    return _json(200, {"events": events, "next": state.next_seq})


async def _admin_counters(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE].counters)


async def _admin_requests(request: web.Request) -> web.Response:
    return _json(200, {"requests": request.app[STATE].request_log()})


async def _admin_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return _json(200, {})


async def _admin_get_faults(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE].faults.to_json())


async def _admin_put_faults(request: web.Request) -> web.Response:
    """Replace the faults: fields not given take their defaults (``{}`` turns every fault off)."""
    try:
        faults = Faults.from_json(orjson.loads(await request.read()))
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        return _json(400, {"error": str(exc)})
    await request.app[STATE].set_faults(faults, spare=request.protocol)
    return _json(200, faults.to_json())


async def _admin_health(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


# --- running it ---------------------------------------------------------------------------------------


class EmulatorServer:
    """Runs the emulator in the current event loop on ``host:port`` (port 0: a free port).

    ``url`` is the base URL to configure the client with (``http://127.0.0.1:PORT/1.0/``); ``admin_url`` is
    the admin API's. The state methods are for tests in the same loop.
    """

    def __init__(
        self,
        shops: Sequence[EmulatorShop],
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_events: int | None = None,
    ) -> None:
        self.app = build_app(shops, faults, max_events=max_events)
        self.state = self.app[STATE]
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        # handler_cancellation: a call whose client gave up (timeout) stops at once instead of sleeping out
        # its injected latency, so it is neither recorded nor holding up shutdown.
        self._runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await self._runner.setup()
        await self._listen()
        self.state.listener = self
        if self.state.faults.outage == "refuse":
            await self.stop_listening()
        elif self.state.faults.outage != "none" and self.state.faults.outage_seconds is not None:
            await self.state.set_faults(self.state.faults)  # arms the timer that ends the outage

    async def stop(self) -> None:
        self.state.listener = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._site = None

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (kept across a "refuse" outage)."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{_url_host(self._host)}:{self._port}{BASE_PATH}"

    @property
    def admin_url(self) -> str:
        return f"http://{_url_host(self._host)}:{self._port}{ADMIN_PATH}"

    # --- the listening socket, for "refuse" outages ---

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True, backlog=1024)
        await site.start()
        self._site = site
        self._port = site.port

    async def stop_listening(self, spare: object | None = None) -> None:
        """Close the listening socket, so new connections are refused, and every open connection.

        Open connections go at once, calls in progress included, as when a server goes down; only
        ``spare`` (the admin request that asked for this) is closed after its answer.
        """
        site, self._site = self._site, None
        if site is not None:
            await site.stop()
        server = self._runner.server if self._runner is not None else None
        for connection in server.connections if server is not None else ():
            if connection is spare:
                connection.close()
            else:
                connection.force_close()

    async def resume_listening(self) -> None:
        """Listen again on the same port."""
        if self._site is None and self._runner is not None:
            await self._listen()

    # --- state, for tests in the same loop ---

    def events(self, partner_id: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        return self.state.events(partner_id, since)

    @property
    def counters(self) -> dict[str, Any]:
        return self.state.counters

    def request_log(self) -> list[dict[str, Any]]:
        return self.state.request_log()

    @property
    def faults(self) -> Faults:
        return self.state.faults

    def reset(self) -> None:
        self.state.reset()

    async def set_faults(self, faults: Faults) -> None:
        await self.state.set_faults(faults)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_T = TypeVar("_T")


class EmulatorThread:
    """An :class:`EmulatorServer` on its own event loop in a background thread.

    For tests whose code under test is synchronous or has a loop of its own. Every method may be called
    from any thread; state is read inside the emulator's loop, so it is consistent.
    """

    def __init__(
        self,
        shops: Sequence[EmulatorShop],
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_events: int | None = None,
    ) -> None:
        self._args = (shops, faults)
        self._kwargs: dict[str, Any] = {"host": host, "port": port, "max_events": max_events}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: EmulatorServer | None = None
        self._thread: threading.Thread | None = None
        self._started: Future[None] = Future()

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="rr-emulator", daemon=True)
        self._thread.start()
        self._started.result(timeout)  # re-raises a failure to start (a port in use, say)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = EmulatorServer(*self._args, **self._kwargs)
            loop.run_until_complete(self._server.start())
        except Exception as exc:  # noqa: BLE001  (handed to the thread in start(), which re-raises it)
            self._started.set_exception(exc)
            loop.close()
            return
        self._started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._server.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed already (a failed start): nothing to stop
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, make: Callable[[EmulatorServer], Awaitable[_T]], timeout: float = 10.0) -> _T:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            raise RuntimeError("EmulatorThread is not running")

        async def call() -> _T:
            return await make(server)

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout)

    @property
    def server(self) -> EmulatorServer:
        if self._server is None:
            raise RuntimeError("EmulatorThread is not running")
        return self._server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def admin_url(self) -> str:
        return self.server.admin_url

    def events(self, partner_id: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        return self._call(lambda server: _value(server.events(partner_id, since)))

    @property
    def counters(self) -> dict[str, Any]:
        return self._call(lambda server: _value(server.counters))

    def request_log(self) -> list[dict[str, Any]]:
        return self._call(lambda server: _value(server.request_log()))

    def reset(self) -> None:
        self._call(_reset)

    def set_faults(self, faults: Faults) -> None:
        self._call(lambda server: server.set_faults(faults))


async def _value(value: _T) -> _T:
    return value


async def _reset(server: EmulatorServer) -> None:
    server.reset()


# --- the command line (options are declared in consumer.cli, which imports this module only to run) ----

DEMO_SHOP: Final = EmulatorShop(partner_id="demo", api_key="demo-key")


def parse_shop_option(text: str, environ: Mapping[str, str] | None = None) -> EmulatorShop:
    """``PARTNER_ID:API_KEY``, where ``API_KEY`` may be ``env:NAME`` to read it from the environment."""
    partner_id, sep, key = text.partition(":")
    if not sep or not partner_id or not key:
        raise ValueError(f"--shop wants PARTNER_ID:API_KEY, got {partner_id!r}:...")
    if key.startswith("env:"):
        environ = os.environ if environ is None else environ
        name = key.removeprefix("env:")
        if name not in environ:
            raise ValueError(f"--shop {partner_id}: environment variable {name} is not set")
        key = environ[name]
    return EmulatorShop(partner_id=partner_id, api_key=key)


def load_shops_file(path: Path) -> list[EmulatorShop]:
    """A JSON array of ``{"partner_id", "api_key", "disabled"?, "rate_limit"?}`` objects."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: want a JSON array of shops")
    return [EmulatorShop(**item) for item in data]


def shops_from_args(args: argparse.Namespace) -> list[EmulatorShop]:
    shops = [parse_shop_option(text) for text in args.shop or ()]
    if args.shops_file is not None:
        shops.extend(load_shops_file(Path(args.shops_file)))
    if not shops:
        shops = [dataclasses.replace(DEMO_SHOP)]
    disabled = set(args.disabled or ())
    for shop in shops:
        shop.disabled = shop.disabled or shop.partner_id in disabled
        if shop.rate_limit is None:
            shop.rate_limit = args.rate_limit
    return shops


def faults_from_args(args: argparse.Namespace) -> Faults:
    return Faults(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        error_rate=args.error_rate,
        error_status=args.error_status,
        outage=args.outage,
        retry_after=args.retry_after,
        outage_seconds=args.outage_seconds,
    )


def run_command(args: argparse.Namespace) -> int:
    """``rr-consumer emulator``: serve until SIGINT or SIGTERM."""
    try:
        shops = shops_from_args(args)
        faults = faults_from_args(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"rr-consumer emulator: {exc}", file=sys.stderr, flush=True)
        return 2
    asyncio.run(_serve(shops, faults, args.host, args.port, args.max_events))
    return 0


async def _serve(
    shops: Sequence[EmulatorShop], faults: Faults, host: str, port: int, max_events: int | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with EmulatorServer(shops, faults, host=host, port=port, max_events=max_events) as server:
        # One line on stdout, so that a script that passed --port 0 can read the port.
        print(f"emulator listening on {server.url} (admin: {server.admin_url})", flush=True)
        log.info(
            "emulator.started",
            url=server.url,
            shops=[shop.partner_id for shop in shops],
            faults=faults.to_json(),
        )
        await stop.wait()
    log.info("emulator.stopped")
