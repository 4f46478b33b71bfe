"""The ``rr-consumer`` command line.

Each subcommand is registered by a small ``_add_*`` function and runs through ``args.handler``; the heavy
modules are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from consumer import __version__

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rr-consumer",
        description="Consume shop domain events from Kafka and deliver them to Retail Rocket's tracking API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  rr-consumer run --config config.example.toml\n"
        "  rr-consumer emulator --port 8080\n",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_run, _add_config, _add_emulator, _add_produce_sample, _add_replay, _add_dlq):
        add(commands)
    return parser


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "run",
        help="run the relay: consume, translate, deliver, commit",
        description="Join the consumer group and deliver every event to the tracking API until SIGTERM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  RR_API_KEY_DEMO=... rr-consumer run --config config.example.toml\n"
        "  RR_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 rr-consumer run --config /etc/rr/relay.toml\n\n"
        "exit status: 0 after a clean stop, 1 on an error, 2 on a bad configuration,\n"
        "3 when the dead-letter guard halted the service",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML configuration (RR_* variables override it)"
    )

    def run(args: argparse.Namespace) -> int:
        from consumer import config, logs, service

        settings = _load_config(config, args.config)
        if settings is None:
            return 2
        observability = settings.settings.observability
        logs.configure(
            observability.log_level,
            observability.log_format,
            secrets=[shop.api_key.get_secret_value() for shop in settings.shops.values()],
        )
        return service.run(settings)

    parser.set_defaults(handler=run)


def _add_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "config",
        help="check a configuration",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  RR_API_KEY_DEMO=... rr-consumer config check --config config.example.toml",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="validate the configuration, print it (secrets masked), check the parts around the relay",
        description="Validate the configuration and print it with secrets masked, then check what `run` "
        "checks before it starts: a broker answers at kafka.bootstrap_servers, every topic and dead-letter "
        "topic exists (or is created, with dead_letter.create_topics), the schema registry answers. No "
        "tracking call is sent. Exit status 0 when everything holds, 2 otherwise.",
        epilog="examples:\n  rr-consumer config check --config config.example.toml\n"
        "  rr-consumer config check --config config.example.toml --offline   # no network",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML configuration (RR_* variables override it)"
    )
    check.add_argument(
        "--offline",
        action="store_true",
        help="check the configuration only; skip the brokers, topics and schema registry",
    )

    def run(args: argparse.Namespace) -> int:
        from consumer import config

        loaded = _load_config(config, args.config)
        if loaded is None:
            return 2
        print(config.describe(loaded))
        print("ok   configuration: valid (URLs, settings, API keys resolved)")
        if args.offline:
            print("skipped: brokers, topics, dead-letter topics, schema registry (--offline)")
            return 0
        from consumer import preflight, service

        checks = preflight.run_checks(
            loaded, admin_config=service.kafka_client_config(loaded.settings), create=False
        )
        for line in (check.line() for check in checks):
            print(line)
        return 0 if preflight.first_failure(checks) is None else 2

    check.set_defaults(handler=run)


def _load_config(config: Any, path: Path | None, *, secrets: bool = True) -> Any:
    """Load the configuration, or print one clear line naming the setting and return None.

    ``secrets=False``: only the settings (``config.load_settings``), for commands that never call the API.
    """
    from consumer.errors import ConfigError

    try:
        return config.load(path) if secrets else config.load_settings(path)
    except ConfigError as error:
        print(f"rr-consumer: configuration error: {error}", file=sys.stderr)
        return None


def _add_emulator(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``rr-consumer emulator``: the tracking API stand-in (consumer.emulator, imported only to run it).

    The options are declared here rather than in consumer.emulator because importing that module loads
    aiohttp's server, which would make every ``--help`` slow.
    """
    parser = commands.add_parser(
        "emulator",
        help="run the tracking API emulator",
        description="Serve the Retail Rocket tracking API contract on /1.0/ and an admin API on /_emulator/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  rr-consumer emulator --port 8080 --shop demo:demo-key\n"
        "  rr-consumer emulator --port 8080 --shop demo:env:RR_API_KEY_DEMO --latency-ms 100 \\\n"
        "      --error-rate 0.01\n"
        "  curl -s localhost:8080/_emulator/counters",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8080, help="port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--shop",
        action="append",
        metavar="PARTNER_ID:API_KEY",
        help="a known shop (repeatable); API_KEY may be env:NAME to read it from the environment; "
        "without --shop or --shops-file one shop partnerId=demo apiKey=demo-key is known",
    )
    parser.add_argument(
        "--shops-file",
        metavar="FILE",
        help='JSON array of {"partner_id", "api_key", "disabled", "rate_limit"} objects',
    )
    parser.add_argument(
        "--disabled", action="append", metavar="PARTNER_ID", help="answer this shop 403 (repeatable)"
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        metavar="PER_SECOND",
        help="answer 429 above this many requests/s per shop, for shops without their own (default: off)",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay every call by this much")
    parser.add_argument(
        "--latency-jitter-ms", type=float, default=0.0, help="plus a uniform random delay up to this much"
    )
    parser.add_argument(
        "--error-rate", type=float, default=0.0, help="share (0-1) of calls answered --error-status"
    )
    parser.add_argument("--error-status", type=int, default=503, help="(default: %(default)s)")
    parser.add_argument(
        "--outage",
        choices=("none", "503", "refuse", "reset"),
        default="none",
        help="start in an outage: every call 503, connections refused, or connections reset",
    )
    parser.add_argument("--outage-seconds", type=float, help="end the starting outage after this long")
    parser.add_argument("--retry-after", type=float, help="Retry-After seconds on injected errors")
    parser.add_argument(
        "--max-events",
        type=int,
        metavar="N",
        help="keep only about the last N accepted events for the admin API (0: count only; default: all)",
    )

    def run(args: argparse.Namespace) -> int:
        from consumer import emulator

        return emulator.run_command(args)

    parser.set_defaults(handler=run)


def _add_produce_sample(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "produce-sample",
        help="produce realistic shop traffic to a topic",
        description="Produce generated shop events (views, searches, category views, basket adds, orders, "
        "in the mix of Retail Rocket's public e-commerce data set), keyed by visitor.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  rr-consumer produce-sample --topic shop.events --registry-url http://127.0.0.1:8081 --rate 200\n"
        "  rr-consumer produce-sample --topic shop.json --format json --count 10000",
    )
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="(default: %(default)s)")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--format", choices=("confluent-avro", "avro", "json"), default="confluent-avro")
    parser.add_argument("--registry-url", help="schema registry, for --format confluent-avro")
    parser.add_argument("--count", type=int, help="stop after this many events (default: run until Ctrl-C)")
    parser.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    parser.add_argument("--shop", action="append", help="shop id of the events (repeatable; default: demo)")
    parser.add_argument(
        "--visitors", type=int, default=100_000, help="distinct visitors (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        from consumer.sample_producer import produce_sample

        if args.format == "confluent-avro" and not args.registry_url:
            print(
                "rr-consumer: produce-sample: --format confluent-avro needs --registry-url", file=sys.stderr
            )
            return 2
        try:
            produced = produce_sample(
                args.bootstrap_servers,
                args.topic,
                count=args.count,
                rate=args.rate,
                fmt=args.format,
                registry_url=args.registry_url,
                shops=args.shop or ["demo"],
                seed=args.seed,
                visitors=args.visitors,
            )
        except KeyboardInterrupt:
            return 0
        print(f"produced {produced} events to {args.topic}")
        return 0

    parser.set_defaults(handler=run)


def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``rr-consumer replay``: move the group's committed offsets (consumer.replay, imported to run it)."""
    parser = commands.add_parser(
        "replay",
        help="rewind (or fast-forward) the relay's consumer group, for recovery",
        description="Print a plan (committed offset, target and records to replay per partition), then "
        "commit the targets for the group. Refused while the group has active members: stop the relay "
        "first, replay, start it again.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  rr-consumer replay --config relay.toml --to-time 2026-11-30T10:00:00+00:00 --dry-run\n"
        "  rr-consumer replay --config relay.toml --to-time 2026-11-30T10:00:00+00:00\n"
        "  rr-consumer replay --config relay.toml --topic shop.events --partition 3 --to-earliest\n"
        "  rr-consumer replay --bootstrap-servers kafka:9092 --group rr-relay --topic shop.events \\\n"
        "      --to-offset 0:1500 --to-offset 1:1320\n"
        "  rr-consumer replay --config relay.toml --to-latest        # skip the backlog\n\n"
        "exit status: 0 applied (or dry run), 1 refused or failed (active members, unknown topic or\n"
        "partition, broker error), 2 bad arguments or configuration",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the relay's TOML configuration: bootstrap servers, group id, client settings, topics",
    )
    parser.add_argument("--bootstrap-servers", metavar="HOSTS", help="Kafka (overrides the configuration)")
    parser.add_argument("--group", metavar="GROUP", help="consumer group (overrides the configuration)")
    parser.add_argument(
        "--topic",
        action="append",
        metavar="TOPIC",
        help="topic to move (repeatable; default: every topic in the configuration)",
    )
    parser.add_argument(
        "--partition",
        action="append",
        type=int,
        metavar="N",
        help="partition to move (repeatable; default: all)",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-earliest", action="store_true", help="to the first record still held")
    target.add_argument("--to-latest", action="store_true", help="to the end: skip what is not consumed yet")
    target.add_argument(
        "--to-time",
        metavar="ISO8601",
        help="to the first record at or after this time, with a UTC offset (e.g. 2026-11-30T10:00:00+00:00); "
        "partitions with no such record go to their end",
    )
    target.add_argument(
        "--to-offset",
        action="append",
        metavar="P:OFFSET",
        help="partition P to OFFSET (repeatable; needs exactly one --topic)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="per broker request (default: %(default)s)",
    )

    def run(args: argparse.Namespace) -> int:
        from consumer import replay

        loaded = None
        if args.config is not None:
            from consumer import config

            loaded = _load_config(config, args.config, secrets=False)  # replay never calls the API
            if loaded is None:
                return 2
        return replay.run_command(args, loaded)

    parser.set_defaults(handler=run)


def _add_dlq(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "dlq",
        help="inspect or re-drive dead-lettered records",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  rr-consumer dlq inspect --config relay.toml --stage deliver\n"
        "  rr-consumer dlq redrive --config relay.toml --status 401",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = actions.add_parser(
        "inspect",
        help="a table of dead-lettered records and the state of each",
        description="One row per dead-lettered record: source, stage, status, method, reason, the calls\n"
        "that failed and were delivered, age, and state: pending, re-driven (when, delivered or\n"
        "dead-lettered again), or why it cannot be re-driven. A copy that a re-drive dead-lettered\n"
        "again is shown under the record it came from. Reads Kafka only: needs no API key.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  rr-consumer dlq inspect --config relay.toml\n"
        "  rr-consumer dlq inspect --config relay.toml --state pending\n"
        "  rr-consumer dlq inspect --config relay.toml --stage deliver --status 401 \\\n"
        "      --since 2026-11-30T00:00:00Z",
    )
    redrive = actions.add_parser(
        "redrive",
        help="send dead-lettered records through the pipeline again",
        description="Re-process dead-lettered records after the cause is fixed. Only the calls that failed\n"
        "are sent (an order's delivered items are not sent again). Every record read gets one\n"
        "outcome: re-driven (delivered, or dead-lettered again to the same topic with\n"
        "rr.dlq.redrive.count one higher), or passed over: by the filters, by the loop guard\n"
        "(--max-redrives), as re-driven before, or as one that cannot be re-driven (a malformed\n"
        "rr.dlq header, a source topic not in the configuration: one line each, with its\n"
        "coordinates).\n\n"
        "What a run records: the outcome of each record it re-drove, in <dead-letter topic>.resolved\n"
        "(created on first use), and nothing else. A record the filters or the loop guard passed\n"
        "over, or that cannot be re-driven, stays pending: a later run with other filters (or none)\n"
        "takes it. Each run starts at the first record not re-driven yet and ends at the topic's end\n"
        "as of its start; stop it any time and run it again to resume (at-least-once: a record\n"
        "re-driven but not yet recorded is re-driven again). It runs in the consumer group\n"
        "<group_id>.redrive and is refused while another re-drive is running.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  rr-consumer dlq redrive --config relay.toml --status 401\n"
        "  rr-consumer dlq redrive --config relay.toml --stage deliver --since 2026-11-30T09:00:00Z\n\n"
        "exit status: 0 when the run reached the end (records that cannot be re-driven are listed,\n"
        "not fatal), 1 when it failed, 2 on bad arguments or configuration, 3 when the dead-letter\n"
        "guard halted it",
    )
    for sub in (inspect, redrive):
        sub.add_argument("--config", type=Path, metavar="FILE", required=True)
        sub.add_argument(
            "--topic", action="append", default=[], help="dead-letter topic (default: all of them)"
        )
        sub.add_argument("--stage", action="append", default=[], choices=("decode", "translate", "deliver"))
        sub.add_argument(
            "--status",
            action="append",
            default=[],
            type=_http_status,
            metavar="HTTP_STATUS",
            help="HTTP status of the failed call, 100-599 (repeatable)",
        )
        sub.add_argument("--source-topic", action="append", default=[], help="the topic the record came from")
        sub.add_argument("--since", type=_aware_time, help="last failed at or after this ISO 8601 time")
        sub.add_argument("--until", type=_aware_time, help="last failed before this ISO 8601 time")
    inspect.add_argument(
        "--limit", type=_positive_int, default=100, help="rows to show, newest last (default: %(default)s)"
    )
    inspect.add_argument(
        "--state",
        action="append",
        default=[],
        choices=("pending", "re-driven", "unredrivable"),
        help="only records in this state (repeatable)",
    )
    redrive.add_argument(
        "--max-redrives",
        type=_positive_int,
        default=3,
        help="loop guard: leave alone a record re-driven this many times (default: %(default)s)",
    )
    redrive.add_argument(
        "--from-beginning",
        action="store_true",
        help="ignore what earlier runs recorded: records re-driven before go again",
    )

    def run(args: argparse.Namespace) -> int:
        from confluent_kafka import KafkaException
        from rich.console import Console

        from consumer import config, dlq, logs
        from consumer.errors import ConfigError
        from consumer.redrive import RedriveFilter, RedrivePlan

        if args.since is not None and args.until is not None and args.since >= args.until:
            print(f"rr-consumer: dlq {args.action}: --since must be before --until", file=sys.stderr)
            return 2
        # Inspecting reads Kafka only: no shop's API key is needed for it, unlike a re-drive.
        loaded = _load_config(config, args.config, secrets=args.action == "redrive")
        if loaded is None:
            return 2
        settings = loaded if args.action == "inspect" else loaded.settings
        sources = [topic.name for topic in settings.topics]
        unknown = [name for name in args.source_topic if name not in sources]
        if args.action == "redrive" and unknown:
            print(
                f"rr-consumer: dlq redrive: --source-topic {unknown[0]!r} is not a topic of this "
                f"configuration ({sources}): its records cannot be re-driven",
                file=sys.stderr,
            )
            return 2
        filters = RedriveFilter(
            stages=args.stage,
            statuses=args.status,
            source_topics=args.source_topic,
            failed_after=args.since,
            failed_before=args.until,
        )
        stream = sys.stderr if args.action == "redrive" else sys.stdout
        # Piped into a file or a pager, the table keeps whole rows rather than wrapping at 80 columns
        # (unless COLUMNS says how wide). Record data is printed as it is: no markup, no emoji codes.
        console = Console(
            file=stream,
            width=None if stream.isatty() or "COLUMNS" in os.environ else 220,
            markup=False,
            emoji=False,
            highlight=False,
        )
        try:
            topics = dlq.dead_letter_topics(settings, args.topic)
            if args.action == "inspect":
                found = dlq.read_dead_letters(settings, topics, filters, keep=args.limit, states=args.state)
                dlq.render(found, console, sources=sources)
                return 0
            observability = loaded.settings.observability
            logs.configure(
                "warning" if observability.log_level == "info" else observability.log_level,
                "json",
                secrets=[shop.api_key.get_secret_value() for shop in loaded.shops.values()],
            )
            plan = RedrivePlan(filters=filters, max_redrives=args.max_redrives)
            return dlq.run_redrive(loaded, topics, plan, from_beginning=args.from_beginning, console=console)
        except ConfigError as error:
            print(f"rr-consumer: {error}", file=sys.stderr)
            return 2
        except KafkaException as error:
            print(f"rr-consumer: Kafka: {error}", file=sys.stderr)
            return 1

    inspect.set_defaults(handler=run)
    redrive.set_defaults(handler=run)


def _http_status(text: str) -> str:
    """An HTTP status, 100-599, as the text the rr.dlq.http.status header holds."""
    if not text.isascii() or not text.isdigit() or not 100 <= int(text) <= 599:
        raise argparse.ArgumentTypeError(f"not an HTTP status (100-599): {text!r}")
    return str(int(text))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _aware_time(text: str) -> Any:
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a UTC offset or Z: {text!r}")
    return moment


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
