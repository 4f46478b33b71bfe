"""The relay's configuration: one frozen, validated object built once at start-up and passed down.

Sources, later ones winning: the TOML file, then environment variables ``RR_<SECTION>__<KEY>`` (for example
``RR_KAFKA__BOOTSTRAP_SERVERS`` or ``RR_DELIVERY__MODE``). No other module reads the environment.

Secrets never live in the TOML file: each shop's ``apiKey`` comes from an environment variable
(``api_key_env``) or a file (``api_key_file``, e.g. a mounted Kubernetes secret). At run time it is a
``SecretStr``, which prints as ``**********`` and is revealed only where a request is built.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from consumer.errors import ConfigError

DEFAULT_BASE_URL = "https://apptracking.retailrocket.net/1.0/"
ENV_PREFIX = "RR_"
ENV_DELIMITER = "__"
MASK = "**********"
#: librdkafka settings whose values are secrets: SASL passwords, key passphrases, OAuth client secrets,
#: PEM-encoded keys, and the OAuth config string (which may embed a secret).
_SECRET_CLIENT_SETTING = re.compile(r"password|secret|passphrase|\.pem$|oauthbearer\.config", re.IGNORECASE)

ValueFormat = Literal["confluent-avro", "avro", "json"]
DeliveryMode = Literal["batch", "single"]
Ordering = Literal["key", "partition", "unordered"]
UnknownEventPolicy = Literal["dead-letter", "skip"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def check_http_url(value: str) -> str:
    """An absolute ``http(s)://host[:port]/path`` URL, or a ValueError that says what is missing.

    A URL without a scheme passes most parsers as a relative path; the relay would then fail on every
    request (the tracking API: every call a "permanent" failure) or die deep in a client library.
    """
    shown = display_url(value)
    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a port that is not a number or out of range
    except ValueError as error:
        raise ValueError(f"{shown!r} is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{shown!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{shown!r} names no host")
    if port == 0:
        raise ValueError(f"{shown!r} has port 0")
    return value


def display_url(url: str) -> str:
    """``url`` as it may be printed: a password written into it (``user:secret@host``) masked."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:{MASK}@{host}"


class ShopConfig(_Frozen):
    """One Retail Rocket shop at run time: its ``partnerId``, secret ``apiKey`` and rate limit."""

    partner_id: str = Field(min_length=1, description="Retail Rocket partnerId (public)")
    api_key: SecretStr = Field(description="Retail Rocket apiKey (secret; never logged)")
    rate_limit: float | None = Field(
        default=50.0, gt=0, description="requests per second for this shop; None turns the limiter off"
    )


class ShopSettings(_Frozen):
    """One shop as the TOML file describes it: where its key is, never the key itself."""

    partner_id: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, description="environment variable holding the apiKey")
    api_key_file: Path | None = Field(default=None, description="file holding the apiKey")
    rate_limit: float | None = Field(default=50.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "api_key" in data:
            raise ValueError(
                "api_key must not be written in the configuration; name an environment variable "
                "(api_key_env) or a file (api_key_file) that holds it"
            )
        return data


class TrackingConfig(_Frozen):
    """How the relay talks to the tracking API."""

    base_url: str = DEFAULT_BASE_URL
    single_timeout: float = Field(default=0.5, gt=0, description="seconds, for one single-event call")
    batch_timeout: float = Field(default=10.0, gt=0, description="seconds, for one visitorEvents call")
    concurrency: int = Field(default=64, ge=1, description="connections in the keep-alive pool")
    verify_tls: bool = True

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_http_url(value)


class KafkaConfig(_Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "rr-relay"
    #: Static group membership (``group.instance.id``): a stable name per process, such as the pod's name
    #: (``RR_KAFKA__GROUP_INSTANCE_ID`` from the downward API or ``$HOSTNAME``). A member restarted within the
    #: session timeout (``client."session.timeout.ms"``) gets its partitions back at once, without a
    #: rebalance; one that stops for good keeps them unserved until that timeout. Unset: dynamic membership.
    group_instance_id: str | None = Field(default=None, min_length=1, max_length=249)
    #: librdkafka settings passed through as they are (security.protocol, sasl.*, ssl.*, ...).
    client: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: Records fetched per consume() call: the unit of per-batch work on the intake thread.
    consume_batch: int = Field(default=500, ge=1, le=100_000)
    #: librdkafka's prefetch bound per partition, in KiB (keeps memory flat with a large backlog).
    queued_max_messages_kbytes: int = Field(default=16_384, ge=64)
    commit_interval_ms: int = Field(default=1000, ge=50)
    #: How often librdkafka reports statistics (consumer lag, broker state) for metrics and readiness.
    statistics_interval_ms: int = Field(default=2000, ge=100)
    #: At start, how long the brokers get to answer before ``run`` stops with exit status 2.
    connect_timeout_s: float = Field(default=15.0, gt=0)


class TopicConfig(_Frozen):
    name: str = Field(min_length=1)
    format: ValueFormat = "confluent-avro"
    #: For ``avro`` (required) and ``json`` (optional): the record name the values are written with.
    record_name: str | None = None
    #: Dead-letter topic for this topic's records; default ``<name>.dlq``.
    dead_letter_topic: str | None = None

    @model_validator(mode="after")
    def _avro_needs_record(self) -> TopicConfig:
        if self.format == "avro" and not self.record_name:
            raise ValueError("format 'avro' needs record_name: raw Avro carries no schema id")
        return self

    @property
    def dlq(self) -> str:
        return self.dead_letter_topic or f"{self.name}.dlq"


class SchemaRegistryConfig(_Frozen):
    url: str | None = None
    basic_auth_user_info_env: str | None = Field(
        default=None, description="environment variable holding 'user:password' for the registry"
    )
    timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)


#: The in-flight budget's defaults. In batch mode it is what a rate-limited backlog needs to use every slot:
#: with 2 shops at 50 requests/s and 500 events per batch, 20,000 records (0.4 s of the allowance) reached
#: a median 93% of it (88-100%, 11 runs), 40,000 a median 100% (97-100%, 5 runs), at about 170 and 205 MiB
#: resident (BENCHMARKS.md, the backlog figure). A single-mode record costs more memory, and single mode is
#: bound by its calls in flight, not by this budget.
BATCH_IN_FLIGHT: Final = 40_000
SINGLE_IN_FLIGHT: Final = 20_000


class DeliveryConfig(_Frozen):
    mode: DeliveryMode = "batch"
    ordering: Ordering = "key"
    batch_max_events: int = Field(default=500, ge=1, le=10_000)
    batch_max_bytes: int = Field(default=1_048_576, ge=1024)
    #: How long an open batch waits for more events before it is sealed; a shop at its rate limit keeps it
    #: open until its next slot, since a sealed batch would wait for that slot anyway.
    batch_linger_ms: float = Field(default=20.0, ge=0)
    #: Batches in flight at once, over all shops.
    max_concurrent_batches: int = Field(default=16, ge=1)
    #: Single calls in flight at once (the worker pool of single mode).
    max_concurrent_calls: int = Field(default=64, ge=1)
    #: Records consumed but not yet settled; at the cap the consumer pauses its partitions. Unset: 40,000 in
    #: batch mode, 20,000 in single mode (see BATCH_IN_FLIGHT above).
    max_in_flight_records: int = Field(default=SINGLE_IN_FLIGHT, ge=1)
    #: Time revoked partitions get to settle their in-flight records before their watermark is committed.
    revoke_grace_s: float = Field(default=10.0, ge=0)
    #: Time SIGTERM gives in-flight records to settle before the final commit.
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    unknown_event: UnknownEventPolicy = "dead-letter"
    #: Shop that events for an unconfigured shop id go to; unset means such events are dead-lettered.
    default_shop: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _in_flight_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_in_flight_records") is None:
            mode = data.get("mode", "batch")
            return {**data, "max_in_flight_records": BATCH_IN_FLIGHT if mode == "batch" else SINGLE_IN_FLIGHT}
        return data


class RetryConfig(_Frozen):
    base_s: float = Field(default=0.2, gt=0)
    cap_s: float = Field(default=30.0, gt=0)
    #: Give up on a transient failure (dead-letter it) after this long; unset retries for as long as it takes.
    max_age_s: float | None = Field(default=None, gt=0)
    #: Transient failures in a row that open a shop's circuit breaker.
    breaker_threshold: int = Field(default=5, ge=1)
    #: While open, one probe call goes after this long, doubling up to breaker_probe_cap_s.
    breaker_probe_base_s: float = Field(default=1.0, gt=0)
    breaker_probe_cap_s: float = Field(default=30.0, gt=0)


class DeadLetterConfig(_Frozen):
    #: Dead-letter guard: halt when more than this share of recent records were dead-lettered ...
    max_ratio: float = Field(default=0.5, gt=0, le=1)
    #: ... over this many of the most recent settled records ...
    window_records: int = Field(default=200, ge=1)
    #: ... once at least this many were dead-lettered in the window (a few bad records never halt).
    min_dead_lettered: int = Field(default=50, ge=1)
    #: How long one write to the dead-letter topic may take before it is retried (the record stays unsettled).
    write_timeout_s: float = Field(default=30.0, gt=0)
    #: At start, create a missing dead-letter topic with its source topic's partition count (as Kafka
    #: Connect does for its dead-letter queue); off: a missing one stops the start with its name.
    create_topics: bool = False


class ObservabilityConfig(_Frozen):
    port: int | None = Field(default=None, ge=0, le=65535, description="metrics and health port; unset = off")
    host: str = Field(default="0.0.0.0", description="address the metrics and health server listens on")  # noqa: S104 - probes come from outside the pod
    #: /healthz turns red when the intake thread has not polled Kafka for this long.
    stall_after_s: float = Field(default=60.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    """Everything the relay needs, validated once."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER
    )

    kafka: KafkaConfig = KafkaConfig()
    topics: list[TopicConfig] = Field(min_length=1)
    schema_registry: SchemaRegistryConfig = SchemaRegistryConfig()
    shops: dict[str, ShopSettings] = Field(min_length=1)
    tracking: TrackingConfig = TrackingConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    retry: RetryConfig = RetryConfig()
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    schemas_dir: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init values; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.delivery.default_shop is not None and self.delivery.default_shop not in self.shops:
            raise ValueError(f"delivery.default_shop {self.delivery.default_shop!r} is not one of [shops]")
        if any(t.format == "confluent-avro" for t in self.topics) and not self.schema_registry.url:
            raise ValueError("schema_registry.url is required when a topic has format 'confluent-avro'")
        names = [t.name for t in self.topics]
        if len(set(names)) != len(names):
            raise ValueError("topics: a topic is listed twice")
        if self.retry.cap_s < self.retry.base_s:
            raise ValueError("retry.cap_s must be at least retry.base_s")
        return self


class RelayConfig(BaseModel):
    """The validated settings plus the secrets resolved from the environment: what the service runs on."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    settings: Settings
    shops: dict[str, ShopConfig]
    schema_registry_auth: SecretStr | None = None


def load(path: Path | None, environ: Mapping[str, str] | None = None) -> RelayConfig:
    """Read the TOML file (if any), apply ``RR_*`` overrides and resolve secrets.

    Raises ConfigError naming the setting that is wrong.
    """
    env = os.environ if environ is None else environ
    settings = load_settings(path, env)
    shops = {name: _resolve_shop(name, shop, env) for name, shop in settings.shops.items()}
    auth = None
    if settings.schema_registry.basic_auth_user_info_env:
        auth = SecretStr(
            _require_env(
                env,
                settings.schema_registry.basic_auth_user_info_env,
                "schema_registry.basic_auth_user_info_env",
            )
        )
    return RelayConfig(settings=settings, shops=shops, schema_registry_auth=auth)


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check the TOML file (if any) with its ``RR_*`` overrides, resolving no secret.

    For the commands that only talk to Kafka (``replay``, ``dlq inspect``): an operator rewinding a group
    should not need every shop's API key in the environment. Raises ConfigError as :func:`load` does.
    """
    env = os.environ if environ is None else environ
    raw = _read_toml(path) if path is not None else {}
    _check_env_names(env)
    try:
        return _with_environ(env, lambda: Settings(**raw))
    except ValidationError as error:
        raise _config_error(error) from None


def _check_env_names(env: Mapping[str, str]) -> None:
    """Refuse ``RR_`` variables that look like overrides but match no section.

    pydantic-settings ignores them silently, so ``RR_DELIVRY__MODE=single`` or ``RR_DELIVERY_MODE=single``
    would leave the relay in batch mode without a word. Other ``RR_`` variables (``RR_API_KEY_<SHOP>``,
    ``RR_KAFKA_CACHE`` of the local tools) are left alone: only a ``__`` override whose section is unknown,
    or a single ``_`` where a real ``<SECTION>__<KEY>`` was meant, is an error.
    """
    fields = Settings.model_fields
    for variable in env:
        name = variable.upper()
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        head, delimiter, _ = rest.partition(ENV_DELIMITER)
        if delimiter and head.lower() not in fields:
            raise ConfigError(variable, f"no section {head.lower()!r}; sections: {', '.join(fields)}")
        if delimiter:
            continue
        for section, info in fields.items():
            model = info.annotation
            prefix = f"{section.upper()}_"
            if (
                isinstance(model, type)
                and issubclass(model, BaseModel)
                and rest.startswith(prefix)
                and rest[len(prefix) :].lower() in model.model_fields
            ):
                meant = f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}{rest[len(prefix) :]}"
                raise ConfigError(variable, f"not an override; did you mean {meant}?")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("--config", f"{path} is not valid TOML: {error}") from None


def _with_environ(env: Mapping[str, str], build: Any) -> Settings:
    """pydantic-settings reads ``os.environ``; tests pass their own mapping, so swap it in for the build."""
    if env is os.environ:
        return build()  # type: ignore[no-any-return]
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return build()  # type: ignore[no-any-return]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _config_error(error: ValidationError) -> ConfigError:
    first = error.errors()[0]
    setting = ".".join(str(part) for part in first["loc"]) or "configuration"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    elif first["type"] == "missing":
        message = "is required"
    extra = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
    return ConfigError(setting, message + extra)


def _resolve_shop(name: str, shop: ShopSettings, env: Mapping[str, str]) -> ShopConfig:
    setting = f"shops.{name}"
    if shop.api_key_env and shop.api_key_file:
        raise ConfigError(setting, "give api_key_env or api_key_file, not both")
    if shop.api_key_file is not None:
        try:
            key = shop.api_key_file.read_text().strip()
        except OSError as error:
            raise ConfigError(
                f"{setting}.api_key_file", f"cannot read {shop.api_key_file}: {error.strerror}"
            ) from None
        if not key:
            raise ConfigError(f"{setting}.api_key_file", f"{shop.api_key_file} is empty")
    else:
        variable = shop.api_key_env or default_key_env(name)
        key = _require_env(env, variable, f"{setting}.api_key_env")
    return ShopConfig(partner_id=shop.partner_id, api_key=SecretStr(key), rate_limit=shop.rate_limit)


def default_key_env(shop: str) -> str:
    """The environment variable a shop's key is read from when the TOML names none."""
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in shop).upper()
    return f"{ENV_PREFIX}API_KEY_{cleaned}"


def _require_env(env: Mapping[str, str], variable: str, setting: str) -> str:
    value = env.get(variable, "").strip()
    if not value:
        raise ConfigError(setting, f"environment variable {variable} is not set or empty")
    return value


def describe(config: RelayConfig) -> str:
    """The effective configuration as TOML-like text, every secret masked."""
    data = config.settings.model_dump(mode="json")
    data["kafka"]["client"] = {
        key: MASK if _SECRET_CLIENT_SETTING.search(key) else value
        for key, value in data["kafka"]["client"].items()
    }
    data["shops"] = {
        name: {"partner_id": shop.partner_id, "api_key": "**********", "rate_limit": shop.rate_limit}
        for name, shop in config.shops.items()
    }
    if config.schema_registry_auth is not None:
        data["schema_registry"]["basic_auth_user_info"] = "**********"
    return json.dumps(data, indent=2, sort_keys=True)
