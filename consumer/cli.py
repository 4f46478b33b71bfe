"""The ``rr-consumer`` command line.

Each subcommand is registered by a small ``_add_*`` function and runs through ``args.handler``; the heavy
modules are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from consumer import __version__

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rr-consumer",
        description="Consume shop domain events from Kafka and deliver them to Retail Rocket's tracking API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  rr-consumer run --config config.example.toml\n  rr-consumer emulator --port 8080\n",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_emulator,):
        add(commands)
    return parser


def _add_emulator(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Placeholder wiring; the emulator module owns its options (see consumer.emulator)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
