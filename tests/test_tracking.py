"""The tracking client: every answer becomes one outcome, the rate limit holds, the apiKey never leaks.

Most tests run the client against the emulator in the same event loop; a few use a tiny raw server for
answers the emulator never gives (a malformed status line, a redirect, an HTTP-date ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import SecretStr
from structlog.testing import capture_logs
from yarl import URL

from consumer.config import ShopConfig, TrackingConfig
from consumer.contract import Method, TrackingCall
from consumer.tracking import (
    CATCH_ALL,
    HANDLED_EXCEPTIONS,
    Delivered,
    Outcome,
    Permanent,
    Scrubber,
    TrackingClient,
    Transient,
    classify_status,
    exception_rule,
    outcome_for_exception,
    parse_retry_after,
    redact_url,
)
from consumer_dev.emulator import EmulatorServer, EmulatorShop, Faults

pytestmark = pytest.mark.unit

# A key with characters that every encoding writes differently, so each written form is checked.
SECRET = "s3cr3t+K/ey=&%x y"
SECRET_FORMS = (
    SECRET,
    quote(SECRET, safe=""),
    quote_plus(SECRET),
    URL.build(query={"k": SECRET}).raw_query_string.removeprefix("k="),
)
PARTNER = "partner1"
SHOP = "shop-1"
VIEW = {"sessionExternalId": "60842392e4881c65e6c5e423", "productId": 123456, "stockId": "NewYork"}


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        rendered = text if isinstance(text, str) else repr(text)
        for form in SECRET_FORMS:
            assert form not in rendered, f"apiKey leaked in {rendered[:300]!r}"


def shops(rate_limit: float | None = None, api_key: str = SECRET) -> dict[str, ShopConfig]:
    return {
        SHOP: ShopConfig(partner_id=PARTNER, api_key=SecretStr(api_key), rate_limit=rate_limit),
        "disabled-shop": ShopConfig(partner_id="off", api_key=SecretStr("off-key"), rate_limit=None),
    }


def config(base_url: str, **overrides: Any) -> TrackingConfig:
    return TrackingConfig(base_url=base_url, **overrides)


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    known = [EmulatorShop(PARTNER, SECRET), EmulatorShop("off", "off-key", disabled=True)]
    async with EmulatorServer(known) as server:
        yield server


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[TrackingClient]:
    async with TrackingClient(config(emulator.url), shops()) as tracking:
        yield tracking


# --- the status table --------------------------------------------------------------------------------

# The contract's table, written out as data: 2xx delivered; 408, 425, 429, 5xx transient (and 1xx, which is
# never a final answer); every other 4xx, and 3xx (redirects are not followed), permanent.
DELIVERED_CODES = set(range(200, 300))
TRANSIENT_CODES = {408, 425, 429} | set(range(500, 600)) | set(range(100, 200))
PERMANENT_CODES = set(range(300, 500)) - TRANSIENT_CODES


@pytest.mark.parametrize("status", range(100, 600))
def test_every_status_code_has_the_class_the_contract_gives_it(status: int) -> None:
    expected = (
        Delivered if status in DELIVERED_CODES else Transient if status in TRANSIENT_CODES else Permanent
    )
    assert classify_status(status) is expected


def test_the_named_codes_of_the_contract() -> None:
    assert classify_status(200) is Delivered
    assert [classify_status(code) for code in (400, 401, 403, 404, 405, 415, 422)] == [Permanent] * 7
    assert [classify_status(code) for code in (408, 425, 429, 500, 502, 503, 504)] == [Transient] * 7
    assert classify_status(0) is Transient
    assert classify_status(600) is Transient


# --- Retry-After -------------------------------------------------------------------------------------

NOW = datetime(2026, 11, 30, 10, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("Mon, 30 Nov 2026 10:00:30 GMT", 30.0),  # IMF-fixdate
        ("Monday, 30-Nov-26 10:01:00 GMT", 60.0),  # RFC 850
        ("Mon Nov 30 10:00:05 2026", 5.0),  # asctime, no zone: UTC
        ("Mon, 30 Nov 2026 09:00:00 GMT", 0.0),  # in the past
        (None, None),
        ("", None),
        ("soon", None),
        ("1e3", None),
        ("12 seconds", None),
        ("9" * 400, None),  # not finite
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_dates_compare_with_a_naive_now_as_utc() -> None:
    assert parse_retry_after("Mon, 30 Nov 2026 10:00:30 GMT", NOW.replace(tzinfo=None)) == 30.0


# --- scrubbing ---------------------------------------------------------------------------------------


def test_the_scrubber_masks_every_written_form_of_a_key_and_any_apikey_parameter() -> None:
    scrub = Scrubber([SECRET, ""])
    url = URL("https://h/1.0/view").with_query(apiKey=SECRET, partnerId="p")

    for form in SECRET_FORMS:
        assert scrub(f"error near {form}!") == "error near ***!"
    assert "apiKey=***" in scrub(str(url))
    assert "partnerId=p" in scrub(str(url))
    assert scrub("GET /x?apiKey=another-key&y=1") == "GET /x?apiKey=***&y=1"
    assert scrub("nothing secret here") == "nothing secret here"  # the empty key masks nothing
    assert_no_secret(scrub(str(url)), scrub(url.human_repr()), repr(scrub))


def test_a_printed_url_shows_the_key_as_stars() -> None:
    url = URL("https://h/1.0/view").with_query(apiKey=SECRET, partnerId="p")

    assert redact_url(url) == "https://h/1.0/view?apiKey=***&partnerId=p"
    assert redact_url(URL("https://h/1.0/view")) == "https://h/1.0/view"


# --- exceptions --------------------------------------------------------------------------------------


def aiohttp_exception_classes() -> list[type[BaseException]]:
    """Every exception class aiohttp defines under ClientError, plus any it exports by name."""
    found: set[type[BaseException]] = set()
    stack: list[type[BaseException]] = [aiohttp.ClientError]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("aiohttp"):
            found.add(cls)
        stack.extend(cls.__subclasses__())
    for name in aiohttp.__all__:
        value = getattr(aiohttp, name)
        if isinstance(value, type) and issubclass(value, aiohttp.ClientError):
            found.add(value)
    return sorted(found, key=lambda cls: cls.__name__)


KEY_URL = URL("https://apptracking.example/1.0/view").with_query(apiKey=SECRET, partnerId="p")
CONNECTION_KEY = aiohttp.client_reqrep.ConnectionKey(
    host="apptracking.example",
    port=443,
    is_ssl=True,
    ssl=True,
    proxy=None,
    proxy_auth=None,
    proxy_headers_hash=None,
)


def example_of(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` whose text carries the key-bearing URL wherever the class allows text."""
    message = f"failed at {KEY_URL}"
    if issubclass(cls, aiohttp.ClientResponseError):
        info = aiohttp.RequestInfo(KEY_URL, "POST", CIMultiDictProxy(CIMultiDict()), KEY_URL)
        return cls(info, (), status=400, message=message)
    if issubclass(cls, aiohttp.ClientConnectorCertificateError):
        return cls(CONNECTION_KEY, ssl.SSLCertVerificationError(1, message))
    if issubclass(cls, aiohttp.client_exceptions.UnixClientConnectorError):
        return cls("/run/tracking.sock", CONNECTION_KEY, OSError(111, message))
    if issubclass(cls, aiohttp.ClientConnectorError):
        return cls(CONNECTION_KEY, OSError(111, message))
    if issubclass(cls, aiohttp.ServerFingerprintMismatch):
        return cls(b"expected", b"got", "apptracking.example", 443)
    if issubclass(cls, aiohttp.InvalidURL):
        return cls(KEY_URL, message)
    return cls(message)


@pytest.mark.parametrize(
    "cls", [c for c in aiohttp_exception_classes() if c is not aiohttp.ClientError], ids=lambda c: c.__name__
)
def test_every_aiohttp_exception_has_its_own_rule_not_a_catch_all(cls: type[BaseException]) -> None:
    assert issubclass(cls, HANDLED_EXCEPTIONS)
    rule = exception_rule(cls)
    assert rule is not None
    assert rule[0] not in CATCH_ALL, f"{cls.__name__} is not mapped explicitly"


@pytest.mark.parametrize("cls", aiohttp_exception_classes(), ids=lambda cls: cls.__name__)
def test_every_aiohttp_exception_becomes_an_outcome_without_the_key(cls: type[BaseException]) -> None:
    exc = example_of(cls)
    assert any(form in str(exc) for form in SECRET_FORMS) or cls is aiohttp.ServerFingerprintMismatch

    outcome = outcome_for_exception(exc, Scrubber([SECRET]))

    assert isinstance(outcome, Permanent | Transient)
    assert cls.__name__ in outcome.reason
    assert_no_secret(outcome, outcome.reason)


@pytest.mark.parametrize(
    ("exc", "kind", "meaning"),
    [
        (TimeoutError(), Transient, "timeout"),
        (aiohttp.ConnectionTimeoutError(f"Connection timeout to host {KEY_URL}"), Transient, "timeout"),
        (aiohttp.ServerDisconnectedError(), Transient, "server disconnected"),
        (ConnectionResetError(104, "Connection reset by peer"), Transient, "network error"),
        (aiohttp.ClientPayloadError("Response payload is not completed"), Transient, "broken response"),
        (aiohttp.InvalidURL(KEY_URL), Permanent, "invalid URL"),
        (aiohttp.NonHttpUrlClientError(KEY_URL), Permanent, "not an HTTP URL"),
    ],
)
def test_failures_are_classified_as_the_contract_says(exc: BaseException, kind: type, meaning: str) -> None:
    outcome = outcome_for_exception(exc, Scrubber([SECRET]), timeout=0.5)

    assert type(outcome) is kind
    assert outcome.reason.startswith(meaning)
    assert outcome.status is None
    assert_no_secret(outcome)


def test_a_bare_timeout_names_the_limit_it_hit() -> None:
    assert outcome_for_exception(TimeoutError(), Scrubber([]), timeout=0.5).reason == (
        "timeout: TimeoutError: no answer within 0.5 s"
    )


def test_cancellation_and_bugs_are_not_outcomes() -> None:
    assert not issubclass(asyncio.CancelledError, HANDLED_EXCEPTIONS)
    assert exception_rule(asyncio.CancelledError) is None
    assert exception_rule(KeyError) is None
    with pytest.raises(TypeError):
        outcome_for_exception(KeyError("x"), Scrubber([]))


# --- against the emulator: what the API answers ------------------------------------------------------

ORIGINAL_EXAMPLES: dict[Method, dict[str, Any]] = {
    "view": VIEW,
    "groupView": {**VIEW, "groupId": 654321},
    "addToBasket": VIEW,
    "order": {**VIEW, "quantity": 2, "price": 234, "transaction": "135243"},
    "categoryView": {"sessionExternalId": "60842392e4881c65e6c5e423", "categoryId": 123456},
    "search": {"sessionExternalId": "60842392e4881c65e6c5e423", "searchPhrase": "pampers"},
}


async def test_each_single_method_is_delivered_and_arrives_as_sent(
    client: TrackingClient, emulator: EmulatorServer
) -> None:
    for method, body in ORIGINAL_EXAMPLES.items():
        assert await client.send(SHOP, method, body) == Delivered(200)

    events = emulator.events(PARTNER)
    assert [(event["method"], event["body"]) for event in events] == list(ORIGINAL_EXAMPLES.items())


async def test_a_batch_is_delivered_and_its_events_arrive_in_batch_order(
    client: TrackingClient, emulator: EmulatorServer
) -> None:
    calls = [TrackingCall(SHOP, method, body) for method, body in ORIGINAL_EXAMPLES.items()]

    assert await client.send_batch(SHOP, calls) == Delivered(200)

    events = emulator.events(PARTNER)
    assert [(event["method"], event["body"], event["via"]) for event in events] == [
        (call.method, call.body, "visitorEvents") for call in calls
    ]


async def test_send_raw_posts_bytes_as_they_are(client: TrackingClient, emulator: EmulatorServer) -> None:
    payload = b'{"sessionExternalId":"abc","productId":7}'

    assert await client.send_raw(SHOP, "view", payload, timeout=1.0) == Delivered(200)
    assert emulator.events(PARTNER)[0]["body"] == {"sessionExternalId": "abc", "productId": 7}


async def test_contract_violations_wrong_keys_and_disabled_shops_are_permanent(
    emulator: EmulatorServer,
) -> None:
    wrong_key = {SHOP: ShopConfig(partner_id=PARTNER, api_key=SecretStr("not-the-key"))}
    async with TrackingClient(config(emulator.url), shops()) as client:
        assert await client.send(SHOP, "view", {"sessionExternalId": "x"}) == Permanent(
            400, "HTTP 400 Bad Request"
        )
        bad_batch = [TrackingCall(SHOP, "view", VIEW), TrackingCall(SHOP, "view", {"productId": 1})]
        assert await client.send_batch(SHOP, bad_batch) == Permanent(400, "HTTP 400 Bad Request")
        assert await client.send("disabled-shop", "view", VIEW) == Permanent(403, "HTTP 403 Forbidden")
    async with TrackingClient(config(emulator.url), wrong_key) as client:
        assert await client.send(SHOP, "view", VIEW) == Permanent(401, "HTTP 401 Unauthorized")
    wrong_base = str(URL(emulator.url).with_path("/2.0/"))
    async with TrackingClient(config(wrong_base), shops()) as client:
        assert await client.send(SHOP, "view", VIEW) == Permanent(404, "HTTP 404 Not Found")
    assert emulator.events() == []


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (201, Delivered(201)),
        (204, Delivered(204)),
        (400, Permanent(400, "HTTP 400 Bad Request")),
        (409, Permanent(409, "HTTP 409 Conflict")),
        (413, Permanent(413, "HTTP 413 Request Entity Too Large")),
        (418, Permanent(418, "HTTP 418 I'm a Teapot")),
        (408, Transient(408, "HTTP 408 Request Timeout", None)),
        (425, Transient(425, "HTTP 425 Too Early", None)),
        (429, Transient(429, "HTTP 429 Too Many Requests", None)),
        (500, Transient(500, "HTTP 500 Internal Server Error", None)),
        (502, Transient(502, "HTTP 502 Bad Gateway", None)),
        (599, Transient(599, "HTTP 599", None)),
    ],
)
async def test_each_answer_becomes_its_outcome(
    client: TrackingClient, emulator: EmulatorServer, status: int, expected: Outcome
) -> None:
    await emulator.set_faults(Faults(error_rate=1.0, error_status=status))

    assert await client.send(SHOP, "view", VIEW) == expected


async def test_a_transient_answer_carries_the_servers_retry_after(
    client: TrackingClient, emulator: EmulatorServer
) -> None:
    await emulator.set_faults(Faults(outage="503", retry_after=7))

    assert await client.send(SHOP, "view", VIEW) == Transient(503, "HTTP 503 Service Unavailable", 7.0)


async def test_a_429_from_the_emulators_rate_limit_says_when_to_come_back() -> None:
    async with (
        EmulatorServer([EmulatorShop(PARTNER, SECRET, rate_limit=0.5)]) as emulator,
        TrackingClient(config(emulator.url), shops(rate_limit=None)) as client,
    ):
        outcomes = [await client.send(SHOP, "view", VIEW) for _ in range(3)]

    assert outcomes[:2] == [Delivered(200)] * 2  # the emulator's burst at 0.5/s is 2
    refused = outcomes[2]
    assert isinstance(refused, Transient)
    assert refused.status == 429
    assert refused.retry_after is not None
    assert refused.retry_after in (1.0, 2.0)  # whole seconds, rounded up


# --- against a raw server: answers the emulator never gives ------------------------------------------


@asynccontextmanager
async def raw_server(answer: Callable[[], bytes]) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP server that reads one request per connection, writes ``answer()`` and closes."""
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/1.0/", requests
    finally:
        server.close()
        await server.wait_closed()


async def send_once(base_url: str) -> Outcome:
    async with TrackingClient(config(base_url), shops()) as client:
        return await client.send(SHOP, "view", VIEW)


async def test_an_http_date_retry_after_becomes_seconds_from_now() -> None:
    def answer() -> bytes:
        when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
        return (
            f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {when}\r\nContent-Length: 0\r\n\r\n".encode()
        )

    async with raw_server(answer) as (url, _):
        outcome = await send_once(url)

    assert isinstance(outcome, Transient)
    assert outcome.status == 503
    assert outcome.retry_after is not None
    assert 27 <= outcome.retry_after <= 30


async def test_a_garbled_retry_after_is_ignored_not_fatal() -> None:
    answer = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: later\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(lambda: answer) as (url, _):
        assert await send_once(url) == Transient(429, "HTTP 429 Too Many Requests", None)


async def test_a_malformed_answer_is_transient() -> None:
    async with raw_server(lambda: b"HTTP/1.1 2OO OK\r\n\r\n") as (url, _):
        outcome = await send_once(url)

    assert isinstance(outcome, Transient)
    assert outcome.status is None
    assert outcome.reason.startswith("malformed response")
    assert_no_secret(outcome)


async def test_an_answer_whose_body_is_cut_short_still_counts_by_its_status() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"
    async with raw_server(lambda: answer) as (url, _):
        assert await send_once(url) == Delivered(200)


async def test_a_redirect_is_not_followed_and_is_permanent(emulator: EmulatorServer) -> None:
    # Following it would hand the apiKey to whatever the Location names.
    answer = f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {emulator.url}view\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(lambda: answer.encode()) as (url, requests):
        assert await send_once(url) == Permanent(307, "HTTP 307 Temporary Redirect")

    assert len(requests) == 1
    assert emulator.counters["requests"] == {}


# --- timeouts and broken connections -----------------------------------------------------------------


async def test_a_single_call_times_out_at_its_timeout_and_is_transient(emulator: EmulatorServer) -> None:
    await emulator.set_faults(Faults(latency_ms=5000))
    async with TrackingClient(config(emulator.url, single_timeout=0.05), shops()) as client:
        started = time.monotonic()
        outcome = await client.send(SHOP, "view", VIEW)
        elapsed = time.monotonic() - started

    assert outcome == Transient(None, "timeout: TimeoutError: no answer within 0.05 s", None)
    assert elapsed < 1.0
    assert emulator.events() == []


async def test_a_batch_uses_the_batch_timeout(emulator: EmulatorServer) -> None:
    await emulator.set_faults(Faults(latency_ms=300))
    cfg = config(emulator.url, single_timeout=0.05, batch_timeout=5.0)
    async with TrackingClient(cfg, shops()) as client:
        assert await client.send_batch(SHOP, [TrackingCall(SHOP, "view", VIEW)]) == Delivered(200)
        assert isinstance(await client.send(SHOP, "view", VIEW), Transient)


async def test_waiting_for_a_free_connection_does_not_count_against_the_timeout(
    emulator: EmulatorServer,
) -> None:
    # One connection, three calls of 150 ms each: the third finishes at 450 ms, past the 400 ms timeout,
    # yet each call's own exchange took 150 ms.
    await emulator.set_faults(Faults(latency_ms=150))
    async with TrackingClient(config(emulator.url, concurrency=1, single_timeout=0.4), shops()) as client:
        outcomes = await asyncio.gather(*(client.send(SHOP, "view", VIEW) for _ in range(3)))

    assert outcomes == [Delivered(200)] * 3


async def test_refused_and_reset_connections_and_outages_are_transient_and_recover(
    client: TrackingClient, emulator: EmulatorServer
) -> None:
    assert await client.send(SHOP, "view", VIEW) == Delivered(200)

    await emulator.set_faults(Faults(outage="refuse"))
    # The server closed the pooled connection as it went down; a call may meet that first, and no call
    # after it finds anyone listening.
    dropped = await client.send(SHOP, "view", VIEW)
    refused = await client.send(SHOP, "view", VIEW)
    await emulator.set_faults(Faults(outage="reset"))
    reset = await client.send(SHOP, "view", VIEW)
    await emulator.set_faults(Faults(outage="503"))
    unavailable = await client.send(SHOP, "view", VIEW)
    await emulator.set_faults(Faults())
    recovered = await client.send(SHOP, "view", VIEW)

    assert isinstance(dropped, Transient)
    assert dropped.status is None
    assert isinstance(refused, Transient)
    assert refused.reason.startswith("cannot connect")
    assert isinstance(reset, Transient)
    assert reset.status is None
    assert unavailable == Transient(503, "HTTP 503 Service Unavailable", None)
    assert recovered == Delivered(200)
    assert len(emulator.events()) == 2


async def test_a_server_that_is_gone_is_a_transient_connection_error() -> None:
    async with EmulatorServer([]) as gone:
        url = gone.url
    assert isinstance(await send_once(url), Transient)


# --- the rate limiter, on a fake clock ---------------------------------------------------------------


class JumpingClock:
    """A fake clock whose ``sleep`` jumps straight to the wake-up time; it records every wake-up time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wakeups: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        wake = self.now + delay
        self.wakeups.append(wake)
        self.now = max(self.now, wake)
        await asyncio.sleep(0)


async def test_the_client_holds_each_shops_rate_over_a_window(emulator: EmulatorServer) -> None:
    clock = JumpingClock()
    start = clock.now
    async with TrackingClient(
        config(emulator.url), shops(rate_limit=20), clock=clock, sleep=clock.sleep
    ) as client:
        released: list[float] = []

        class Recorded:
            """The shop's bucket, noting when each caller is let go."""

            def __init__(self, bucket: Any) -> None:
                self.bucket = bucket

            async def acquire(self, sleep: Any) -> None:
                await self.bucket.acquire(sleep)
                released.append(clock.now)

        client.limiters = {SHOP: Recorded(client.limiters[SHOP])}  # type: ignore[assignment,dict-item]
        outcomes = await asyncio.gather(*(client.send(SHOP, "view", VIEW) for _ in range(42)))

    assert outcomes == [Delivered(200)] * 42
    assert emulator.counters["events_accepted"] == 42
    # A burst of 2 at once, then one call per 1/20 s: 40 calls take 2 s of (fake) time, and no second
    # of it holds more than 2 + 20 calls — even though this clock wakes sleepers late and out of order.
    slots = sorted(released)
    assert len(slots) == 42
    # Not sooner than the rate allows (this clock jumps ahead at every sleep, so callers wake late and are
    # spaced again when they do: later, never faster).
    assert slots[-1] - start >= 2.0 - 1e-6
    assert max(sum(1 for s in slots if t <= s < t + 1.0) for t in slots) <= 22


async def test_a_held_shop_sends_only_after_the_hold(emulator: EmulatorServer) -> None:
    clock = JumpingClock()
    async with TrackingClient(config(emulator.url), shops(), clock=clock, sleep=clock.sleep) as client:
        client.limiters[SHOP].hold_until(clock.now + 5.0)
        assert await client.send(SHOP, "view", VIEW) == Delivered(200)

    assert clock.wakeups == [pytest.approx(1005.0)]


# --- programming errors ------------------------------------------------------------------------------


async def test_programming_errors_raise(client: TrackingClient) -> None:
    with pytest.raises(KeyError):
        await client.send("no-such-shop", "view", VIEW)
    with pytest.raises(ValueError, match="not a single-event method"):
        await client.send(SHOP, "visitorEvents", [])
    with pytest.raises(ValueError, match="at least one"):
        await client.send_batch(SHOP, [])
    with pytest.raises(ValueError, match="holds a call for shop"):
        await client.send_batch(SHOP, [TrackingCall("disabled-shop", "view", VIEW)])
    with pytest.raises(TypeError):
        await client.send(SHOP, "view", {"when": object()})
    with pytest.raises(RuntimeError, match="already started"):
        await client.start()


async def test_a_client_must_be_started_and_can_be_closed_twice() -> None:
    client = TrackingClient(config("http://127.0.0.1:9/1.0/"), shops())
    with pytest.raises(RuntimeError, match="start"):
        await client.send(SHOP, "view", VIEW)
    await client.start()
    await client.close()
    await client.close()


def test_mapping_bodies_are_encoded_like_dicts() -> None:
    from types import MappingProxyType

    from consumer.tracking import _mapping_to_dict

    assert _mapping_to_dict(MappingProxyType({"a": 1})) == {"a": 1}


# --- the apiKey never leaks --------------------------------------------------------------------------


async def collect_failure_texts(emulator: EmulatorServer) -> list[str]:
    """Drive every failure path; return the text of every outcome, repr and raised exception on the way."""
    texts: list[str] = []

    async def outcome_of(make: Callable[[], Awaitable[Outcome]]) -> None:
        outcome = await make()
        assert not isinstance(outcome, Delivered)
        texts.extend((repr(outcome), outcome.reason))

    def raised(exc: BaseException) -> None:
        texts.extend(traceback.format_exception(exc))

    cfg = config(emulator.url, single_timeout=0.05)
    async with TrackingClient(cfg, shops()) as client:
        texts.extend((repr(client), client.url_for(SHOP, "view"), repr(client.limiters), repr(client.scrub)))
        await outcome_of(lambda: client.send(SHOP, "view", {"productId": 1}))  # 400
        for faults in (
            Faults(error_rate=1.0, error_status=500),
            Faults(latency_ms=5000),  # timeout
            Faults(outage="reset"),
            Faults(outage="refuse"),
        ):
            await emulator.set_faults(faults)
            await outcome_of(lambda: client.send(SHOP, "view", VIEW))
        await emulator.set_faults(Faults())
        bad_calls: tuple[Callable[[], Awaitable[Outcome]], ...] = (
            lambda: client.send("no-such-shop", "view", VIEW),
            lambda: client.send(SHOP, "view", {"x": object()}),
            lambda: client.send_raw(SHOP, "nosuchMethod", b"{}", timeout=1),
        )
        for bad_call in bad_calls:
            with pytest.raises((KeyError, TypeError)) as info:
                await bad_call()
            raised(info.value)
    async with TrackingClient(config(emulator.url), shops(api_key=SECRET + "-rotated")) as client:
        await outcome_of(lambda: client.send(SHOP, "view", VIEW))  # 401
    async with (
        raw_server(lambda: b"HTTP/1.1 2OO OK\r\n\r\n") as (url, _),
        TrackingClient(config(url), shops()) as client,
    ):
        await outcome_of(lambda: client.send(SHOP, "view", VIEW))
    with pytest.raises(ValueError, match="IPv6") as unparsable:
        TrackingClient(config("http://[::1/1.0/"), shops())
    raised(unparsable.value)
    # No host: InvalidURL. The configuration refuses such a URL; the client must not leak if handed one.
    async with TrackingClient(TrackingConfig.model_construct(base_url="http:///1.0/"), shops()) as client:
        invalid = await client.send(SHOP, "view", VIEW)
        assert isinstance(invalid, Permanent)
        assert invalid.reason.startswith("invalid URL")
        texts.extend((repr(invalid), invalid.reason))
    async with TrackingClient(config("http://nonexistent.invalid/1.0/", verify_tls=False), shops()) as client:
        await outcome_of(lambda: client.send(SHOP, "view", VIEW))
    return texts


async def test_no_api_key_in_any_log_line_outcome_repr_or_exception(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with capture_logs() as structured:
        texts = await collect_failure_texts(emulator)

    assert len(structured) >= 8  # every failure above was logged (at debug) ...
    assert all(entry["log_level"] in ("debug", "warning") for entry in structured)  # ... never at info
    assert_no_secret(*texts, *map(repr, structured))
    assert_no_secret(*(record.getMessage() for record in caplog.records))
    assert_no_secret(*(record.exc_text or "" for record in caplog.records))
    assert_no_secret(repr(shops()), str(shops()))
