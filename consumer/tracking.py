"""The tracking API client: one HTTP call in, one :data:`Outcome` out, and the ``apiKey`` never leaks.

Every answer and every failure of a call becomes exactly one outcome:

* :class:`Delivered`: the API accepted the call (2xx);
* :class:`Permanent`: the call can never succeed as it is (400, 401, 403, 404, any other 4xx, 3xx, a broken
  URL): the engine dead-letters it;
* :class:`Transient`: the call did not take effect and may succeed later (408, 425, 429, 5xx, timeouts,
  connection errors, malformed answers): the engine retries it, honouring ``retry_after``.

The client never raises for an HTTP or network failure; only programming errors (an unknown shop key, a
method that does not exist, a body that cannot be encoded, use before :meth:`TrackingClient.start`) raise.

Secrets: the ``apiKey`` sits in the query string, as the API demands, and aiohttp repeats the full URL in some
exception messages. Reasons are therefore built from a fixed phrase per exception class plus the exception's
text passed through :class:`Scrubber`, and nothing logs a traceback or the raw exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote, quote_plus

import aiohttp
import orjson
import structlog
from yarl import URL

from consumer.config import ShopConfig, TrackingConfig
from consumer.contract import BATCH_METHOD, SINGLE_METHODS, TrackingCall
from consumer.ratelimit import ShopRateLimiters

log = structlog.get_logger(__name__)

REDACTED: Final = "***"
#: Longest reason kept from an exception message: enough to diagnose, short enough for a header.
MAX_REASON: Final = 200


# --- outcomes -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    """The API accepted the call."""

    status: int = 200


@dataclass(frozen=True, slots=True)
class Permanent:
    """The call can never succeed as it is; ``reason`` is short and never holds a secret."""

    status: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Transient:
    """The call did not take effect; ``retry_after`` is the server's wish in seconds from now, if it said."""

    status: int | None
    reason: str
    retry_after: float | None = None


Outcome = Delivered | Permanent | Transient
OutcomeClass = type[Delivered] | type[Permanent] | type[Transient]

#: 4xx answers that mean "not now" rather than "never" (the contract's table).
_TRANSIENT_4XX: Final = frozenset({408, 425, 429})


def classify_status(status: int) -> OutcomeClass:
    """The contract's status table, in one place.

    2xx is delivered (HTTP's meaning of success; the API itself answers 200). 3xx is permanent: redirects
    are not followed, because following one would send the ``apiKey`` to another URL, and a redirect means
    the configured base URL is wrong. 1xx as a final answer and anything outside 100-599 is not HTTP this
    client understands: transient, as it cannot be the record's fault.
    """
    if 200 <= status <= 299:
        return Delivered
    if 500 <= status <= 599 or status in _TRANSIENT_4XX:
        return Transient
    if 300 <= status <= 499:
        return Permanent
    return Transient


def status_reason(status: int) -> str:
    """``"HTTP 401 Unauthorized"``: a fixed phrase, never the server's text (it could echo the request)."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def outcome_for_status(status: int, retry_after: str | None = None, now: datetime | None = None) -> Outcome:
    """The outcome of an answer with ``status`` (and its ``Retry-After`` header, used only when transient)."""
    kind = classify_status(status)
    if kind is Delivered:
        return Delivered(status)
    if kind is Permanent:
        return Permanent(status, status_reason(status))
    wait = parse_retry_after(retry_after, now or datetime.now(UTC)) if retry_after is not None else None
    return Transient(status, status_reason(status), wait)


# --- Retry-After --------------------------------------------------------------------------------------

# RFC 9110 says delay-seconds is digits only; a sign or a fraction is accepted too, as it is unambiguous.
_SECONDS_RE: Final = re.compile(r"[+-]?\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from ``now`` per a ``Retry-After`` value: delay-seconds or an HTTP date.

    Garbage (and ``None``) gives ``None``, meaning "the server did not say"; a negative delay or a date in the
    past gives ``0.0``. A date without a zone (asctime form) is taken as UTC, as HTTP dates always are.
    """
    if value is None:
        return None
    text = value.strip()
    if _SECONDS_RE.fullmatch(text):
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# --- secrets ------------------------------------------------------------------------------------------

_API_KEY_PARAM_RE: Final = re.compile(r"(apiKey=)[^&\s'\"<>]*", re.IGNORECASE)


class Scrubber:
    """Removes every known ``apiKey`` from text, in each form it can take in a URL or a message.

    Besides the keys themselves (raw, percent-encoded and form-encoded), anything after ``apiKey=`` is
    masked too, so a key this scrubber was never told about does not leak through a URL either.
    """

    __slots__ = ("_forms",)

    def __init__(self, secrets: Sequence[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if not secret:
                continue  # replacing "" would insert the mask between every character
            forms.update((secret, quote(secret, safe=""), quote_plus(secret), _yarl_query_form(secret)))
        # Longest first, so a form that contains another is masked whole.
        self._forms = tuple(sorted(forms, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return _API_KEY_PARAM_RE.sub(r"\1" + REDACTED, text)

    def __repr__(self) -> str:
        return f"Scrubber({len(self._forms)} forms)"


def _yarl_query_form(secret: str) -> str:
    """How yarl writes ``secret`` as a query value (it leaves ``/`` and ``:`` alone, unlike ``quote``)."""
    return URL.build(query={"k": secret}).raw_query_string.removeprefix("k=")


def redact_url(url: URL) -> str:
    """The URL as text, fit to print: ``apiKey`` replaced by ``***``."""
    if "apiKey" not in url.query:
        return str(url)
    return str(url.update_query(apiKey=REDACTED))


# --- exceptions -> outcomes ---------------------------------------------------------------------------

#: Each exception the client can meet, most specific first: (class, permanent?, what it means). aiohttp's
#: own exceptions must each be matched before the two catch-alls at the end; a test enforces it.
EXCEPTION_TABLE: Final[tuple[tuple[type[BaseException], bool, str], ...]] = (
    # The URL is wrong: every call would fail the same way, which is a configuration error the dead-letter
    # guard should stop on, like a 404.
    (aiohttp.InvalidURL, True, "invalid URL"),
    (aiohttp.NonHttpUrlClientError, True, "not an HTTP URL"),
    (aiohttp.RedirectClientError, True, "unexpected redirect"),
    # TLS and DNS failures are not the record's fault: retry (the breaker keeps it cheap) rather than
    # dead-letter every record.
    (aiohttp.ServerFingerprintMismatch, False, "TLS certificate fingerprint mismatch"),
    (aiohttp.ClientSSLError, False, "TLS error"),
    (aiohttp.ClientConnectorDNSError, False, "DNS lookup failed"),
    (aiohttp.ClientProxyConnectionError, False, "cannot connect to proxy"),
    (aiohttp.ClientConnectorError, False, "cannot connect"),
    # ServerTimeoutError, ConnectionTimeoutError and SocketTimeoutError are TimeoutErrors as well.
    (TimeoutError, False, "timeout"),
    (aiohttp.ServerDisconnectedError, False, "server disconnected"),
    (aiohttp.ClientConnectionResetError, False, "connection reset"),
    (aiohttp.ClientOSError, False, "connection error"),
    (aiohttp.ClientConnectionError, False, "connection error"),
    (aiohttp.ClientPayloadError, False, "broken response body"),
    (aiohttp.UploadAbortedError, False, "request body not sent"),
    # Raised by the client only when the answer could not be parsed (raise_for_status is off and redirects are
    # not followed), so its ``status`` is the parser's, not the server's.
    (aiohttp.ClientResponseError, False, "malformed response"),
    # Catch-alls: an aiohttp error class this table does not know yet, and plain socket errors.
    (aiohttp.ClientError, False, "client error"),
    (OSError, False, "network error"),
)
CATCH_ALL: Final[frozenset[type[BaseException]]] = frozenset({aiohttp.ClientError, OSError})

#: What ``send`` catches and turns into outcomes; anything else (a bug) propagates.
HANDLED_EXCEPTIONS: Final = (aiohttp.ClientError, OSError, TimeoutError)


def exception_rule(exc_type: type[BaseException]) -> tuple[type[BaseException], bool, str] | None:
    """The first table entry that matches ``exc_type``, or ``None`` when the client does not handle it."""
    for rule in EXCEPTION_TABLE:
        if issubclass(exc_type, rule[0]):
            return rule
    return None


def outcome_for_exception(
    exc: BaseException, scrub: Callable[[str], str], timeout: float | None = None
) -> Permanent | Transient:
    """Map a failure of the HTTP call to an outcome whose reason has been scrubbed of secrets.

    ``timeout`` (seconds) names the limit in the reason of a timeout that says nothing itself.
    """
    rule = exception_rule(type(exc))
    if rule is None:
        raise TypeError(f"{type(exc).__name__} is not a failure of the HTTP call") from exc
    _, permanent, meaning = rule
    detail = scrub(_describe(exc))
    if not detail and timeout is not None and isinstance(exc, TimeoutError):
        detail = f"no answer within {timeout:g} s"
    reason = f"{meaning}: {type(exc).__name__}" + (f": {detail}" if detail else "")
    reason = scrub(reason[:MAX_REASON])  # scrub again: truncation may have cut a key's mask in half
    return Permanent(None, reason) if permanent else Transient(None, reason)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        # Its text ends with the full request URL; the message is all that matters here.
        return exc.message
    return str(exc)


# --- the client ---------------------------------------------------------------------------------------

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class _Shop:
    """What a call to one shop needs, prepared once: a URL per method (holding the apiKey)."""

    partner_id: str
    urls: Mapping[str, URL]

    def __repr__(self) -> str:  # the URLs hold the key
        return f"_Shop(partner_id={self.partner_id!r})"


class TrackingClient:
    """Sends calls to the tracking API over one keep-alive connection pool, one shop's rate limit each.

    Use as ``async with TrackingClient(config, shops) as client:`` or call :meth:`start` and :meth:`close`.
    ``shops`` maps the platform's shop id to its :class:`ShopConfig`. ``clock`` and ``sleep`` drive the rate
    limiters, so tests can use a fake clock.

    Concurrency is bounded by a semaphore the size of the pool, so a call's timeout only starts once it has a
    connection: a call does not time out merely for having queued behind the pool. A call takes its rate
    limit slot before it queues for a connection, so that one slow shop cannot hold connections while it
    waits for its own limiter; the price is that, with the pool full, calls whose slots passed while they
    queued go as soon as connections free. Size ``concurrency`` above the sum over shops of rate x latency.

    ``limiters[shop].hold_until(deadline)`` (a time on ``clock``) holds a shop, e.g. for a ``Retry-After``.
    """

    def __init__(
        self,
        config: TrackingConfig,
        shops: Mapping[str, ShopConfig],
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._config = config
        self._sleep = sleep
        self.limiters = ShopRateLimiters(shops, clock=clock)
        base = URL(config.base_url)
        self._shops = {key: _prepare_shop(base, shop) for key, shop in shops.items()}
        self.scrub = Scrubber([shop.api_key.get_secret_value() for shop in shops.values()])
        self._single_timeout = aiohttp.ClientTimeout(total=config.single_timeout)
        self._batch_timeout = aiohttp.ClientTimeout(total=config.batch_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.concurrency)

    # --- lifecycle ---

    async def start(self) -> None:
        """Open the connection pool; call once, inside the event loop that will send."""
        if self._session is not None:
            raise RuntimeError("TrackingClient already started")
        if not self._config.verify_tls:
            log.warning("tracking.tls_verification_off", base_url=self._config.base_url)
        connector = aiohttp.TCPConnector(
            limit=self._config.concurrency,
            limit_per_host=0,
            ssl=self._config.verify_tls,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"Content-Type": "application/json"},
            timeout=self._batch_timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
            trust_env=False,
        )

    async def close(self) -> None:
        """Close the pool; calls still in flight fail as transient connection errors."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- calls ---

    async def send(self, shop: str, method: str, body: object) -> Outcome:
        """One single-event call (``view``, ``order``, ...) with ``body`` encoded as JSON."""
        if method not in SINGLE_METHODS:
            raise ValueError(f"not a single-event method: {method!r}")
        payload = orjson.dumps(body, default=_mapping_to_dict)
        return await self.send_raw(shop, method, payload, timeout=self._config.single_timeout)

    async def send_batch(self, shop: str, calls: Sequence[TrackingCall]) -> Outcome:
        """One ``visitorEvents`` call carrying ``calls`` in order, as ``[{method: body}, ...]``."""
        if not calls:
            raise ValueError("a batch needs at least one call")
        for call in calls:
            if call.shop != shop:
                raise ValueError(f"a batch for shop {shop!r} holds a call for shop {call.shop!r}")
        payload = orjson.dumps([{call.method: call.body} for call in calls], default=_mapping_to_dict)
        return await self.send_raw(shop, BATCH_METHOD, payload, timeout=self._config.batch_timeout)

    async def send_raw(self, shop: str, method: str, payload: bytes, *, timeout: float) -> Outcome:
        """POST an already encoded JSON ``payload`` to ``method`` for ``shop``, after its rate limiter.

        ``timeout`` covers connecting, sending and reading the answer; waiting for the rate limiter and for
        a free connection comes before it and does not count.
        """
        url = self._shops[shop].urls[method]  # KeyError: unknown shop or method, a programming error
        session = self._session
        if session is None:
            raise RuntimeError("TrackingClient.start() was not called")
        await self.limiters[shop].acquire(self._sleep)
        async with self._slots:
            outcome = await self._post(session, url, payload, self._timeout_for(timeout))
        if type(outcome) is not Delivered:
            log.debug("tracking.call_failed", shop=shop, method=method, outcome=outcome)
        return outcome

    async def _post(
        self, session: aiohttp.ClientSession, url: URL, payload: bytes, timeout: aiohttp.ClientTimeout
    ) -> Outcome:
        try:
            async with session.post(url, data=payload, timeout=timeout, allow_redirects=False) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                # Drain the (empty or "{}") body so the connection goes back to the pool. The status line
                # already said what the server decided: a body cut short changes nothing.
                with contextlib.suppress(*HANDLED_EXCEPTIONS):
                    await response.read()
        except HANDLED_EXCEPTIONS as exc:
            return outcome_for_exception(exc, self.scrub, timeout.total)
        return outcome_for_status(status, retry_after)

    def _timeout_for(self, seconds: float) -> aiohttp.ClientTimeout:
        if seconds == self._config.single_timeout:
            return self._single_timeout
        if seconds == self._config.batch_timeout:
            return self._batch_timeout
        return aiohttp.ClientTimeout(total=seconds)

    def url_for(self, shop: str, method: str) -> str:
        """The URL a call would go to, printable: ``apiKey`` masked."""
        return redact_url(self._shops[shop].urls[method])

    def __repr__(self) -> str:
        state = "open" if self._session is not None else "closed"
        return f"TrackingClient(base_url={self._config.base_url!r}, shops={sorted(self._shops)!r}, {state})"


def _prepare_shop(base: URL, shop: ShopConfig) -> _Shop:
    query = {"apiKey": shop.api_key.get_secret_value(), "partnerId": shop.partner_id}
    urls = {method: (base / method).with_query(query) for method in (*SINGLE_METHODS, BATCH_METHOD)}
    return _Shop(shop.partner_id, urls)


def _mapping_to_dict(value: Any) -> Any:
    """orjson encodes only real dicts; a call body may be any read-only Mapping."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
