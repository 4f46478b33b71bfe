"""The ``rr-consumer`` command line.

Each subcommand is registered by a small ``_add_*`` function and runs through ``args.handler``; the heavy
modules are imported inside the handlers so ``--help`` stays fast.

The development commands (``emulator``, ``produce-sample``) are not part of this package: the
``rr-consumer-dev`` distribution (``dev/`` in the repository) registers them under the
``rr_consumer.commands`` entry points, which :func:`build_parser` loads by group, never by a module name, so
the runtime imports nothing of the development tools. Where they are not installed, each of those commands
still parses (with any arguments) and answers with one line saying where it comes from, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Final, TypeAlias

from consumer import __version__

Handler = Callable[[argparse.Namespace], int]
#: The object ``add_subparsers`` returns (generic only to type checkers, hence the string).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: The entry point group through which another distribution adds subcommands (a function taking ``Commands``).
COMMANDS_GROUP: Final = "rr_consumer.commands"
#: The commands that come with ``rr-consumer-dev``, named so their absence can be explained.
DEV_COMMANDS: Final = {"emulator": "the tracking API emulator", "produce-sample": "realistic shop traffic"}
#: Where the development commands come from, for the line printed when they are missing.
DEV_HINT: Final = (
    "it comes with the development tools, which this installation lacks: install rr-consumer-dev "
    "(from a checkout: pip install -e ./dev; make venv does)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rr-consumer",
        description="Consume shop domain events from Kafka and deliver them to Retail Rocket's tracking API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  rr-consumer run --config config.example.toml\n"
        "  rr-consumer config check --config config.example.toml\n",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_run, _add_config, _add_replay, _add_dlq):
        add(commands)
    _add_plugin_commands(commands)
    return parser


def _add_plugin_commands(commands: Commands) -> None:
    """The commands other installed distributions declare; a stand-in for each missing development one."""
    added = set()
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda entry: entry.name):
        add: Callable[[Commands], None] = entry.load()
        add(commands)
        added.add(entry.name)
    for name, what in DEV_COMMANDS.items():
        if name not in added:
            _add_missing(commands, name, what)


def _add_missing(commands: Commands, name: str, what: str) -> None:
    """``name`` as a command that only says where it comes from (whatever arguments it is given)."""
    parser = commands.add_parser(
        name,
        help=f"{what} (development tools: not installed)",
        description=f"rr-consumer {name}: {DEV_HINT}.",
    )

    def run(args: argparse.Namespace) -> int:
        print(f"rr-consumer: {name}: {DEV_HINT}", file=sys.stderr)
        return 2

    # Whatever options follow are the missing command's: main() lets them pass rather than call them errors.
    parser.set_defaults(handler=run, any_arguments=True)


def _add_run(commands: Commands) -> None:
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


def _add_config(commands: Commands) -> None:
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
        from consumer import clients, preflight

        checks = preflight.run_checks(
            loaded, admin_config=clients.kafka_client_config(loaded.settings), create=False
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


def _add_replay(commands: Commands) -> None:
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
        "partition, broker error), 2 bad arguments or configuration, or no broker answering",
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
        from consumer import clients, logs, replay

        loaded = None
        if args.config is not None:
            from consumer import config

            loaded = _load_config(config, args.config, secrets=False)  # replay never calls the API
            if loaded is None:
                return 2
        # librdkafka's lines go to the JSON log on stderr, apart from the plan on stdout
        logs.configure(_tool_log_level(None if loaded is None else loaded.observability.log_level), "json")
        try:
            return replay.run_command(args, loaded)
        finally:
            clients.flush_tool_logs()

    parser.set_defaults(handler=run)


def _add_dlq(commands: Commands) -> None:
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

        from consumer import clients, config, dlq, logs, preflight
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
        # The log (librdkafka's lines, a re-drive's warnings) is JSON on stderr, apart from the table.
        observability = settings.observability
        logs.configure(
            _tool_log_level(observability.log_level),
            "json",
            secrets=[]
            if args.action == "inspect"
            else [shop.api_key.get_secret_value() for shop in loaded.shops.values()],
        )
        try:
            preflight.require_brokers(
                clients.kafka_client_config(settings),
                settings.kafka.bootstrap_servers,
                settings.kafka.connect_timeout_s,
            )
            topics = dlq.dead_letter_topics(settings, args.topic)
            if args.action == "inspect":
                found = dlq.read_dead_letters(settings, topics, filters, keep=args.limit, states=args.state)
                dlq.render(found, console, sources=sources)
                return 0
            plan = RedrivePlan(filters=filters, max_redrives=args.max_redrives)
            return dlq.run_redrive(loaded, topics, plan, from_beginning=args.from_beginning, console=console)
        except ConfigError as error:
            print(f"rr-consumer: {error}", file=sys.stderr)
            return 2
        except KafkaException as error:
            print(f"rr-consumer: Kafka: {error}", file=sys.stderr)
            return 1
        finally:
            clients.flush_tool_logs()

    inspect.set_defaults(handler=run)
    redrive.set_defaults(handler=run)


def _tool_log_level(configured: str | None) -> str:
    """A tool logs warnings and worse unless the configuration asks for more detail than ``info``."""
    return "warning" if configured in (None, "info") else configured


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
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        args = parser.parse_args(argv)  # the usual one-line error on the arguments nothing knows
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
