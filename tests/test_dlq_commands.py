"""`rr-consumer dlq inspect` and `dlq redrive`, end to end: the recovery runbook's second half."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from consumer.decode import registry_client
from consumer.emulator import EmulatorShop, EmulatorThread, Faults
from consumer.sample import build_encoder
from tests.kafka import Topics, end_offsets, produce, unique_name
from tests.relay import ROOT, SHOPS, RelayProcess, canonical, dead_letters, event, relay_env, write_config
from tools.registry_double import RegistryDouble

REJECTED_ORDER_ITEM = 11
REJECTED_VIEW = 77


def rr(*args: str, keys: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI; ``keys=False`` leaves the shops' API keys out of its environment."""
    env = relay_env()
    if not keys:
        env = {name: value for name, value in env.items() if not name.startswith("RR_API_KEY_")}
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def calls_at(emulator: EmulatorThread) -> list[tuple[str, dict[str, Any]]]:
    return [(e["method"], e["body"]) for e in emulator.events()]


def test_inspect_shows_the_story_and_redrive_sends_only_what_failed_with_a_loop_guard(
    kafka_bootstrap: str,
    topics: Topics,
    registry: RegistryDouble,
    tmp_path: Path,
) -> None:
    encoder = build_encoder("confluent-avro", registry=registry_client(registry.url))
    order = event(
        "OrderPlaced",
        orderId="o-7",
        sessionId="buyer1",
        lines=[
            {"productId": 10, "quantity": 1, "unitPrice": Decimal("3.00")},
            {"productId": REJECTED_ORDER_ITEM, "quantity": 2, "unitPrice": Decimal("4.50")},
            {"productId": 12, "quantity": 1, "unitPrice": Decimal("1.00")},
        ],
    )
    view = event("ProductViewed", productId=REJECTED_VIEW, groupId=None, sessionId="viewer1")
    fine = event("ProductViewed", productId=5, groupId=None, sessionId="viewer2")
    records = [
        (b"buyer1", encoder.encode("OrderPlaced", order)),
        (b"viewer1", encoder.encode("ProductViewed", view)),
        (b"broken", b"\x00\x00\x00\x00"),  # never decodable: it can only fail again
        (b"viewer2", encoder.encode("ProductViewed", fine)),
    ]
    topic = topics.create("dlqcmd")
    dlq = topics.create_named(f"{topic}.dlq")
    produce(kafka_bootstrap, topic, records)
    shops = [EmulatorShop(partner_id=pid, api_key=key) for pid, key in SHOPS.values()]
    with EmulatorThread(shops, Faults(reject_product_ids=(REJECTED_ORDER_ITEM, REJECTED_VIEW))) as emulator:
        config = write_config(
            tmp_path / "relay.toml",
            bootstrap=kafka_bootstrap,
            topics=[topic],
            group=unique_name("group"),
            emulator_url=emulator.url,
            registry_url=registry.url,
        )
        relay = RelayProcess(config=config, log=tmp_path / "relay.log").start()
        try:
            dead_letters(kafka_bootstrap, dlq, 3)
            assert relay.terminate() == 0
        finally:
            relay.cleanup()
        first_pass = calls_at(emulator)
        assert sorted(body["productId"] for _, body in first_pass) == [5, 10, 12]

        # Inspect: one row per dead-lettered record, with stage, status and source. It reads Kafka only,
        # so it needs no shop's API key.
        shown = rr("dlq", "inspect", "--config", str(config), keys=False)
        assert shown.returncode == 0, shown.stderr
        assert "3 dead-lettered record(s)" in shown.stdout
        for needle in (f"{topic}[0]@0", f"{topic}[0]@1", f"{topic}[0]@2", "deliver", "decode", "400"):
            assert needle in shown.stdout, needle
        only_decode = rr("dlq", "inspect", "--config", str(config), "--stage", "decode")
        assert "1 dead-lettered record(s)" in only_decode.stdout
        # --limit keeps the last rows (the rest are counted, not held) and says how many matched.
        last_two = rr("dlq", "inspect", "--config", str(config), "--limit", "2", keys=False)
        assert "the last 2 of 3 dead-lettered record(s)" in last_two.stdout
        assert f"{topic}.dlq[0]@0" not in last_two.stdout
        assert f"{topic}.dlq[0]@1" in last_two.stdout
        assert f"{topic}.dlq[0]@2" in last_two.stdout

        # The cause is fixed: the API takes those products now. Re-drive.
        emulator.set_faults(Faults())
        emulator.reset()
        redriven = rr("dlq", "redrive", "--config", str(config))
        assert redriven.returncode == 0, redriven.stderr[-3000:]
        second_pass = calls_at(emulator)
        # Only what failed: the order's rejected item (not its two delivered ones) and the view.
        assert sorted((m, body["productId"]) for m, body in second_pass) == [
            ("order", REJECTED_ORDER_ITEM),
            ("view", REJECTED_VIEW),
        ]
        item = next(body for m, body in second_pass if m == "order")
        assert canonical(item) == canonical({**item, "quantity": 2, "price": 4.5, "transaction": "o-7"})

        # The undecodable record failed again: dead-lettered again, counted, with its original source.
        letters = dead_letters(kafka_bootstrap, dlq, 4)
        again = letters[3]["headers"]
        assert again["rr.dlq.redrive.count"] == "1"
        assert again["rr.dlq.source.topic"] == topic
        assert again["rr.dlq.source.offset"] == "2"
        assert list(letters[3]["headers"]).count("rr.dlq.stage") == 1

        # Resumable: a second run picks up only what is new (the re-dead-lettered record), and fails it again.
        assert rr("dlq", "redrive", "--config", str(config)).returncode == 0
        assert end_offsets(kafka_bootstrap, dlq, 1) == {0: 5}
        # The loop guard: at the limit, the record is left alone, not dead-lettered a third time.
        guarded = rr("dlq", "redrive", "--config", str(config), "--max-redrives", "2")
        assert guarded.returncode == 0, guarded.stderr[-2000:]
        assert "1 by the loop guard" in guarded.stderr
        assert end_offsets(kafka_bootstrap, dlq, 1) == {0: 5}
        assert len(calls_at(emulator)) == 2, "nothing was sent twice by the later runs"
        counts = [
            orjson.loads(letter["headers"].get("rr.dlq.redrive.count", "0"))
            for letter in dead_letters(kafka_bootstrap, dlq, 5)
        ]
        assert counts == [0, 0, 0, 1, 2]


def test_redrive_with_nothing_to_do_says_so_and_a_missing_key_is_named(
    kafka_bootstrap: str,
    topics: Topics,
    registry: RegistryDouble,
    tmp_path: Path,
) -> None:
    topic = topics.create("nothing")
    topics.create_named(f"{topic}.dlq")
    config = write_config(
        tmp_path / "relay.toml",
        bootstrap=kafka_bootstrap,
        topics=[topic],
        group=unique_name("group"),
        emulator_url="http://127.0.0.1:9/1.0/",
        registry_url=registry.url,
    )
    result = rr("dlq", "redrive", "--config", str(config))
    assert result.returncode == 0
    assert "nothing to re-drive" in result.stderr
    missing = rr("dlq", "inspect", "--config", str(config), "--topic", "no-such.dlq")
    assert missing.returncode == 2
    assert "no-such.dlq" in missing.stderr
    # A re-drive delivers, so it does need the keys, and says which one is missing.
    keyless = rr("dlq", "redrive", "--config", str(config), keys=False)
    assert keyless.returncode == 2
    assert "api_key_env" in keyless.stderr
    assert "RR_API_KEY_" in keyless.stderr
