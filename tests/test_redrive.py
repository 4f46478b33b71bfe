"""The re-drive plan, the resolution log's entries and ``dlq inspect``'s table, without a broker."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from consumer import cli, resolution
from consumer.dlq import DeadLetter, Found, render, report
from consumer.errors import DecodeError
from consumer.record import CallFailure, Record
from consumer.redrive import Outcome, RedriveFilter, RedrivePlan, parse_origin
from tests.relay import SHOPS, write_config

DLQ = "shop.events.dlq"
SOURCE = "shop.events"


class Message:
    """What the plan reads of a dead-letter record."""

    def __init__(self, headers: dict[str, str] | None, value: bytes | None = b"{}") -> None:
        self._headers = [(k, v.encode()) for k, v in (headers or {}).items()]
        self._value = value

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return list(self._headers)

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return b"k"

    def topic(self) -> str:
        return DLQ

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 0

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


def letter_headers(**overrides: str | None) -> dict[str, str]:
    headers: dict[str, str | None] = {
        "source.topic": SOURCE,
        "source.partition": "2",
        "source.offset": "41",
        "stage": "deliver",
        "http.status": "400",
        "method": "order",
        "error.message": "rejected",
        "calls.failed": '[{"index": 1, "method": "order", "status": 400, "reason": "rejected"}]',
        "calls.delivered": "[0, 2]",
        "last.failure": "2026-11-30T09:00:00.000+00:00",
    }
    headers.update({name.replace("_", "."): value for name, value in overrides.items()})
    return {f"rr.dlq.{name}": value for name, value in headers.items() if value is not None}


def record(offset: int = 7, headers: dict[str, str] | None = None) -> tuple[Record, Message]:
    message = Message(headers if headers is not None else letter_headers())
    return Record((DLQ, 0), offset, 1, b"k", message), message


class Log:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def write(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            {"source_topic": "orders.legacy"},
            "its source topic 'orders.legacy' is not a topic of this configuration",
        ),
        ({"source_topic": None}, "rr.dlq.source.topic is missing"),
        ({"source_partition": "abc"}, "rr.dlq.source.partition is not a whole number: 'abc'"),
        ({"source_offset": "-1"}, "rr.dlq.source.offset is not a whole number: '-1'"),
        ({"source_offset": None}, "rr.dlq.source.offset is missing"),
        ({"calls_delivered": "{not json"}, "rr.dlq.calls.delivered is not JSON: '{not json'"),
        ({"calls_delivered": '{"a": 1}'}, "rr.dlq.calls.delivered is not a list of call indices"),
        ({"calls_delivered": "[true]"}, "rr.dlq.calls.delivered is not a list of call indices"),
        ({"redrive_count": "x"}, "rr.dlq.redrive.count is not a whole number: 'x'"),
        ({"redrive_count": "²"}, "rr.dlq.redrive.count is not a whole number"),
    ],
)
def test_a_malformed_record_is_skipped_with_the_reason_never_raised(
    overrides: dict[str, str | None], reason: str
) -> None:
    plan = RedrivePlan(sources={SOURCE})
    rec, message = record(headers=letter_headers(**overrides))
    assert plan.prepare(rec, message) is None
    assert plan.unredrivable == 1
    assert plan.redriven == 0
    [(where, said)] = plan.unredrivable_reasons
    assert where == (DLQ, 0, 7)
    assert said.startswith(reason), said
    assert rec.origin is None, "nothing about it reaches the pipeline"


def test_a_record_without_rr_dlq_headers_is_skipped_as_such() -> None:
    plan = RedrivePlan(sources={SOURCE})
    rec, message = record(headers={})
    assert plan.prepare(rec, message) is None
    assert plan.unredrivable_reasons == [
        ((DLQ, 0, 7), "no rr.dlq headers: not a record the relay dead-lettered")
    ]
    # With a filter, it is one the filter passes over (it has no header to match).
    filtered = RedrivePlan(filters=RedriveFilter(statuses=["401"]), sources={SOURCE})
    assert filtered.prepare(*record(headers={})) is None
    assert (filtered.skipped_by_filter, filtered.unredrivable) == (1, 0)


def test_each_record_gets_one_outcome_and_only_re_driven_ones_are_recorded() -> None:
    log = Log()
    plan = RedrivePlan(
        filters=RedriveFilter(statuses=["400"]),
        max_redrives=2,
        sources={SOURCE},
        resolved={(DLQ, 0): {3}},
        log=log,
    )
    resolved, filtered, guarded, good, failing = (
        record(3),
        record(4, letter_headers(http_status="401")),
        record(5, letter_headers(redrive_count="2")),
        record(6),
        record(8, letter_headers(redrive_count="1")),
    )
    assert plan.prepare(*resolved) is None
    assert plan.prepare(*filtered) is None
    assert plan.prepare(*guarded) is None
    assert plan.prepare(*good) == (SOURCE, b"{}", frozenset({0, 2}))
    assert plan.prepare(*failing) is not None
    assert good[0].origin == (SOURCE, 2, 41)
    assert good[0].redrive_count == 1
    assert failing[0].redrive_count == 2
    assert (plan.skipped_resolved, plan.skipped_by_filter, plan.skipped_by_guard, plan.redriven) == (
        1,
        1,
        1,
        2,
    )

    # Settled: the records passed over leave no trace; the re-driven ones are written with their outcome.
    for passed_over in (resolved, filtered, guarded):
        plan.settled(passed_over[0])
    good[0].calls = [object(), object(), object()]  # type: ignore[list-item]
    good[0].send_index = [1]
    plan.settled(good[0])
    failing[0].failure = DecodeError("not JSON")
    plan.settled(failing[0])
    assert [(o.where, o.outcome, o.redrive, o.sent, o.reason) for o in log.outcomes] == [
        ((DLQ, 0, 6), "delivered", 1, 1, ""),
        ((DLQ, 0, 8), "dead-lettered", 2, 0, "decode: not JSON"),
    ]
    assert (plan.delivered, plan.dead_lettered, plan.unsettled) == (1, 1, 0)
    assert plan.dead_lettered_reasons == [((DLQ, 0, 8), "decode: not JSON")]


def test_a_failed_call_is_described_with_its_status() -> None:
    plan = RedrivePlan(sources={SOURCE}, log=Log())
    rec, message = record()
    plan.prepare(rec, message)
    rec.failed_calls = [CallFailure(1, "order", 400, "product 11 is not in the feed")]
    plan.settled(rec)
    assert plan.dead_lettered_reasons == [
        ((DLQ, 0, 7), "deliver: order HTTP 400 product 11 is not in the feed")
    ]


def test_a_time_filter_takes_a_failure_time_without_an_offset_as_utc() -> None:
    filters = RedriveFilter(failed_after=datetime(2026, 11, 30, tzinfo=UTC))
    assert filters.matches(letter_headers(last_failure="2026-11-30T10:00:00"))
    assert not filters.matches(letter_headers(last_failure="2026-11-29T10:00:00"))
    assert not filters.matches(letter_headers(last_failure="yesterday"))


def test_parse_origin_reads_a_clean_record() -> None:
    origin = parse_origin(letter_headers(redrive_count="1"), {SOURCE})
    assert not isinstance(origin, str)
    assert (origin.source_topic, origin.source_partition, origin.source_offset) == (SOURCE, 2, 41)
    assert (origin.redrive_count, origin.delivered) == (1, frozenset({0, 2}))


def test_resolution_entries_round_trip_and_anything_else_is_ignored() -> None:
    outcome = Outcome((DLQ, 3, 99), "dead-lettered", 1_764_000_000.5, 2, 3, 1, "deliver: order HTTP 400 x")
    key, value = resolution.encode(outcome)
    assert key == b"3:99"
    assert resolution.decode(value) == outcome
    for garbage in (
        None,
        b"",
        b"not json",
        b"[]",
        b'{"topic": 1}',
        orjson.dumps({**orjson.loads(value), "outcome": "?"}),
    ):
        assert resolution.decode(garbage) is None


# --- inspect's table --------------------------------------------------------------------------------


def letter(offset: int, headers: dict[str, str]) -> DeadLetter:
    return DeadLetter(DLQ, 0, offset, headers)


def table(found: Found) -> str:
    # A console that would interpret markup and emoji codes in strings: the table must not give it any.
    out = io.StringIO()
    render(found, Console(file=out, width=400), now=datetime(2026, 11, 30, 10, tzinfo=UTC), sources={SOURCE})
    return out.getvalue()


def test_inspect_prints_every_value_as_it_is_never_as_markup() -> None:
    tricky = letter_headers(
        stage="[bold]deliver",
        method="[abc]",
        error_message="shop '[/x]' is not configured :thumbs_up: [link=http://x]y[/link]",
        source_topic="[red]t",
    )
    shown = table(Found(1, [letter(0, tricky)]))
    for text in (
        "[bold]deliver",
        "[abc]",
        "shop '[/x]' is not configured :thumbs_up: [link=http://x]y[/link]",
        "[red]t[2]@41",
    ):
        assert text in shown, text


def test_inspect_shows_state_calls_headerless_records_and_copies_under_their_original() -> None:
    copy_headers = letter_headers(redrive_count="1", redrive_from_partition="0", redrive_from_offset="1")
    found = Found(
        4,
        [letter(0, letter_headers()), letter(1, letter_headers()), letter(2, {}), letter(3, copy_headers)],
        resolutions={
            (DLQ, 0): {
                0: Outcome(
                    (DLQ, 0, 0), "delivered", datetime(2026, 11, 30, 9, 30, tzinfo=UTC).timestamp(), 1, 1, 0
                ),
                1: Outcome(
                    (DLQ, 0, 1),
                    "dead-lettered",
                    datetime(2026, 11, 30, 9, 31, tzinfo=UTC).timestamp(),
                    1,
                    1,
                    1,
                    "x",
                ),
            }
        },
        states={"pending": 1, "re-driven": 2, "unredrivable": 1},
    )
    rows = [line for line in table(found).splitlines() if f"{DLQ}[0]@" in line]
    assert [row.split("│")[1].strip() for row in rows] == [
        f"{DLQ}[0]@0",
        f"{DLQ}[0]@1",
        f"↳ {DLQ}[0]@3",
        f"{DLQ}[0]@2",
    ]
    assert "re-driven 2026-11-30 09:30:00Z: delivered" in rows[0]
    assert "failed #1 order HTTP 400; delivered #0 #2" in rows[0]
    assert "re-driven 2026-11-30 09:31:00Z: dead-lettered again, see @3" in rows[1]
    assert "pending (re-drive 1)" in rows[2]
    assert "no rr.dlq headers" in rows[3]
    assert "[]@" not in rows[3]
    assert "cannot be re-driven" in rows[3]


# --- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--status", "abc"], "not an HTTP status (100-599): 'abc'"),
        (["--status", "99"], "not an HTTP status (100-599): '99'"),
        (["--status", "600"], "not an HTTP status"),
        (["--max-redrives", "0"], "must be at least 1"),
        (["--since", "2026-11-30T10:00:00"], "give a UTC offset"),
    ],
)
def test_every_option_is_validated(args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["dlq", "redrive", "--config", "relay.toml", *args])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_since_must_come_before_until(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(
        [
            "dlq",
            "inspect",
            "--config",
            "relay.toml",
            "--since",
            "2026-11-30T10:00:00Z",
            "--until",
            "2026-11-30T09:00:00Z",
        ]
    )
    assert status == 2
    assert "--since must be before --until" in capsys.readouterr().err


def test_a_failed_run_never_prints_a_success_line() -> None:
    plan = RedrivePlan(redriven=5, delivered=2, dead_lettered=1, current=(DLQ, 0, 9))
    out = io.StringIO()
    report(plan, Console(file=out, width=300), status=1, unrecorded=0, logs=[f"{DLQ}.resolved"])
    text = out.getvalue()
    assert "re-drive failed" in text
    assert f"the last record read {DLQ}[0]@9" in text
    assert "2 unfinished" in text
    assert "re-driven 5 (" not in text
    out = io.StringIO()
    report(
        RedrivePlan(redriven=1, delivered=1), Console(file=out, width=300), status=0, unrecorded=1, logs=["x"]
    )
    assert "re-drive failed" in out.getvalue()
    assert "1 outcome(s) could not be written to x" in out.getvalue()


def test_the_ledger_says_when_every_record_up_to_the_end_was_tracked() -> None:
    from consumer.ledger import OffsetLedger

    settled: list[int] = []
    ledger = OffsetLedger(on_settled=lambda r: settled.append(r.offset))
    ledger.assign((DLQ, 0), 1)
    records = [record(offset)[0] for offset in (5, 6, 7)]
    assert not ledger.tracked_up_to({(DLQ, 0): 8})
    ledger.track(records[:2])
    assert not ledger.tracked_up_to({(DLQ, 0): 8})
    ledger.track(records[2:])
    assert ledger.tracked_up_to({(DLQ, 0): 8})
    ledger.settle(records[1])  # out of order: 5 is still in flight (a suspect, say)
    ledger.settle(records[2])
    assert ledger.tracked_up_to({(DLQ, 0): 8})
    assert settled == [6, 7]
    assert not ledger.tracked_up_to({(DLQ, 0): 8, (DLQ, 1): 1}), "a partition not assigned is not read"


def test_a_run_stopped_before_the_end_is_not_a_success() -> None:
    out = io.StringIO()
    plan = RedrivePlan(redriven=3, delivered=1)
    report(plan, Console(file=out, width=300), status=0, unrecorded=0, logs=["x"], complete=False)
    assert "re-drive failed: it was stopped before the end" in out.getvalue()
    assert "2 unfinished" in out.getvalue()
    assert "re-driven 3 (" not in out.getvalue()


def test_a_redrive_of_a_source_topic_not_configured_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "relay.toml",
        bootstrap="127.0.0.1:9",
        topics=[SOURCE],
        group="g",
        emulator_url="http://127.0.0.1:9/1.0/",
        registry_url="http://127.0.0.1:9",
    )
    for shop, (_, key) in SHOPS.items():
        monkeypatch.setenv(f"RR_API_KEY_{shop.upper()}", key)
    assert cli.main(["dlq", "redrive", "--config", str(config), "--source-topic", "orders.legacy"]) == 2
    err = capsys.readouterr().err
    assert "--source-topic 'orders.legacy' is not a topic of this configuration" in err
    assert all(key not in err for _, key in SHOPS.values())
