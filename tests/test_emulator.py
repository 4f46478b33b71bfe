"""The tracking API emulator: the contract's answers, the event record, the admin API, faults, the CLI.

The contract cases come from ``docs/contract-vectors.json``, the vectors of the contract page
``docs/tracking-api.md``: the reference set the project was given, plus its own, marked
``"origin": "project"`` (the file's ``about`` says why).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from consumer.cli import build_parser
from consumer_dev.emulator import (
    EmulatorServer,
    EmulatorShop,
    EmulatorThread,
    Faults,
    build_app,
    load_shops_file,
    parse_shop_option,
    shops_from_args,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
# Beside the contract page they test (docs/tracking-api.md), so a reader finds both in one place.
VECTORS_FILE = REPO / "docs" / "contract-vectors.json"

PARTNER, KEY = "partner1", "key-1"
OTHER, OTHER_KEY = "partner2", "key-2"
VIEW = {"sessionExternalId": "60842392e4881c65e6c5e423", "productId": 123456}


def contract_vectors() -> list[Any]:
    vectors = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))["vectors"]
    return [
        pytest.param(v, id=f"{i:02d}-{v['status']}-{v['method']}-{v['why']}") for i, v in enumerate(vectors)
    ]


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    shops = [
        EmulatorShop(PARTNER, KEY),
        EmulatorShop(OTHER, OTHER_KEY),
        EmulatorShop("off", "off-key", disabled=True),
    ]
    async with EmulatorServer(shops) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    base_url: str,
    method: str,
    body: object = VIEW,
    *,
    partner: str | None = PARTNER,
    key: str | None = KEY,
    verb: str = "POST",
    data: bytes | None = None,
    content_type: str | None = "application/json",
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    """One request to the emulator; returns the status, the JSON answer and the headers."""
    query = {name: value for name, value in (("partnerId", partner), ("apiKey", key)) if value is not None}
    headers = {} if content_type is None else {"Content-Type": content_type}
    payload = json.dumps(body).encode() if data is None else data
    async with http.request(verb, base_url + method, params=query, data=payload, headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else {}, response.headers


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # the poll interval of a deadline-bounded wait (noqa: sleep-ok)


# --- the contract ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", contract_vectors())
async def test_contract_vector_gets_the_status_the_contract_gives_it(
    vector: dict[str, Any], emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    status, answer, _ = await call(http, emulator.url, vector["method"], vector["body"])

    assert status == vector["status"], answer
    recorded = [(event["method"], event["body"]) for event in emulator.events(PARTNER)]
    if status != 200:
        assert recorded == []
    elif vector["method"] == "visitorEvents":
        assert recorded == [next(iter(envelope.items())) for envelope in vector["body"]]
    else:
        assert recorded == [(vector["method"], vector["body"])]


async def test_an_accepted_call_is_answered_with_an_empty_json_object(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    status, answer, headers = await call(http, emulator.url, "view")

    assert (status, answer) == (200, {})
    assert headers["Content-Type"].startswith("application/json")


async def test_a_violation_is_answered_400_with_the_field_at_fault(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    batch = [{"view": VIEW}, {"view": {"sessionExternalId": "abc", "productId": "1"}}]

    status, answer, _ = await call(http, emulator.url, "visitorEvents", batch)

    assert status == 400
    assert answer["error"].startswith("[1].view.productId:")
    assert emulator.events() == []  # one bad event rejects the whole batch


@pytest.mark.parametrize(
    ("partner", "key"),
    [(PARTNER, "wrong"), (PARTNER, None), (None, KEY), ("unknown", KEY), (PARTNER, OTHER_KEY), (PARTNER, "")],
)
async def test_a_wrong_or_missing_partner_and_key_pair_is_401(
    emulator: EmulatorServer, http: aiohttp.ClientSession, partner: str | None, key: str | None
) -> None:
    status, _, _ = await call(http, emulator.url, "view", partner=partner, key=key)

    assert status == 401
    assert emulator.events() == []


async def test_a_disabled_shop_is_403(emulator: EmulatorServer, http: aiohttp.ClientSession) -> None:
    assert (await call(http, emulator.url, "view", partner="off", key="off-key"))[0] == 403


@pytest.mark.parametrize("path", ["1.0/nosuchMethod", "1.0/", "", "view", "2.0/view", "1.0/view/extra"])
async def test_an_unknown_path_is_404(
    emulator: EmulatorServer, http: aiohttp.ClientSession, path: str
) -> None:
    root = emulator.url.removesuffix("1.0/")

    status, _, _ = await call(http, root, path)

    assert status == 404
    assert emulator.counters["requests"]["(unknown)"] == {"404": 1}


@pytest.mark.parametrize("verb", ["GET", "PUT", "DELETE", "PATCH"])
async def test_a_verb_other_than_post_is_405(
    emulator: EmulatorServer, http: aiohttp.ClientSession, verb: str
) -> None:
    status, _, headers = await call(http, emulator.url, "view", verb=verb)

    assert status == 405
    assert headers["Allow"] == "POST"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_body_that_is_not_declared_json_is_415(
    emulator: EmulatorServer, http: aiohttp.ClientSession, content_type: str | None
) -> None:
    status, _, _ = await call(http, emulator.url, "view", content_type=content_type)

    assert status == 415


async def test_json_with_a_charset_is_json(emulator: EmulatorServer, http: aiohttp.ClientSession) -> None:
    status, _, _ = await call(http, emulator.url, "view", content_type="application/json; charset=utf-8")

    assert status == 200


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"\xff\xfe"])
async def test_a_body_that_is_not_json_is_400(
    emulator: EmulatorServer, http: aiohttp.ClientSession, data: bytes
) -> None:
    assert (await call(http, emulator.url, "view", data=data))[0] == 400


# --- the record and the counters ---------------------------------------------------------------------


async def test_accepted_events_are_recorded_per_shop_in_arrival_order(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    before = time.time()
    await call(http, emulator.url, "view", {**VIEW, "productId": 1})
    await call(http, emulator.url, "view", {**VIEW, "productId": 2}, partner=OTHER, key=OTHER_KEY)
    batch = [{"addToBasket": {**VIEW, "productId": 3}}, {"view": {**VIEW, "productId": 4}}]
    await call(http, emulator.url, "visitorEvents", batch)
    await call(http, emulator.url, "view", {"productId": 5})  # rejected: not recorded
    after = time.time()

    mine = emulator.events(PARTNER)
    assert [(e["method"], e["body"]["productId"], e["via"]) for e in mine] == [
        ("view", 1, "view"),
        ("addToBasket", 3, "visitorEvents"),
        ("view", 4, "visitorEvents"),
    ]
    assert [e["seq"] for e in emulator.events()] == [0, 1, 2, 3]
    assert [e["partnerId"] for e in emulator.events()] == [PARTNER, OTHER, PARTNER, PARTNER]
    assert all(before <= e["received_at"] <= after for e in emulator.events())


async def test_the_counters_count_requests_by_method_and_status(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    await call(http, emulator.url, "view")
    await call(http, emulator.url, "view")
    await call(http, emulator.url, "view", key="wrong")
    await call(http, emulator.url, "visitorEvents", [{"view": VIEW}, {"view": VIEW}])

    assert emulator.counters == {
        "requests": {"view": {"200": 2, "401": 1}, "visitorEvents": {"200": 1}},
        "events_accepted": 4,
        "events_by_shop": {PARTNER: 4},
        "rate_limited": 0,
    }


async def test_the_admin_api_serves_events_since_a_sequence_number_and_counters(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    for product in (1, 2, 3):
        await call(http, emulator.url, "view", {**VIEW, "productId": product})
    await call(http, emulator.url, "view", partner=OTHER, key=OTHER_KEY)

    async with http.get(emulator.admin_url + "events", params={"partnerId": PARTNER, "since": "1"}) as r:
        page = await r.json()
    async with http.get(emulator.admin_url + "counters") as r:
        counters = await r.json()
    async with http.get(emulator.admin_url + "events", params={"since": "x"}) as r:
        bad_since = r.status

    assert [e["body"]["productId"] for e in page["events"]] == [2, 3]
    assert {e["partnerId"] for e in page["events"]} == {PARTNER}
    assert page["next"] == 4
    assert counters["events_accepted"] == 4
    assert bad_since == 400


async def test_a_reset_forgets_events_and_counters_but_keeps_faults(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    await call(http, emulator.url, "view")
    await emulator.set_faults(Faults(latency_ms=1))

    async with http.post(emulator.admin_url + "reset") as r:
        assert r.status == 200

    assert emulator.events() == []
    assert emulator.counters["requests"] == {}
    assert emulator.faults == Faults(latency_ms=1)
    await call(http, emulator.url, "view")
    assert [e["seq"] for e in emulator.events()] == [0]


async def test_a_bounded_record_keeps_the_latest_events_and_their_numbers(
    http: aiohttp.ClientSession,
) -> None:
    async with EmulatorServer([EmulatorShop(PARTNER, KEY)], max_events=2) as emulator:
        for product in range(10):
            await call(http, emulator.url, "view", {**VIEW, "productId": product})
        kept = emulator.events()

    assert 2 <= len(kept) <= 4
    assert [e["body"]["productId"] for e in kept] == list(range(10 - len(kept), 10))
    assert [e["seq"] for e in kept] == list(range(10 - len(kept), 10))
    assert emulator.counters["events_accepted"] == 10


async def test_a_record_of_zero_events_only_counts(http: aiohttp.ClientSession) -> None:
    async with EmulatorServer([EmulatorShop(PARTNER, KEY)], max_events=0) as emulator:
        await call(http, emulator.url, "visitorEvents", [{"view": VIEW}] * 3)

    assert emulator.events() == []
    assert emulator.counters["events_accepted"] == 3
    assert emulator.state.next_seq == 3


# --- the rate limit ----------------------------------------------------------------------------------


async def test_a_shop_over_its_rate_limit_gets_429_with_retry_after(http: aiohttp.ClientSession) -> None:
    shops = [EmulatorShop(PARTNER, KEY, rate_limit=0.5), EmulatorShop(OTHER, OTHER_KEY)]
    async with EmulatorServer(shops) as emulator:
        # One call per 2 s on average, with a burst of 2 to absorb network jitter: the third call is refused.
        answers = [await call(http, emulator.url, "view") for _ in range(3)]
        other = [(await call(http, emulator.url, "view", partner=OTHER, key=OTHER_KEY))[0] for _ in range(20)]

    assert [status for status, _, _ in answers] == [200, 200, 429]
    assert answers[2][2]["Retry-After"] in ("1", "2")  # whole seconds, rounded up
    assert other == [200] * 20  # no limit unless configured
    assert emulator.counters["rate_limited"] == 1
    assert len(emulator.events(PARTNER)) == 2


# --- faults ------------------------------------------------------------------------------------------


async def test_injected_errors_carry_their_status_and_retry_after_and_record_nothing(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    await emulator.set_faults(Faults(error_rate=1.0, error_status=502, retry_after=3))

    status, _, headers = await call(http, emulator.url, "view")

    assert status == 502
    assert headers["Retry-After"] == "3"
    assert emulator.events() == []


async def test_an_error_rate_fails_about_that_share_of_calls(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    await emulator.set_faults(Faults(error_rate=0.5, error_status=500))

    statuses = [(await call(http, emulator.url, "view"))[0] for _ in range(400)]

    assert set(statuses) == {200, 500}
    assert 140 <= statuses.count(500) <= 260  # six standard deviations either side of 200
    assert len(emulator.events()) == statuses.count(200)


async def test_latency_delays_every_call(emulator: EmulatorServer, http: aiohttp.ClientSession) -> None:
    await emulator.set_faults(Faults(latency_ms=80, latency_jitter_ms=40))

    started = time.monotonic()
    status, _, _ = await call(http, emulator.url, "view")

    assert status == 200
    assert time.monotonic() - started >= 0.08


async def test_a_503_outage_fails_every_call_while_the_admin_api_keeps_working(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    async with http.put(emulator.admin_url + "faults", json={"outage": "503", "retry_after": 1.5}) as r:
        assert r.status == 200

    statuses = {(await call(http, emulator.url, method))[0] for method in ("view", "order", "visitorEvents")}
    _status, _, headers = await call(http, emulator.url, "view")
    async with http.get(emulator.admin_url + "counters") as r:
        counters = await r.json()

    assert statuses == {503}
    assert headers["Retry-After"] == "1.5"
    assert counters["requests"]["view"] == {"503": 2}


async def test_a_reset_outage_resets_every_connection_that_sends_a_call(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    await emulator.set_faults(Faults(outage="reset"))

    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await call(http, emulator.url, "view")

    assert emulator.counters["requests"]["view"] == {"reset": 1}
    await emulator.set_faults(Faults())
    assert (await call(http, emulator.url, "view"))[0] == 200


async def test_a_refuse_outage_closes_the_port_and_reopens_the_same_one(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    port = emulator.port
    async with http.put(emulator.admin_url + "faults", json={"outage": "refuse"}) as r:
        assert r.status == 200  # the admin request that started it is still answered

    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens: refused
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as fresh:
            await call(fresh, emulator.url, "view")

    await emulator.set_faults(Faults())

    assert emulator.port == port
    assert (await call(http, emulator.url, "view"))[0] == 200


async def test_a_refuse_outage_drops_connections_already_open(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
    writer.write(b"GET /_emulator/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")

    await emulator.set_faults(Faults(outage="refuse"))

    await asyncio.wait_for(reader.read(), timeout=5)  # reads to EOF: the server closed it
    assert reader.at_eof()
    writer.close()
    await emulator.set_faults(Faults())


async def test_an_outage_with_a_duration_ends_by_itself(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    await emulator.set_faults(Faults(outage="refuse", outage_seconds=0.1))

    async def answers_200() -> bool:
        try:
            async with aiohttp.ClientSession() as fresh:
                return (await call(fresh, emulator.url, "view"))[0] == 200
        except aiohttp.ClientConnectionError:
            return False

    await eventually(answers_200)
    assert emulator.faults == Faults()


async def test_an_emulator_can_start_in_an_outage() -> None:
    async with EmulatorServer([EmulatorShop(PARTNER, KEY)], Faults(outage="refuse")) as emulator:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", emulator.port)) != 0


# --- the admin faults API ----------------------------------------------------------------------------


async def test_faults_are_read_and_replaced_through_the_admin_api(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    wanted = {"latency_ms": 5, "error_rate": 0.25, "error_status": 500, "retry_after": 2}

    async with http.put(emulator.admin_url + "faults", json=wanted) as r:
        assert r.status == 200
    async with http.get(emulator.admin_url + "faults") as r:
        shown = await r.json()
    async with http.put(emulator.admin_url + "faults", json={}) as r:
        assert r.status == 200

    assert shown == {**Faults().to_json(), **wanted}
    assert emulator.faults == Faults()


@pytest.mark.parametrize(
    "body",
    [
        {"latency": 5},
        {"latency_ms": "5"},
        {"latency_ms": -1},
        {"error_rate": 1.5},
        {"error_status": 5.5},
        {"error_status": 700},
        {"outage": "sometimes"},
        {"outage": 503},
        {"retry_after": True},
        {"outage_seconds": 0},
        [],
        "x",
    ],
)
async def test_impossible_faults_are_refused_and_change_nothing(
    emulator: EmulatorServer, http: aiohttp.ClientSession, body: object
) -> None:
    async with http.put(emulator.admin_url + "faults", json=body) as r:
        status, answer = r.status, await r.json()

    assert status == 400
    assert answer["error"]
    assert emulator.faults == Faults()


async def test_the_admin_api_has_a_health_check(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(emulator.admin_url + "health") as r:
        assert (r.status, await r.json()) == (200, {"status": "ok"})


def test_a_partner_configured_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        build_app([EmulatorShop(PARTNER, KEY), EmulatorShop(PARTNER, "other")])


def test_a_shops_repr_hides_its_key() -> None:
    assert KEY not in repr(EmulatorShop(PARTNER, KEY))


# --- in a thread, for synchronous callers ------------------------------------------------------------


def _post_sync(url: str, body: object) -> int:
    request = urllib.request.Request(
        f"{url}view?partnerId={PARTNER}&apiKey={KEY}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_the_emulator_thread_serves_synchronous_callers() -> None:
    with EmulatorThread([EmulatorShop(PARTNER, KEY)]) as emulator:
        assert _post_sync(emulator.url, VIEW) == 200
        emulator.set_faults(Faults(outage="503"))
        assert _post_sync(emulator.url, VIEW) == 503
        emulator.set_faults(Faults())
        events = emulator.events(PARTNER)
        counters = emulator.counters
        emulator.reset()
        after_reset = emulator.events()

    assert [e["body"] for e in events] == [VIEW]
    assert counters["requests"]["view"] == {"200": 1, "503": 1}
    assert after_reset == []


def test_the_emulator_thread_reports_a_failure_to_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        thread = EmulatorThread([], port=taken.getsockname()[1])
        with pytest.raises(OSError, match="address already in use"):
            thread.start()
        thread.stop()


# --- the command line --------------------------------------------------------------------------------


def test_shop_options_read_keys_from_the_value_or_the_environment() -> None:
    assert parse_shop_option("p1:k1") == EmulatorShop("p1", "k1")
    assert parse_shop_option("p1:k:with:colons") == EmulatorShop("p1", "k:with:colons")
    assert parse_shop_option("p1:env:RR_KEY", {"RR_KEY": "from-env"}) == EmulatorShop("p1", "from-env")
    for bad in ("p1", ":k1", "p1:"):
        with pytest.raises(ValueError, match="PARTNER_ID:API_KEY"):
            parse_shop_option(bad)
    with pytest.raises(ValueError, match="RR_MISSING is not set"):
        parse_shop_option("p1:env:RR_MISSING", {})


def test_cli_options_build_shops_and_faults(tmp_path: Path) -> None:
    shops_file = tmp_path / "shops.json"
    shops_file.write_text(json.dumps([{"partner_id": "p3", "api_key": "k3", "rate_limit": 9}]))
    args = build_parser().parse_args(
        [
            "emulator",
            "--shop",
            "p1:k1",
            "--shop",
            "p2:k2",
            "--shops-file",
            str(shops_file),
            "--disabled",
            "p2",
            "--rate-limit",
            "50",
        ]
    )

    shops = shops_from_args(args)

    assert shops == [
        EmulatorShop("p1", "k1", rate_limit=50),
        EmulatorShop("p2", "k2", disabled=True, rate_limit=50),
        EmulatorShop("p3", "k3", rate_limit=9),
    ]
    assert load_shops_file(shops_file) == [EmulatorShop("p3", "k3", rate_limit=9)]
    assert shops_from_args(build_parser().parse_args(["emulator"])) == [EmulatorShop("demo", "demo-key")]


def test_rr_consumer_emulator_serves_until_sigterm() -> None:
    env = {**os.environ, "RR_TEST_KEY": "cli-key"}
    command = [sys.executable, "-m", "consumer", "emulator", "--port", "0", "--shop", "p1:env:RR_TEST_KEY"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO) as proc:
        assert proc.stdout is not None
        banner = proc.stdout.readline().decode()
        url = banner.split()[3]
        request = urllib.request.Request(
            f"{url}view?partnerId=p1&apiKey=cli-key",
            data=json.dumps(VIEW).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            status = response.status
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=10)
        stderr = proc.stderr.read().decode() if proc.stderr else ""

    assert banner.startswith("emulator listening on http://127.0.0.1:")
    assert status == 200
    assert returncode == 0, stderr
    assert "cli-key" not in banner + stderr


def test_rr_consumer_emulator_rejects_a_bad_shop_option() -> None:
    args = build_parser().parse_args(["emulator", "--shop", "nokey"])
    assert args.handler(args) == 2
