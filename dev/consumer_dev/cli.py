"""The development commands of ``rr-consumer``: ``emulator`` and ``produce-sample``.

``consumer.cli`` finds them through the ``rr_consumer.commands`` entry points this distribution declares
(``dev/pyproject.toml``), so the runtime package never imports this one: a production install without
``rr-consumer-dev`` simply has no such commands, and says where they come from when one is asked for. Each
entry point is a function that adds one subcommand to the parser.

The options are declared here, apart from the modules that run them, because importing those loads aiohttp's
server and the Kafka clients, which would make every ``--help`` slow.
"""

from __future__ import annotations

import argparse
import sys


def add_emulator(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``rr-consumer emulator``: the tracking API stand-in (consumer_dev.emulator, imported only to run it).

    The options are declared here rather than in consumer_dev.emulator because importing that module loads
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
        from consumer_dev import emulator

        return emulator.run_command(args)

    parser.set_defaults(handler=run)


def add_produce_sample(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        from consumer_dev.sample_producer import produce_sample

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
