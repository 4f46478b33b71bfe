"""The committer against the real broker: what it commits is what the broker holds, and never goes back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient

from consumer.commit import Committer
from tests.kafka import Topics, committed_offsets, unique_name, wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def group() -> str:
    return unique_name("commit")


@pytest.fixture
def client(kafka_bootstrap: str, group: str) -> Iterator[Consumer]:
    consumer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        yield consumer
    finally:
        consumer.close()


def test_a_due_position_is_committed_once_per_interval_and_never_a_lower_one(
    kafka_bootstrap: str, topics: Topics, group: str, client: Consumer
) -> None:
    topic = topics.create("commit", partitions=2)
    tp0, tp1 = (topic, 0), (topic, 1)
    client.assign([KafkaTopicPartition(topic, 0), KafkaTopicPartition(topic, 1)])
    client.pause(client.assignment())  # only commits here: no fetching
    clock = Clock()
    committer = Committer(1.0, clock)
    owned = {tp0: 1, tp1: 1}

    committer.note({tp0: (1, 10)})
    committer.commit_due(client, owned)
    assert committed_offsets(kafka_bootstrap, group, topic, 2) == {0: -1001, 1: -1001}, "not due yet"

    clock.now = 1.0
    committer.commit_due(client, owned)
    wait_for(lambda: committed_offsets(kafka_bootstrap, group, topic, 2) == {0: 10, 1: -1001}, what="10")

    # A lower position of the same generation (however it came) is never committed over a higher one.
    committer.note({tp0: (1, 4), tp1: (1, 3)})
    clock.now = 2.0
    committer.commit_due(client, owned)
    wait_for(lambda: committed_offsets(kafka_bootstrap, group, topic, 2)[1] == 3, what="partition 1 at 3")
    assert committed_offsets(kafka_bootstrap, group, topic, 2) == {0: 10, 1: 3}


def test_a_revokes_final_commit_is_what_the_broker_holds_and_nothing_follows_it(
    kafka_bootstrap: str, topics: Topics, group: str, client: Consumer
) -> None:
    topic = topics.create("final", partitions=1)
    tp = (topic, 0)
    client.assign([KafkaTopicPartition(topic, 0)])
    client.pause(client.assignment())
    clock = Clock()
    committer = Committer(0.5, clock)

    committer.note({tp: (1, 20)})  # settled, taken, not yet committed when the revoke comes
    held = committer.commit_final(client, {tp: (1, 25)})
    assert held == {tp: 25}, "the broker's answer, asked after the synchronous commit"

    # Positions of the revoked generation that arrive late are dropped, even when due.
    committer.note({tp: (1, 30)})
    clock.now = 1.0
    committer.commit_due(client, {tp: 1})
    committer.commit_now(client, {tp: 1})
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 25}

    # The partition comes back (a new generation): its positions are committed again.
    committer.note({tp: (2, 26)})
    committer.commit_now(client, {tp: 2})
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 26}


def test_a_revoke_with_nothing_settled_reports_no_committed_offset(topics: Topics, client: Consumer) -> None:
    topic = topics.create("nothing", partitions=1)
    client.assign([KafkaTopicPartition(topic, 0)])
    client.pause(client.assignment())
    assert Committer(1.0).commit_final(client, {(topic, 0): (1, None)}) == {(topic, 0): None}


def _rewind(kafka_admin: AdminClient, group: str, topic: str, offset: int) -> None:
    """Move the group's offset behind the committer's back: what a commit lost on the way looks like."""
    request = ConsumerGroupTopicPartitions(group, [KafkaTopicPartition(topic, 0, offset)])
    kafka_admin.alter_consumer_group_offsets([request])[group].result(timeout=30)


def test_a_failed_commit_is_due_again_and_a_revoke_commits_its_final_position_whatever_was_sent(
    kafka_bootstrap: str, kafka_admin: AdminClient, topics: Topics, group: str, client: Consumer
) -> None:
    topic = topics.create("lost", partitions=1)
    tp = (topic, 0)
    client.assign([KafkaTopicPartition(topic, 0)])
    client.pause(client.assignment())
    clock = Clock()
    committer = Committer(1.0, clock)

    committer.note({tp: (1, 10)})
    committer.commit_now(client, {tp: 1})
    _rewind(kafka_admin, group, topic, 3)
    committer.failed([KafkaTopicPartition(topic, 0, 10)])  # as the commit callback reports a refusal
    clock.now = 1.0
    committer.commit_due(client, {tp: 1})
    wait_for(lambda: committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 10}, what="10 again")

    _rewind(kafka_admin, group, topic, 3)
    assert committer.commit_final(client, {tp: (1, 10)}) == {tp: 10}, "sent again, though sent before"
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 10}
