"""What the benchmark's child programs share: the relay's configuration, read the relay's way.

A child takes ``--config`` (the relay's TOML file for the run) and builds its decoders, translator and URLs
from it exactly as the relay does, so that a comparison differs only in what it is meant to compare. A child
that measures itself prints one ``BENCH-RESULT {json}`` line; the harness finds it in the child's log.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Final

import orjson
from yarl import URL

from consumer.config import RelayConfig, load
from consumer.contract import BATCH_METHOD, SINGLE_METHODS
from consumer.decode import build_decoders
from consumer.translate import Translator

RESULT_PREFIX: Final = "BENCH-RESULT "
#: No child runs longer than this unless told: every loop of the benchmark is bounded in time.
DEFAULT_DEADLINE_S: Final = 300.0


def parser(description: str) -> argparse.ArgumentParser:
    arguments = argparse.ArgumentParser(description=description)
    arguments.add_argument("--config", type=Path, required=True, help="the relay's TOML file for this run")
    arguments.add_argument(
        "--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="stop after this long"
    )
    return arguments


class Setup:
    """The relay's configuration and what a child builds from it."""

    def __init__(self, path: Path) -> None:
        self.config: RelayConfig = load(path)
        settings = self.config.settings
        self.topic = settings.topics[0].name
        self.bootstrap = settings.kafka.bootstrap_servers
        self.group = settings.kafka.group_id
        self.decoder = build_decoders(self.config)[self.topic]
        self.translator = Translator(self.config.shops, settings.delivery.default_shop)
        base = URL(settings.tracking.base_url)
        self.urls: dict[tuple[str, str], URL] = {}
        for key, shop in self.config.shops.items():
            query = {"apiKey": shop.api_key.get_secret_value(), "partnerId": shop.partner_id}
            for method in (*SINGLE_METHODS, BATCH_METHOD):
                self.urls[key, method] = (base / method).with_query(query)


def report(**values: Any) -> None:
    """Print the child's measurement for the harness."""
    sys.stdout.write(RESULT_PREFIX + orjson.dumps(values).decode() + "\n")
    sys.stdout.flush()


def read_result(log_text: str) -> dict[str, Any] | None:
    """The last result a child printed, or ``None``."""
    for line in reversed(log_text.splitlines()):
        if line.startswith(RESULT_PREFIX):
            found: dict[str, Any] = orjson.loads(line.removeprefix(RESULT_PREFIX))
            return found
    return None
