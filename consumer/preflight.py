"""Preflight: before the relay joins its group, check that the parts around it are there and answer.

A new user's mistakes and a broken neighbour look the same from inside the flow — every record failing —
and the flow's answers to them (retry for ever, or dead-letter) are both wrong for a setup fault. So
``run`` and ``config check`` look first, within a bounded time, and name the setting to fix:

* ``kafka.bootstrap_servers``: a broker answers a metadata request;
* ``topics[i].name``: every source topic exists;
* ``topics[i].dead_letter_topic``: every dead-letter topic exists, or is created with its source topic's
  partition count when ``dead_letter.create_topics`` is on (as Kafka Connect does for its dead-letter queue);
* ``schema_registry.url``: the registry answers as a Schema Registry (a subject list), with its credentials.

URLs are checked when the configuration is loaded (``consumer.config``). No preflight sends a tracking
call: the API has no call without a side effect, and a bad ``apiKey`` is the dead-letter guard's job.

Each check's result is a :class:`Check`; the short-lived Kafka client here has no Python callback (a
callback on a client that the garbage collector destroys can deadlock) and librdkafka's own log is
silenced: what went wrong is said once, in the check's line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from confluent_kafka.schema_registry.error import SchemaRegistryError

from consumer.config import RelayConfig, Settings, display_url
from consumer.decode import is_registry_answer, registry_client
from consumer.errors import ConfigError

TOPIC_CREATE_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class Check:
    """One thing looked at: the setting it concerns, whether it holds, and what was found."""

    setting: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.setting}: {self.detail}"


def run_checks(
    config: RelayConfig,
    *,
    admin_config: dict[str, Any],
    create: bool = True,
) -> list[Check]:
    """Every check, in order; the topic checks only when a broker answered.

    ``create=False`` (``config check``): a dead-letter topic that ``run`` would create is reported, not made.
    """
    settings = config.settings
    checks: list[Check] = []
    admin = AdminClient(_silent(admin_config))
    try:
        metadata, broker_check = _brokers(
            admin, settings.kafka.bootstrap_servers, settings.kafka.connect_timeout_s
        )
        checks.append(broker_check)
        if metadata is not None:
            checks.extend(_topics(admin, metadata, settings, create=create))
    finally:
        del admin  # destroyed here, while the broker (if any) is still up, never by a later collection
    if settings.schema_registry.url:
        checks.append(_registry(config))
    return checks


def first_failure(checks: list[Check]) -> ConfigError | None:
    """The first failed check as the error ``run`` stops with (exit status 2), or None."""
    for check in checks:
        if not check.ok:
            return ConfigError(check.setting, check.detail)
    return None


def require_brokers(
    admin_config: dict[str, Any], servers: str, timeout_s: float, setting: str = "kafka.bootstrap_servers"
) -> None:
    """The broker check alone, for the commands that read or move Kafka state (``dlq``, ``replay``):
    ConfigError naming ``setting`` when no broker answers within ``timeout_s``.

    Without it, such a command against a wrong address printed librdkafka's connection failures for the
    whole of its request timeout and then a line that named no setting.
    """
    try:
        admin = AdminClient(_silent({**admin_config, "bootstrap.servers": servers}))
    except (KafkaException, ValueError, TypeError) as error:
        # A bad pass-through setting fails here, before any connection; no client was made.
        raise ConfigError("kafka.client", f"cannot create a Kafka client: {error}") from None
    try:
        _, check = _brokers(admin, servers, timeout_s, setting)
    finally:
        del admin
    if not check.ok:
        raise ConfigError(check.setting, check.detail)


def _silent(admin_config: dict[str, Any]) -> dict[str, Any]:
    """The check's client settings: librdkafka's log off, debug contexts (``[kafka.client] debug``) too,
    which print whatever ``log_level`` says; and no logger callback (see the module docstring)."""
    settings = {k: v for k, v in admin_config.items() if k not in ("debug", "logger")}
    return {**settings, "log_level": 0}


def _brokers(
    admin: AdminClient, servers: str, timeout_s: float, setting: str = "kafka.bootstrap_servers"
) -> tuple[Any, Check]:
    started = time.monotonic()
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        reason = error.str() if hasattr(error, "str") else str(error)
        return None, Check(
            setting,
            False,
            f"no broker at {servers} answered within {timeout_s:.0f}s ({reason})",
        )
    took = time.monotonic() - started
    count = len(metadata.brokers)
    return metadata, Check(
        setting,
        True,
        f"{count} broker(s) answered at {servers} in {took:.2f}s (cluster {metadata.cluster_id})",
    )


def _topics(admin: AdminClient, metadata: Any, settings: Settings, *, create: bool) -> list[Check]:
    checks = []
    for index, topic in enumerate(settings.topics):
        source = metadata.topics.get(topic.name)
        if source is None or source.error is not None:
            checks.append(
                Check(f"topics[{index}].name", False, f"topic {topic.name!r} does not exist on the brokers")
            )
            continue
        partitions = len(source.partitions)
        checks.append(
            Check(f"topics[{index}].name", True, f"topic {topic.name!r}: {partitions} partition(s)")
        )
        setting = f"topics[{index}].dead_letter_topic"
        dlq = metadata.topics.get(topic.dlq)
        if dlq is not None and dlq.error is None:
            checks.append(
                Check(setting, True, f"dead-letter topic {topic.dlq!r}: {len(dlq.partitions)} partition(s)")
            )
        elif settings.dead_letter.create_topics and create:
            checks.append(_create_topic(admin, setting, topic.dlq, partitions))
        elif settings.dead_letter.create_topics:
            detail = (
                f"dead-letter topic {topic.dlq!r} does not exist; "
                f"run creates it with {partitions} partition(s)"
            )
            checks.append(Check(setting, True, detail))
        else:
            checks.append(
                Check(
                    setting,
                    False,
                    f"dead-letter topic {topic.dlq!r} does not exist: create it (e.g. with {partitions} "
                    "partition(s), as its source topic) or set dead_letter.create_topics = true",
                )
            )
    return checks


def _create_topic(admin: AdminClient, setting: str, name: str, partitions: int) -> Check:
    # Replication factor -1: the broker's default.replication.factor, as the platform's topics get it.
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions)], operation_timeout=TOPIC_CREATE_TIMEOUT_S
    )
    try:
        futures[name].result(timeout=TOPIC_CREATE_TIMEOUT_S)
    except KafkaException as exc:
        return Check(setting, False, f"dead-letter topic {name!r} could not be created: {exc}")
    return Check(setting, True, f"dead-letter topic {name!r} created with {partitions} partition(s)")


def _registry(config: RelayConfig) -> Check:
    settings = config.settings.schema_registry
    assert settings.url is not None
    extra: dict[str, Any] = {}
    if config.schema_registry_auth is not None:
        extra["basic.auth.user.info"] = config.schema_registry_auth.get_secret_value()
    client = registry_client(settings.url, timeout=settings.timeout_s, extra=extra)
    try:
        return _registry_answer(display_url(settings.url), client.get_subjects)
    finally:
        client.close()


def _registry_answer(url: str, get_subjects: Callable[[], list[str]]) -> Check:
    setting = "schema_registry.url"
    try:
        subjects = get_subjects()
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404 and not is_registry_answer(exc):
            detail = (
                f"{url} answers HTTP 404 to /subjects: no Schema Registry API at this URL (check the path)"
            )
        elif exc.http_status_code in (401, 403):
            detail = (
                f"{url} refused the credentials (HTTP {exc.http_status_code}): "
                "check schema_registry.basic_auth_user_info_env"
            )
        else:
            detail = f"{url} answered HTTP {exc.http_status_code} to /subjects: {exc.error_message}"
        return Check(setting, False, detail)
    # The client raises the HTTP library's errors for connection failures; ValueError for a non-JSON 2xx.
    except Exception as exc:  # noqa: BLE001 - any failure to get an answer is this check's verdict
        return Check(setting, False, f"{url} gave no registry answer: {type(exc).__name__}: {exc}")
    if not isinstance(subjects, list):
        return Check(setting, False, f"{url} answered /subjects with something other than a list")
    return Check(setting, True, f"{url} answers as a Schema Registry ({len(subjects)} subject(s))")
