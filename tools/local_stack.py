"""``make run``: the whole relay on one machine, no Docker.

Starts, in order: a local Kafka broker (or uses ``KAFKA_BOOTSTRAP_SERVERS``), the topics, a real Schema
Registry (Apicurio Registry's Confluent-compatible API, see ``tools.registry_local``; or uses
``SCHEMA_REGISTRY_URL``), the tracking API emulator (standing in for Retail Rocket), the relay itself as its
own process with ``config.example.toml``, and a generator of realistic shop traffic. Every few seconds it
prints what the emulator has received, by method. Ctrl-C (or ``--until-delivered N``) stops everything in
reverse order; the relay gets SIGTERM and drains, so the exit is clean.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from consumer_dev.emulator import EmulatorShop, EmulatorThread
from consumer_dev.sample_producer import produce_sample
from tools import kafka_local, registry_local

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "shop.events"
DEMO_KEY = "local-demo-key"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=300.0, help="generated events per second")
    parser.add_argument(
        "--until-delivered",
        type=int,
        metavar="N",
        help="stop once the emulator accepted N events (default: run until Ctrl-C)",
    )
    parser.add_argument("--report-every", type=float, default=5.0, help="seconds between status lines")
    parser.add_argument("--config", type=Path, default=ROOT / "config.example.toml")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with kafka_local.running() as bootstrap:
        _say(f"kafka broker at {bootstrap}")
        _create_topics(bootstrap)
        with (
            registry_local.running() as registry_url,
            EmulatorThread([EmulatorShop("demo", DEMO_KEY)]) as emulator,
        ):
            _say(f"schema registry at {registry_url}; tracking API emulator at {emulator.url}")
            relay = _start_relay(args.config, bootstrap, registry_url, emulator.url)
            producer = threading.Thread(
                target=produce_sample,
                name="sample-producer",
                daemon=True,
                kwargs={
                    "bootstrap": bootstrap,
                    "topic": TOPIC,
                    "count": None,
                    "rate": args.rate,
                    "registry_url": registry_url,
                    "should_stop": stop.is_set,
                },
            )
            producer.start()
            _say(f"producing about {args.rate:.0f} events/s to {TOPIC}; Ctrl-C stops the stack")
            status = _watch(emulator, relay, stop, args)
            stop.set()
            producer.join(30)
            _say("stopping the relay (SIGTERM: it drains and commits)")
            if relay.poll() is None:
                relay.send_signal(signal.SIGTERM)
            code = relay.wait(60)
            _say(f"relay exited with status {code}; {_summary(emulator)}")
    return status if status else code


def _create_topics(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        existing = admin.list_topics(timeout=10).topics
        wanted = [
            NewTopic(name, num_partitions=parts, replication_factor=1)
            for name, parts in ((TOPIC, 6), (f"{TOPIC}.dlq", 1))
            if name not in existing
        ]
        for future in admin.create_topics(wanted).values() if wanted else ():
            future.result(timeout=30)
    finally:
        del admin  # destroyed now, while the broker is up (it has no close())


def _start_relay(
    config: Path, bootstrap: str, registry_url: str, emulator_url: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RR_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "RR_SCHEMA_REGISTRY__URL": registry_url,
        "RR_TRACKING__BASE_URL": emulator_url,
        "RR_API_KEY_DEMO": DEMO_KEY,
    }
    # The relay's own log lines go straight to this terminal.
    return subprocess.Popen(
        [sys.executable, "-m", "consumer", "run", "--config", str(config)], env=env, start_new_session=True
    )  # Ctrl-C reaches us; we hand the relay a SIGTERM


def _watch(
    emulator: EmulatorThread, relay: subprocess.Popen[bytes], stop: threading.Event, args: argparse.Namespace
) -> int:
    """Print what was delivered every few seconds; return non-zero if the relay died on its own."""
    next_report = time.monotonic() + args.report_every
    while not stop.wait(0.2):
        if relay.poll() is not None:
            _say(f"the relay exited unexpectedly with status {relay.returncode}")
            return relay.returncode or 1
        accepted = emulator.counters["events_accepted"]
        if args.until_delivered is not None and accepted >= args.until_delivered:
            return 0
        if time.monotonic() >= next_report:
            next_report += args.report_every
            _say(_summary(emulator))
    return 0


def _summary(emulator: EmulatorThread) -> str:
    counters = emulator.counters
    by_method: dict[str, int] = {}
    for event in emulator.events()[-5000:]:
        by_method[event["method"]] = by_method.get(event["method"], 0) + 1
    mix = ", ".join(f"{method} {count}" for method, count in sorted(by_method.items(), key=lambda kv: -kv[1]))
    requests = sum(sum(statuses.values()) for statuses in counters["requests"].values())
    return (
        f"delivered to the emulator: {counters['events_accepted']} events in {requests} requests"
        f" (last 5000 by method: {mix or 'none yet'})"
    )


def _say(text: str) -> None:
    print(f"[make run] {text}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
